# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The controller's part of gatehouse.access.node_certificates (see the module's documentation).

One task per node: the module makes the keys and requests on the node and reads the current
certificates; here each request is checked against its current certificate and signed with the
CA's key where needed (node_pki.keeps / node_pki.issue); the module then writes what was issued.
The CA's key is read on the controller and never sent anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import read_bytes
from ansible_collections.gatehouse.access.plugins.module_utils._crypto import certificate as crypto
from ansible_collections.gatehouse.access.plugins.module_utils._crypto.node_pki import (
    ARGUMENT_SPEC,
    NAME_PATTERN,
    ROLES,
    issue,
    keeps,
    told_apart,
)

try:
    from cryptography import x509
except ImportError:  # reported below through crypto.HAS_CRYPTOGRAPHY
    pass

MODULE = "gatehouse.access.node_certificates"


def check_entries(entries: object) -> None:
    """The entries' shape, with one message for every fault (before anything is done)."""
    for entry in entries if isinstance(entries, list) else [None]:
        ok = (
            isinstance(entry, dict)
            and re.match(NAME_PATTERN, str(entry.get("name", "")))
            and entry.get("role") in ROLES
            and any(entry.get(key) for key in ("names", "dns", "ips"))
        )
        if not ok:
            name = entry.get("name", "?") if isinstance(entry, dict) else "?"
            raise AnsibleActionFail(
                "certificates entry %s needs a name, a role (%s) and at least one DNS name or IP address "
                "(names, dns or ips)" % (name, ", ".join(ROLES))
            )


def summary(pem: str | None) -> str:
    """What the diff shows of a certificate: its names and end of validity."""
    if not pem:
        return "(none)\n"
    try:
        facts = crypto.certificate_facts(x509.load_pem_x509_certificate(pem.encode("ascii")))
    except ValueError:
        return "(unreadable)\n"
    return "%s; valid until %s\n" % (", ".join(facts["subject_alt_names"]), facts["not_after"])


def ca_signing_key(ca_dir: str):
    """The CA's key, read only when a certificate is to be signed (copying the CA needs ca.pem alone)."""
    path = os.path.join(ca_dir, "ca.key")
    data = read_bytes(path)
    if data is None:
        raise AnsibleActionFail(
            "There is no CA key (ca.key) in %s on the controller: it is needed to issue certificates" % ca_dir
        )
    try:
        return crypto.load_private_key(data, path)[0]
    except crypto.CertificateError as exc:
        raise AnsibleActionFail("the deployment CA's key cannot be used: %s" % exc) from None


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        if not crypto.HAS_CRYPTOGRAPHY:
            raise AnsibleActionFail("node_certificates needs the cryptography library on the controller")
        check_entries(self._task.args.get("certificates"))
        validated, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        params = validated.validated_parameters
        check = bool(self._task.check_mode)
        ca_dir = params["ca_dir"]
        ca_cert = None
        ca_pem = None
        try:
            with open(os.path.join(ca_dir, "ca.pem"), "rb") as handle:
                ca_pem = handle.read()
            ca_cert = x509.load_pem_x509_certificate(ca_pem)
        except FileNotFoundError:
            if not check:
                raise AnsibleActionFail(
                    "There is no deployment CA in %s on the controller: run the role's ca entry point "
                    "(tasks_from: ca) first, or put your own CA there as ca.pem and ca.key" % ca_dir
                ) from None
        except ValueError as exc:
            raise AnsibleActionFail("the deployment CA in %s cannot be read: %s" % (ca_dir, exc)) from None

        params["certificates"] = [told_apart(entry) for entry in params["certificates"]]
        node_args = {key: value for key, value in args.items() if key in ARGUMENT_SPEC}
        node_args["certificates"] = params["certificates"]
        node_args["ca_certificate"] = ca_pem.decode("ascii") if ca_pem is not None else None
        node_args.pop("issued", None)
        first = self._execute_module(module_name=MODULE, module_args=node_args, task_vars=task_vars)
        if first.get("failed"):
            return first
        requests, current = first.get("requests", {}), first.get("current", {})
        issued: dict[str, str] = {}
        to_issue: list[str] = []
        ca_key = None
        for entry in params["certificates"]:
            name = entry["name"]
            csr = requests.get(name)
            if csr is None:  # check mode, no key yet
                to_issue.append(name)
            elif ca_cert is None or not keeps(current.get(name), csr, ca_cert, params["renew_days"]):
                to_issue.append(name)
                if ca_cert is not None:
                    ca_key = ca_key or ca_signing_key(ca_dir)
                    issued[name] = issue(csr, ca_cert, ca_key, params["cert_days"])
        changed = bool(first.get("changed")) or bool(to_issue)
        if issued and not check:
            second = self._execute_module(
                module_name=MODULE, module_args=dict(node_args, issued=issued), task_vars=task_vars
            )
            if second.get("failed"):
                return second
        fingerprints = {
            name: hashlib.sha256(pem.encode("ascii")).hexdigest()
            for name, pem in {**current, **issued}.items()
            if name not in to_issue or name in issued
        }
        result.update(
            changed=changed,
            issued=to_issue,
            keys_created=first.get("keys_created", []),
            fingerprints=fingerprints,
        )
        if self._task.diff and to_issue:
            result["diff"] = [
                {
                    "before_header": "certificate %s" % name,
                    "after_header": "certificate %s" % name,
                    "before": summary(current.get(name)),
                    "after": summary(issued.get(name)) if name in issued else "(issued)\n",
                }
                for name in to_issue
            ]
        return result
