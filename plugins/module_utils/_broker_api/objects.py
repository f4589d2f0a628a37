# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Converge broker objects (users, groups, desktops, pools, entitlements) through the admin API.

Each object is written with one ``PUT`` (or ``DELETE``); the broker answers ``changed`` and the
object before and after, and ``?check_mode=true`` gives the same answer without storing anything,
so check mode and diff mode report exactly what a real run does. Options left unset are not sent
and keep their stored value.

A user's TOTP enrollment is a write of its own: ``POST .../totp`` makes a new secret and answers
its ``otpauth://`` URI once (the broker keeps it encrypted and never shows it again), ``DELETE``
removes it. Whether one is due follows from the user's ``totp_enrolled``.

One case needs a local prediction: in check mode an object may refer to one that an earlier task
of the same run would have created (a user's group, a pool's desktop, an entitlement's user). The
broker refuses the reference because nothing was stored; the module then predicts the result from
the current object and warns instead of failing.
"""

from __future__ import annotations

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.client import (
    CONNECTION_ARGSPEC,
    PASSWORD_MARKER,
    BrokerApi,
    BrokerApiError,
    api_path,
    render_diff,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import fail, finish

STATE_OPTION = {"type": "str", "choices": ["present", "absent"], "default": "present"}

USER_ARGSPEC = dict(
    CONNECTION_ARGSPEC,
    name={"type": "str", "required": True},
    domain={"type": "str"},
    display_name={"type": "str"},
    enabled={"type": "bool"},
    groups={"type": "list", "elements": "str"},
    append={"type": "bool", "default": False},
    password={"type": "str", "no_log": True},
    update_password={"type": "str", "choices": ["always", "on_create"], "default": "always"},
    totp={"type": "str", "choices": ["enrolled", "absent", "ignore"], "default": "ignore"},
    totp_reset={"type": "bool", "default": False},
    state=STATE_OPTION,
)

GROUP_ARGSPEC = dict(
    CONNECTION_ARGSPEC,
    name={"type": "str", "required": True},
    domain={"type": "str"},
    description={"type": "str"},
    state=STATE_OPTION,
)

DESKTOP_ARGSPEC = dict(
    CONNECTION_ARGSPEC,
    name={"type": "str", "required": True},
    address={"type": "str"},
    hostname={"type": "str"},
    agent_port={"type": "int"},
    session_port={"type": "int"},
    enabled={"type": "bool"},
    pool={"type": "str"},
    logon={"type": "str", "choices": ["windows-password", "none"]},
    agent_ca_pem={"type": "str"},
    agent_cert_sha256={"type": "str"},
    site={"type": "str"},
    state=STATE_OPTION,
)
# What a desktop PUT may carry: every desktop option but the connection, the name and the state.
DESKTOP_FIELDS = tuple(
    k for k in DESKTOP_ARGSPEC if k not in CONNECTION_ARGSPEC and k not in ("name", "state")
)

POOL_ARGSPEC = dict(
    CONNECTION_ARGSPEC,
    name={"type": "str", "required": True},
    persistent={"type": "bool"},
    description={"type": "str"},
    members={"type": "list", "elements": "str"},
    append={"type": "bool", "default": False},
    state=STATE_OPTION,
)

ENTITLEMENT_ARGSPEC = dict(
    CONNECTION_ARGSPEC,
    principal_type={"type": "str", "choices": ["user", "group", "directory-group"], "required": True},
    domain={"type": "str"},
    principal={"type": "str", "required": True},
    resource_type={"type": "str", "choices": ["desktop", "pool"], "required": True},
    resource={"type": "str", "required": True},
    state=STATE_OPTION,
)

# Fields whose "no such ..." answer in check mode means "a referenced object does not exist yet",
# which an earlier task of the same run would have created.
_REFERENCE_FIELDS = ("groups", "members", "pool")


class Plan:
    """What one module run sends: the object kind, its path, the PUT body and what is known before."""

    def __init__(self, kind, path, body, current, label, password_changed=False):
        self.kind = kind
        self.path = path
        self.body = body
        self.current = current
        self.label = label
        self.password_changed = password_changed


def merge_names(current, wanted, append) -> list:
    """``wanted`` (exact list), or with ``append`` the current names plus the new ones (case-insensitive)."""
    if not append:
        return list(wanted)
    merged = list(current or [])
    seen = {n.lower() for n in merged}
    for name in wanted:
        if name.lower() not in seen:
            merged.append(name)
            seen.add(name.lower())
    return merged


def _set(body, params, keys):
    for key in keys:
        if params.get(key) is not None:
            body[key] = params[key]


def _check_port(params, key):
    value = params.get(key)
    if value is not None and not 1 <= value <= 65535:
        raise BrokerApiError("%s must be between 1 and 65535, got %d" % (key, value))


def _check_name(value, option):
    if value is None or not value.strip() or value != value.strip():
        raise BrokerApiError(
            "%s must be a non-empty name without leading or trailing spaces, got %r" % (option, value)
        )


def plan_user(api, params, domain) -> Plan:
    path = api_path("users", domain, params["name"])
    current = api.get(path)
    body = {}
    if params["state"] == "absent":
        return Plan("user", path, body, current, "user %s\\%s" % (domain, params["name"]))
    _set(body, params, ("display_name", "enabled"))
    if params["groups"] is not None:
        body["groups"] = merge_names(current["groups"] if current else [], params["groups"], params["append"])
    password = params.get("password")
    send_password = False
    if password is not None:
        if current is None:
            send_password = True
        elif params["update_password"] == "always":  # noqa: S105 - an option value
            # Asked of the broker (hash comparison on its side); a password is never read back.
            send_password = not api.password_matches(domain, params["name"], password)
    if send_password:
        body["password"] = password
    return Plan("user", path, body, current, "user %s\\%s" % (domain, params["name"]), send_password)


def plan_group(api, params, domain) -> Plan:
    path = api_path("groups", domain, params["name"])
    body = {}
    if params["state"] == "present":
        _set(body, params, ("description",))
    return Plan("group", path, body, api.get(path), "group %s\\%s" % (domain, params["name"]))


def plan_desktop(api, params, domain=None) -> Plan:
    _check_port(params, "agent_port")
    _check_port(params, "session_port")
    path = api_path("desktops", params["name"])
    current = api.get(path)
    body = {}
    if params["state"] == "present":
        _set(body, params, DESKTOP_FIELDS)
        if current is None and not params.get("address"):
            raise BrokerApiError("address is required to create desktop %s" % params["name"])
        if params.get("agent_ca_pem") and params.get("agent_cert_sha256"):
            # An empty string clears one, so "" with the other is allowed.
            raise BrokerApiError("agent_ca_pem and agent_cert_sha256 are mutually exclusive")
    return Plan("desktop", path, body, current, "desktop %s" % params["name"])


def plan_pool(api, params, domain=None) -> Plan:
    path = api_path("pools", params["name"])
    current = api.get(path)
    body = {}
    if params["state"] == "present":
        _set(body, params, ("persistent", "description"))
        if params["members"] is not None:
            body["members"] = merge_names(
                current["members"] if current else [], params["members"], params["append"]
            )
    return Plan("pool", path, body, current, "pool %s" % params["name"])


def plan_entitlement(api, params, domain) -> Plan:
    _check_name(params["principal"], "principal")
    _check_name(params["resource"], "resource")
    path = api_path(
        "entitlements",
        params["principal_type"],
        domain,
        params["principal"],
        params["resource_type"],
        params["resource"],
    )
    label = "entitlement of %s %s\\%s to %s %s" % (
        params["principal_type"],
        domain,
        params["principal"],
        params["resource_type"],
        params["resource"],
    )
    return Plan("entitlement", path, {}, api.get(path), label)


def predict(plan, params, domain) -> dict:
    """The object a PUT would produce, computed locally (check mode with not-yet-created references)."""
    if plan.kind == "entitlement":
        return {
            "principal_type": params["principal_type"],
            "domain": domain,
            "principal": params["principal"],
            "resource_type": params["resource_type"],
            "resource": params["resource"],
        }
    after = dict(plan.current or {})
    if not plan.current:
        after.update({"name": params["name"]})
        if domain is not None:
            after["domain"] = domain
    for key, value in plan.body.items():
        if key == "password":
            after["password_set"] = True
        elif key == "pool":
            after["pool"] = value or None
        else:
            after[key] = value
    return after


def _missing_reference(exc, kind) -> bool:
    if exc.status == 400 and exc.field in _REFERENCE_FIELDS and "no such" in exc.message:
        return True
    # An entitlement's principal or resource that does not exist answers 404 ("user CORP\\x does not
    # exist"); an unknown domain ("domain 'X' does not exist") is a real error.
    return kind == "entitlement" and exc.object_missing and not exc.message.startswith("domain")


PLANNERS = {
    "user": plan_user,
    "group": plan_group,
    "desktop": plan_desktop,
    "pool": plan_pool,
    "entitlement": plan_entitlement,
}
DOMAIN_KINDS = ("user", "group", "entitlement")


def check_totp_options(params) -> None:
    if params.get("totp_reset") and params.get("totp") != "enrolled":
        raise BrokerApiError("totp_reset is only used with totp=enrolled (it replaces the enrolled secret)")
    if params.get("totp") == "enrolled" and params["state"] == "absent":
        raise BrokerApiError(
            "totp=enrolled needs state=present; state=absent removes the user and its TOTP secret"
        )


def converge_totp(api, params, domain, user, check_mode=False, exists=True) -> dict:
    """Enroll or remove the user's TOTP secret; the ``otpauth_uri`` of a new secret is returned once.

    In check mode the request is sent with ``?check_mode=true`` (the broker checks it and stores
    nothing, and makes no secret); for a user that does not exist yet it is predicted locally.
    """
    enrolled = bool((user or {}).get("totp_enrolled"))
    path = api_path("users", domain, params["name"], "totp")
    query = {"check_mode": "true"} if check_mode else None
    if params["totp"] == "enrolled":
        if enrolled and not params["totp_reset"]:
            return {"enrolled": True, "changed": False}
        if check_mode and not exists:
            return {"enrolled": True, "changed": True}
        answer = api.request("POST", path, query=query)[1] or {}
        if check_mode:
            return {"enrolled": True, "changed": True}
        uri = answer.get("otpauth_uri")
        if not isinstance(uri, str) or not uri.startswith("otpauth://"):
            raise BrokerApiError("the broker answered POST %s without an otpauth_uri" % path)
        return {"enrolled": True, "changed": True, "otpauth_uri": uri}
    if not enrolled:
        return {"enrolled": False, "changed": False}
    api.request("DELETE", path, query=query)
    return {"enrolled": False, "changed": True}


def converge(api, kind, params, check_mode=False) -> tuple:
    """Run one module: returns (result dict, warnings). Raises BrokerApiError."""
    warnings = []
    if kind == "user":
        check_totp_options(params)
    if kind != "entitlement":
        _check_name(params["name"], "name")
    domain = None
    if kind in DOMAIN_KINDS:
        domain = params.get("domain") or api.default_domain()
    plan = PLANNERS[kind](api, params, domain)
    password_changed = False
    if params["state"] == "absent":
        if plan.current is None:
            # Nothing to delete: no request that could change anything.
            answer = {"changed": False, kind: None, "diff": {"before": None, "after": None}}
        else:
            answer = api.delete(plan.path, check_mode=check_mode)
    else:
        try:
            answer = api.put(plan.path, plan.body, check_mode=check_mode)
        except BrokerApiError as exc:
            if not (check_mode and _missing_reference(exc, kind)):
                raise
            after = predict(plan, params, domain)
            answer = {
                "changed": after != plan.current or plan.password_changed,
                kind: after,
                "diff": {"before": plan.current, "after": after},
                "password_changed": plan.password_changed,
            }
            warnings.append(
                "check mode: %s refers to an object that does not exist yet (%s); the result assumes an "
                "earlier task of this run creates it" % (plan.label, exc.message)
            )
        password_changed = bool(answer.get("password_changed", False))
    diff = answer.get("diff") or {}
    result = {
        "changed": bool(answer.get("changed")),
        kind: answer.get(kind),
        "diff": render_diff(diff.get("before"), diff.get("after"), password_changed),
    }
    if kind == "user":
        result["password_changed"] = password_changed
        if params.get("totp", "ignore") != "ignore" and params["state"] == "present":
            totp = converge_totp(api, params, domain, result["user"], check_mode, plan.current is not None)
            result["totp"] = totp
            if totp["changed"]:
                result["changed"] = True
                if isinstance(result["user"], dict):
                    result["user"]["totp_enrolled"] = totp["enrolled"]
                after = result["diff"]["after"]
                after["totp_enrolled"] = totp["enrolled"]
                if totp["enrolled"]:
                    # A new secret (also with totp_reset); like a password, it is never shown.
                    after["totp_secret"] = PASSWORD_MARKER
    return result, warnings


def run_module(module, kind) -> None:
    """Entry point shared by the broker object modules."""
    if kind == "user" and module.params.get("totp") == "enrolled" and not module.no_log:
        # The result carries the user's new TOTP secret (otpauth_uri); Ansible must not print or log it.
        fail(
            module,
            "totp=enrolled returns the user's new TOTP secret (totp.otpauth_uri): set no_log: true on the "
            "task, register the result and hand the URI to the user (for example in a file of mode 0600)",
        )
    try:
        api = BrokerApi.from_params(module.params)
        result, warnings = converge(api, kind, module.params, check_mode=module.check_mode)
    except BrokerApiError as exc:
        fail(module, exc.message, status=exc.status)
    finish(module, dict(result, warnings_list=warnings))
