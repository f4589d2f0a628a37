"""The admin REST API under ``/api/v1`` (JSON, bearer token) and the agents' load-report endpoint.

The admin API takes ``AdminToken`` as a bearer token (the collection's modules send no client
certificate). ``POST /api/v1/agents/report`` takes no token: the caller must present a client
certificate from ``ClientCaCert`` with role ``agent`` that names the reported ``address`` or
``hostname``, and that name must be a registered desktop's address (each desktop reports for
itself only, with its own credential); anything else is refused with 403 and stores nothing.

``POST /api/v1/users/{domain}/{name}/totp`` gives the user a new TOTP secret (``SecondFactor =
totp``) and answers its ``otpauth://`` URI once: the broker keeps the secret only encrypted and
never shows it again; ``DELETE`` on the same path removes it. Entitlements of principal type
``directory-group`` name a directory group (CN or full DN) of a domain whose source is ldap.

Writes are idempotent: ``PUT`` creates or updates with the fields given (omitted fields keep
their value, or the default on create) and answers ``changed`` with the object before and after,
so an Ansible module can report a diff. ``?check_mode=true`` runs the same write in a transaction
that is rolled back. ``DELETE`` of something absent answers ``changed: false``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatehouse import protocol, sites, tls
from gatehouse.broker import factors, passwords, placement
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.settings import FACTOR_TOTP, SOURCE_LDAP, BrokerSettings
from gatehouse.broker.store import DIRECTORY_GROUP, Obj, Store
from gatehouse.web import peer_ssl_object

log = logging.getLogger("gatehouse.broker.admin")
PREFIX = "/api/v1"
_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DESKTOP_FIELDS = frozenset(
    {"address", "hostname", "agent_port", "session_port", "enabled", "pool"}
    | {"logon", "agent_ca_pem", "agent_cert_sha256", "site"}
)
MAX_PASSWORD = 1024
MAX_DIRECTORY_GROUP = 512  # a group's CN or full DN
PRINCIPAL_TYPES = ("user", "group", DIRECTORY_GROUP)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def error_response(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


# ---------------------------------------------------------------- validation


def check_name(value: str, field: str) -> str:
    if not _NAME.match(value) or value != value.strip():
        raise ApiError(
            400,
            f"{field}: must be 1-128 characters without '/', '\\', control characters or outer spaces",
            field,
        )
    return value


def _type(body: Obj, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body[key]
    # bool is an int in Python: refuse it where a number is expected, and vice versa.
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ApiError(400, f"{key}: must be {what}", key)
    return value


def _port(body: Obj, key: str) -> int:
    value = _type(body, key, int, "an integer port number")
    if not 1 <= value <= 65535:
        raise ApiError(400, f"{key}: must be between 1 and 65535, got {value}", key)
    return value


def _text(body: Obj, key: str, limit: int = 256) -> str:
    value = _type(body, key, str, "a string")
    if len(value) > limit or any(ord(ch) < 32 for ch in value):
        raise ApiError(400, f"{key}: at most {limit} printable characters", key)
    return value


def _names(body: Obj, key: str) -> list[str]:
    value = _type(body, key, list, "a list of names")
    names = []
    for item in value:
        if not isinstance(item, str):
            raise ApiError(400, f"{key}: every item must be a string", key)
        names.append(check_name(item, key))
    lowered = [n.lower() for n in names]
    if len(set(lowered)) != len(lowered):
        raise ApiError(400, f"{key}: lists a name twice", key)
    return names


def _address(body: Obj, key: str) -> str:
    value = _type(body, key, str, "an IP address or DNS name").strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not protocol.DNS_NAME.match(value):
        raise ApiError(400, f"{key}: {value!r} is neither an IP address nor a DNS name", key)
    return value.lower()


MAX_CA_PEM = 16 * 1024


def _ca_pem(body: Obj, key: str) -> str:
    """One or more PEM certificates, stored re-encoded (so a re-sent file compares equal); "" clears."""
    value = _type(body, key, str, "PEM certificates or an empty string").strip()
    if not value:
        return ""
    if len(value) > MAX_CA_PEM:
        raise ApiError(400, f"{key}: at most {MAX_CA_PEM} characters", key)
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError:
        raise ApiError(400, f"{key}: not PEM certificates", key) from None
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _sha256(body: Obj, key: str) -> str:
    """A SHA-256 fingerprint (hex, colons allowed as openssl prints them), stored as 64 lower-case hex digits."""
    value = _type(body, key, str, "a SHA-256 fingerprint or an empty string").strip().replace(":", "").lower()
    if value and not _SHA256.match(value):
        raise ApiError(400, f"{key}: must be 64 hexadecimal digits (colons allowed)", key)
    return value


def _only(body: Obj, allowed: Collection[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"{key}: unknown field (allowed: {', '.join(sorted(allowed))})", key)


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Obj:
    if not request.can_read_body:
        if allow_empty:
            return {}
        raise ApiError(400, "body: a JSON object is required", "body")
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body: larger than 64 KiB", "body") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body: not valid JSON", "body") from None
    if body is None and allow_empty:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", "body")
    return body


def check_mode(request: web.Request) -> bool:
    return request.query.get("check_mode", "").lower() in ("1", "true", "yes")


def bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _sep, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8"), token.encode("utf-8"))


# ---------------------------------------------------------------- API


def _canonical(name: str) -> str:
    """One spelling per address: IPs in ipaddress's form, DNS names lower-case."""
    try:
        return str(ipaddress.ip_address(name.strip()))
    except ValueError:
        return name.strip().lower().rstrip(".")


class AdminApi:
    def __init__(
        self, store: Store, settings: BrokerSettings, metrics: BrokerMetrics, hasher: passwords.Hasher
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.hasher = hasher

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{PREFIX}/domains", self.list_domains)
        r.add_get(f"{PREFIX}/users", self.list_users)
        r.add_get(f"{PREFIX}/users/{{domain}}/{{name}}", self.get_user)
        r.add_put(f"{PREFIX}/users/{{domain}}/{{name}}", self.put_user)
        r.add_delete(f"{PREFIX}/users/{{domain}}/{{name}}", self.delete_user)
        r.add_post(f"{PREFIX}/users/{{domain}}/{{name}}/check-password", self.check_password)
        r.add_post(f"{PREFIX}/users/{{domain}}/{{name}}/totp", self.enroll_totp)
        r.add_delete(f"{PREFIX}/users/{{domain}}/{{name}}/totp", self.delete_totp)
        r.add_get(f"{PREFIX}/groups", self.list_groups)
        r.add_get(f"{PREFIX}/groups/{{domain}}/{{name}}", self.get_group)
        r.add_put(f"{PREFIX}/groups/{{domain}}/{{name}}", self.put_group)
        r.add_delete(f"{PREFIX}/groups/{{domain}}/{{name}}", self.delete_group)
        r.add_get(f"{PREFIX}/desktops", self.list_desktops)
        r.add_get(f"{PREFIX}/desktops/{{name}}", self.get_desktop)
        r.add_put(f"{PREFIX}/desktops/{{name}}", self.put_desktop)
        r.add_delete(f"{PREFIX}/desktops/{{name}}", self.delete_desktop)
        r.add_get(f"{PREFIX}/pools", self.list_pools)
        r.add_get(f"{PREFIX}/pools/{{name}}", self.get_pool)
        r.add_put(f"{PREFIX}/pools/{{name}}", self.put_pool)
        r.add_delete(f"{PREFIX}/pools/{{name}}", self.delete_pool)
        ent = f"{PREFIX}/entitlements/{{ptype}}/{{domain}}/{{principal}}/{{rtype}}/{{resource}}"
        r.add_get(f"{PREFIX}/entitlements", self.list_entitlements)
        r.add_get(ent, self.get_entitlement)
        r.add_put(ent, self.put_entitlement)
        r.add_delete(ent, self.delete_entitlement)
        r.add_get(f"{PREFIX}/assignments", self.list_assignments)
        r.add_get(f"{PREFIX}/assignments/{{pool}}/{{domain}}/{{user}}", self.get_assignment)
        r.add_delete(f"{PREFIX}/assignments/{{pool}}/{{domain}}/{{user}}", self.delete_assignment)
        r.add_get(f"{PREFIX}/agents", self.list_agents)
        r.add_get(f"{PREFIX}/sites", self.list_sites)
        r.add_post(f"{PREFIX}/agents/report", self.agent_report)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Token check and JSON errors for everything under /api/v1."""
        if not request.path.startswith(PREFIX + "/") and request.path != PREFIX:
            return await handler(request)
        is_report = request.path == f"{PREFIX}/agents/report"
        if is_report:
            # Authenticated by the agent's certificate in agent_report, never by a token.
            return await self._api(request, handler)
        if not bearer_ok(request, self.settings.admin_token):
            log.warning(
                "API request refused: missing or wrong bearer token",
                extra={"path": request.path, "peer": request.remote},
            )
            response = error_response(401, "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = 'Bearer realm="gatehouse-broker"'
            return response
        return await self._api(request, handler)

    async def _api(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.field)
        except web.HTTPNotFound:
            return error_response(404, f"no such endpoint: {request.method} {request.path}")
        except web.HTTPMethodNotAllowed:
            return error_response(405, f"method {request.method} not allowed on {request.path}")
        except self.store.db.integrity_errors as exc:
            return error_response(409, f"conflicts with existing data: {exc}")
        except passwords.HasherBusy:
            self.metrics.password_hash_busy.inc()
            response = error_response(503, "password hashing is busy; try again")
            response.headers["Retry-After"] = "1"
            return response
        except web.HTTPException:
            raise
        except Exception:
            log.exception("API request failed", extra={"path": request.path})
            return error_response(500, "internal error; see the broker log")

    # ------------------------------------------------------------ helpers

    def _domain(self, request: web.Request, *, for_write: bool = False) -> str:
        requested = request.match_info["domain"]
        for domain in self.settings.domains:
            if domain.lower() == requested.lower():
                return domain
        for domain in self.store.list_domains():
            if domain.lower() == requested.lower() and not for_write:
                return domain
        if for_write:
            raise ApiError(
                400,
                f"domain: {requested!r} is not one of the configured Domains ({', '.join(self.settings.domains)})",
                "domain",
            )
        raise ApiError(404, f"domain {requested!r} does not exist")

    @staticmethod
    def _found(obj: Obj | None, what: str) -> web.Response:
        if obj is None:
            raise ApiError(404, f"{what} does not exist")
        return web.json_response(obj)

    def _write(
        self,
        request: web.Request,
        kind: str,
        get: Callable[[], Obj | None],
        apply: Callable[[], None],
        extra_change: bool = False,
    ) -> web.Response:
        """Run ``apply`` (rolled back in check mode) and answer changed/diff from ``get``."""
        check = check_mode(request)
        before = get()
        with self.store.db.transaction(rollback=check):
            apply()
            after = get()
        changed = before != after or extra_change
        if changed and not check:
            log.info(
                "%s %s",
                kind,
                "deleted" if after is None else "created" if before is None else "updated",
                extra={"object": _label(after or before)},
            )
        return web.json_response(
            {"changed": changed, "check_mode": check, kind: after, "diff": {"before": before, "after": after}}
        )

    # ------------------------------------------------------------ domains, users

    async def list_domains(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"domains": list(self.settings.domains), "default": self.settings.domains[0]}
        )

    async def list_users(self, request: web.Request) -> web.Response:
        return web.json_response({"users": self.store.list_users(request.query.get("domain"))})

    async def get_user(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        return self._found(self.store.get_user(domain, name), f"user {domain}\\{name}")

    async def put_user(self, request: web.Request) -> web.Response:
        domain = self._domain(request, for_write=True)
        name = check_name(request.match_info["name"], "name")
        body = await read_json(request, allow_empty=True)
        _only(body, {"display_name", "enabled", "groups", "password"})
        fields: Obj = {}
        if "display_name" in body:
            fields["display_name"] = _text(body, "display_name")
        if "enabled" in body:
            fields["enabled"] = _type(body, "enabled", bool, "true or false")
        if "groups" in body:
            fields["groups"] = _names(body, "groups")
            missing = [g for g in fields["groups"] if self.store.group_id(domain, g) is None]
            if missing:
                raise ApiError(400, f"groups: no such group in {domain}: {', '.join(missing)}", "groups")
        new_hash: str | None = None
        source = self.settings.source(domain)
        if "password" in body and source == SOURCE_LDAP:
            raise ApiError(
                400,
                f"password: users of {domain} are checked in its directory (Domain.{domain}.Source = ldap) "
                "and have no broker password",
                "password",
            )
        if "password" in body:
            password = _type(body, "password", str, "a string")
            if not password or len(password) > MAX_PASSWORD:
                raise ApiError(400, f"password: must be 1-{MAX_PASSWORD} characters", "password")
            record = self.store.user_record(domain, name)
            current = record.password_hash if record else None
            # Verify only against a stored hash: a new user or one without a password needs no scrypt.
            if not current or not await self.hasher.verify(password, current):
                new_hash = await self.hasher.hash(password)
        response = self._write(
            request,
            "user",
            lambda: self.store.get_user(domain, name),
            lambda: self.store.put_user(domain, name, fields, new_hash, source),
            extra_change=new_hash is not None,
        )
        return _add(response, password_changed=new_hash is not None)

    async def delete_user(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        return self._write(
            request,
            "user",
            lambda: self.store.get_user(domain, name),
            lambda: self.store.delete_user(domain, name),
        )

    async def check_password(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        body = await read_json(request)
        _only(body, {"password"})
        if "password" not in body:
            raise ApiError(400, "password: required", "password")
        password = _type(body, "password", str, "a string")
        record = self.store.user_record(domain, name)
        if record is None:
            raise ApiError(404, f"user {domain}\\{name} does not exist")
        match = await self.hasher.verify(password, record.password_hash)
        return web.json_response({"match": match, "password_set": record.password_hash is not None})

    async def enroll_totp(self, request: web.Request) -> web.Response:
        """A new TOTP secret for the user (replacing any earlier one); its URI is answered once."""
        domain = self._domain(request, for_write=True)
        name = request.match_info["name"]
        _only(await read_json(request, allow_empty=True), set())
        factor = self.settings.factor
        if factor.kind != FACTOR_TOTP or not factor.totp_key:
            raise ApiError(
                409,
                f"TOTP enrollment needs SecondFactor = totp and TotpKeyFile (SecondFactor is {factor.kind})",
                "SecondFactor",
            )
        record = self.store.user_record(domain, name)
        if record is None:
            raise ApiError(404, f"user {domain}\\{name} does not exist")
        check = check_mode(request)
        body: Obj = {"changed": True, "check_mode": check}
        if not check:
            secret = factors.new_secret()
            with self.store.db.transaction():
                self.store.set_totp(record.id, factors.encrypt_secret(factor.totp_key, record.id, secret))
            body["otpauth_uri"] = factors.provisioning_uri(
                secret, f"{record.domain}\\{record.name}", factor.totp_issuer
            )
            del secret
            log.info("TOTP secret enrolled", extra={"object": f"{record.domain}\\{record.name}"})
        response = web.json_response(body, status=200 if check else 201)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def delete_totp(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        record = self.store.user_record(domain, name)
        enrolled = record is not None and self.store.totp(record.id) is not None
        check = check_mode(request)
        if enrolled and record is not None:
            with self.store.db.transaction(rollback=check):
                self.store.delete_totp(record.id)
            if not check:
                log.info("TOTP secret removed", extra={"object": f"{record.domain}\\{record.name}"})
        return web.json_response({"changed": enrolled, "check_mode": check})

    # ------------------------------------------------------------ groups

    async def list_groups(self, request: web.Request) -> web.Response:
        return web.json_response({"groups": self.store.list_groups(request.query.get("domain"))})

    async def get_group(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        return self._found(self.store.get_group(domain, name), f"group {domain}\\{name}")

    async def put_group(self, request: web.Request) -> web.Response:
        domain = self._domain(request, for_write=True)
        name = check_name(request.match_info["name"], "name")
        body = await read_json(request, allow_empty=True)
        _only(body, {"description"})
        fields = {"description": _text(body, "description")} if "description" in body else {}
        return self._write(
            request,
            "group",
            lambda: self.store.get_group(domain, name),
            lambda: self.store.put_group(domain, name, fields),
        )

    async def delete_group(self, request: web.Request) -> web.Response:
        domain, name = self._domain(request), request.match_info["name"]
        return self._write(
            request,
            "group",
            lambda: self.store.get_group(domain, name),
            lambda: self.store.delete_group(domain, name),
        )

    # ------------------------------------------------------------ desktops

    async def list_desktops(self, request: web.Request) -> web.Response:
        return web.json_response({"desktops": self.store.list_desktops()})

    async def get_desktop(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return self._found(self.store.get_desktop(name), f"desktop {name}")

    async def put_desktop(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "name")
        body = await read_json(request)
        _only(body, DESKTOP_FIELDS)
        fields: Obj = {}
        if "address" in body:
            fields["address"] = _address(body, "address")
        elif self.store.desktop_record(name) is None:
            raise ApiError(400, "address: required when creating a desktop", "address")
        if "hostname" in body:
            fields["hostname"] = _text(body, "hostname", 253)
        for key in ("agent_port", "session_port"):
            if key in body:
                fields[key] = _port(body, key)
        if "enabled" in body:
            fields["enabled"] = _type(body, "enabled", bool, "true or false")
        if "logon" in body:
            fields["logon"] = _type(body, "logon", str, "a string")
            if fields["logon"] not in protocol.LOGONS:
                raise ApiError(400, f"logon: must be one of {', '.join(protocol.LOGONS)}", "logon")
        if "agent_ca_pem" in body:
            fields["agent_ca_pem"] = _ca_pem(body, "agent_ca_pem")
        if "agent_cert_sha256" in body:
            fields["agent_cert_sha256"] = _sha256(body, "agent_cert_sha256")
        if "site" in body:
            try:
                fields["site"] = sites.check_site(_type(body, "site", str, "a site name or ''"))
            except ValueError as exc:
                raise ApiError(400, str(exc), "site") from None
        current = self.store.get_desktop(name) or {}
        if all(fields.get(k, current.get(k)) for k in ("agent_ca_pem", "agent_cert_sha256")):
            raise ApiError(
                400,
                "agent_ca_pem and agent_cert_sha256 are mutually exclusive: clear one with an empty string",
                "agent_ca_pem",
            )
        if "pool" in body:
            pool = body["pool"]
            if pool is not None and pool != "":
                pool = check_name(_type(body, "pool", str, "a pool name or null"), "pool")
                if self.store.pool_id(pool) is None:
                    raise ApiError(400, f"pool: no such pool {pool!r}", "pool")
            fields["pool"] = pool or None
        return self._write(
            request,
            "desktop",
            lambda: self.store.get_desktop(name),
            lambda: self.store.put_desktop(name, fields),
        )

    async def delete_desktop(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return self._write(
            request,
            "desktop",
            lambda: self.store.get_desktop(name),
            lambda: self.store.delete_desktop(name),
        )

    # ------------------------------------------------------------ pools

    async def list_pools(self, request: web.Request) -> web.Response:
        return web.json_response({"pools": self.store.list_pools()})

    async def get_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return self._found(self.store.get_pool(name), f"pool {name}")

    async def put_pool(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], "name")
        body = await read_json(request, allow_empty=True)
        _only(body, {"persistent", "description", "members"})
        fields: Obj = {}
        if "persistent" in body:
            fields["persistent"] = _type(body, "persistent", bool, "true or false")
        if "description" in body:
            fields["description"] = _text(body, "description")
        if "members" in body:
            fields["members"] = _names(body, "members")
            missing = [d for d in fields["members"] if self.store.desktop_record(d) is None]
            if missing:
                raise ApiError(400, f"members: no such desktop: {', '.join(missing)}", "members")
        return self._write(
            request,
            "pool",
            lambda: self.store.get_pool(name),
            lambda: self.store.put_pool(name, fields),
        )

    async def delete_pool(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return self._write(
            request, "pool", lambda: self.store.get_pool(name), lambda: self.store.delete_pool(name)
        )

    # ------------------------------------------------------------ entitlements

    def _ent_key(self, request: web.Request, *, for_write: bool) -> tuple[str, str, str, str, str]:
        info = request.match_info
        ptype, rtype = info["ptype"], info["rtype"]
        if ptype not in PRINCIPAL_TYPES:
            raise ApiError(
                400, "principal_type: must be 'user', 'group' or 'directory-group'", "principal_type"
            )
        if rtype not in ("desktop", "pool"):
            raise ApiError(400, "resource_type: must be 'desktop' or 'pool'", "resource_type")
        domain = self._domain(request)
        key = (ptype, domain, info["principal"], rtype, info["resource"])
        if for_write and ptype == DIRECTORY_GROUP:
            domain = self._domain(request, for_write=True)
            key = (ptype, domain, _directory_group(info["principal"]), rtype, info["resource"])
            if self.settings.source(domain) != SOURCE_LDAP:
                raise ApiError(
                    400,
                    f"principal_type: directory-group entitlements need a domain whose source is ldap "
                    f"(Domain.{domain}.Source is {self.settings.source(domain)})",
                    "principal_type",
                )
        elif for_write:
            principal = (
                self.store.get_user(domain, key[2])
                if ptype == "user"
                else self.store.get_group(domain, key[2])
            )
            if principal is None:
                raise ApiError(404, f"{ptype} {domain}\\{key[2]} does not exist")
        if for_write:
            resource = self.store.get_desktop(key[4]) if rtype == "desktop" else self.store.get_pool(key[4])
            if resource is None:
                raise ApiError(404, f"{rtype} {key[4]} does not exist")
        return key

    async def list_entitlements(self, request: web.Request) -> web.Response:
        allowed = {"principal_type", "domain", "principal", "resource_type", "resource"}
        filters = {k: v for k, v in request.query.items() if k in allowed}
        return web.json_response({"entitlements": self.store.list_entitlements(filters)})

    async def get_entitlement(self, request: web.Request) -> web.Response:
        key = self._ent_key(request, for_write=False)
        return self._found(self.store.get_entitlement(key), "entitlement")

    async def put_entitlement(self, request: web.Request) -> web.Response:
        key = self._ent_key(request, for_write=True)
        _only(await read_json(request, allow_empty=True), set())
        return self._write(
            request,
            "entitlement",
            lambda: self.store.get_entitlement(key),
            lambda: self.store.put_entitlement(key),
        )

    async def delete_entitlement(self, request: web.Request) -> web.Response:
        key = self._ent_key(request, for_write=False)
        return self._write(
            request,
            "entitlement",
            lambda: self.store.get_entitlement(key),
            lambda: self.store.delete_entitlement(key),
        )

    # ------------------------------------------------------------ assignments, agents

    async def list_assignments(self, request: web.Request) -> web.Response:
        return web.json_response({"assignments": self.store.list_assignments(request.query.get("pool"))})

    async def get_assignment(self, request: web.Request) -> web.Response:
        info = request.match_info
        return self._found(
            self.store.get_assignment(info["pool"], self._domain(request), info["user"]), "assignment"
        )

    async def delete_assignment(self, request: web.Request) -> web.Response:
        info = request.match_info
        domain = self._domain(request)
        return self._write(
            request,
            "assignment",
            lambda: self.store.get_assignment(info["pool"], domain, info["user"]),
            lambda: self.store.delete_assignment(info["pool"], domain, info["user"]),
        )

    async def list_agents(self, request: web.Request) -> web.Response:
        now = time.time()
        agents = []
        for report in self.store.list_reports():
            age = max(0.0, now - report["reported_at"])
            agents.append(
                {**report, "age_seconds": round(age, 1), "stale": age > self.settings.agent_stale_after}
            )
        return web.json_response({"agents": agents})

    async def list_sites(self, request: web.Request) -> web.Response:
        """Each site named by a desktop: ``up``, ``down`` (placement.down_sites) or ``unknown``
        (none of its desktops ever reported), with the age of its latest report."""
        now = time.time()
        listed = self.store.list_sites()
        down = placement.down_sites(
            {s["name"]: s["last_report"] for s in listed if s["last_report"] is not None},
            now,
            self.settings.agent_stale_after,
        )
        answer = []
        for site in listed:
            last = site.pop("last_report")
            state = "unknown" if last is None else "down" if site["name"] in down else "up"
            age = None if last is None else round(max(0.0, now - last), 1)
            answer.append({**site, "state": state, "last_report_age_seconds": age})
        return web.json_response({"sites": answer})

    def _refuse_report(
        self, request: web.Request, reason: str, message: str, **extra: object
    ) -> web.Response:
        self.metrics.agent_reports_refused.labels(reason).inc()
        log.warning("agent load report refused: %s", message, extra={"peer": request.remote, **extra})
        return error_response(403, message)

    async def agent_report(self, request: web.Request) -> web.Response:
        verify = self.settings.client_tls_verify
        ssl_object = peer_ssl_object(request)
        if verify and "agent" not in tls.peer_roles(ssl_object):
            return self._refuse_report(
                request, "no_agent_certificate", "a Gatehouse agent certificate is required"
            )
        body = await read_json(request)
        for key in ("address", "agent_port", "session_port", "active_sessions", "capacity"):
            if key not in body:
                raise ApiError(400, f"{key}: required", key)
        report = {
            "address": _address(body, "address"),
            "hostname": _text(body, "hostname", 253).lower() if "hostname" in body else "",
            "agent_port": _port(body, "agent_port"),
            "session_port": _port(body, "session_port"),
        }
        for key in ("active_sessions", "capacity"):
            value = _type(body, key, int, "a non-negative integer")
            if value < 0:
                raise ApiError(400, f"{key}: must be a non-negative integer", key)
            report[key] = value
        claimed = {_canonical(report["address"])}
        if report["hostname"]:
            claimed.add(_canonical(report["hostname"]))
        # ClientTlsVerify=false (warned at start): any caller may report for a registered desktop.
        names = claimed & {_canonical(n) for n in tls.peer_addresses(ssl_object)} if verify else claimed
        where = {k: report[k] for k in ("address", "hostname", "agent_port")}
        if not names:
            return self._refuse_report(
                request,
                "address_not_in_certificate",
                "the reported address and hostname are not in the agent's certificate",
                **where,
            )
        # Only desktops whose registered address the certificate names: one agent cannot speak
        # for another desktop, and reports for unregistered addresses store nothing.
        desktops = [
            d
            for d in self.store.report_desktops(report["address"], report["hostname"], report["agent_port"])
            if _canonical(d.address) in names
        ]
        if not desktops:
            return self._refuse_report(
                request, "unknown_desktop", "no registered desktop has this address and agent port", **where
            )
        with self.store.db.transaction():
            self.store.record_report([d.id for d in desktops], report, time.time())
        self.metrics.agent_reports.inc()
        log.debug(
            "agent load report",
            extra={k: report[k] for k in ("address", "agent_port", "active_sessions", "capacity")},
        )
        return web.Response(status=204)


def _directory_group(value: str) -> str:
    """A directory group's CN or DN as an entitlement names it (compared case-insensitively)."""
    if (
        not value
        or len(value) > MAX_DIRECTORY_GROUP
        or value != value.strip()
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    ):
        raise ApiError(
            400,
            f"principal: a group name or DN of 1-{MAX_DIRECTORY_GROUP} characters without control "
            "characters or outer spaces",
            "principal",
        )
    return value


def _label(obj: Obj | None) -> str:
    if not obj:
        return ""
    if "principal" in obj:
        return f"{obj['principal_type']} {obj['domain']}\\{obj['principal']} -> {obj['resource_type']} {obj['resource']}"
    if "user" in obj and "pool" in obj:
        return f"{obj['pool']}: {obj['domain']}\\{obj['user']}"
    if "domain" in obj:
        return f"{obj['domain']}\\{obj['name']}"
    return str(obj.get("name", ""))


def _add(response: web.Response, **fields: Any) -> web.Response:
    body = json.loads(response.body)  # type: ignore[arg-type]
    body.update(fields)
    return web.json_response(body, status=response.status)
