"""Directory logins for the domains whose ``Domain.<D>.Source`` is ``ldap`` (ldap3, synchronous).

Public functions (the integration tests call them against a real slapd):

- :func:`user_filter` and :func:`group_filter`: the search filters for a login, every value
  escaped with ``ldap3.utils.conv.escape_filter_chars`` (RFC 4515).
- :func:`login`: ``login(settings, username, password)`` checks one login and blocks; it returns
  a :class:`LoginResult`: a :class:`DirectoryUser`, or the failure ``invalid`` (wrong user or
  password: counted like a wrong password), ``unavailable`` (no server answered, TLS failed,
  the service account was refused: the user is not to blame) or ``refused`` (``admit`` refused
  the account the name resolved to: nothing was checked).
- :class:`Directory`: one per domain, ``await directory.authenticate(username, password, admit)``
  runs :func:`login` on its own ``LdapPoolSize`` threads; at most :data:`WAIT_PER_THREAD` checks
  per thread wait, a check beyond that raises :class:`DirectoryBusy` at once (answered "busy").
- :func:`check`: the deploy-time check, a service bind (and a read of ``LdapBaseDn``) on every
  server, one :class:`CheckLine` each.

A login: (a) an empty password is refused before any LDAP request (a simple bind with an empty
password is an unauthenticated bind that servers answer with success); (b) bind with the service
account and search ``LdapBaseDn`` for exactly one entry matching ``(&<LdapUserFilter>(<attr>=<name>))``
(``(|(<attr>=<name>)(userPrincipalName=<name>))`` when the name holds ``@``); (c) ask ``admit``
(when given) whether the account found, by its ``<attr>`` value (its DN without one), may be
checked: several names can find one entry, and the login throttle counts the account, not the
name; refused, the login ends with a decoy bind, the same work as a wrong password; (d) bind as
that entry's DN with the password on a new connection (the service connection never carries the
user's bind); (e) read the groups as ``LdapGroupMode`` says. Bound service connections are kept
for the next logins (:class:`ServicePool`); one the server closed meanwhile is replaced once. Group names are kept lower-case, as
full DNs and as CNs, for the case-insensitive match of directory-group entitlements.

Servers are tried in the order of ``LdapServers``; one that cannot be reached, times out or fails
TLS is tried last for :data:`DOWN_FOR` seconds (what an ldap3 ``ServerPool`` with the FIRST
strategy, ``active`` and ``exhaust`` does; done here because the pool's availability probe is a
bare TCP connect, so a TLS failure would not fail over, and its state is not thread-safe).
Every connection verifies the server certificate (``ssl.CERT_REQUIRED``, ``LdapCaCert`` or the
system trust store) and its host name; ``ldap://`` uses StartTLS unless ``LdapAllowPlain``.
Nothing here logs or returns the password or the bind password.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldap3 import BASE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from gatehouse.broker.settings import DirectorySettings, LdapServer
from gatehouse.broker.workers import BoundedPool, Busy

INVALID = "invalid"
UNAVAILABLE = "unavailable"
REFUSED = "refused"
DOWN_FOR = 30.0
POOL_IDLE = 60.0  # seconds an idle service connection is kept for reuse
WAIT_PER_THREAD = 8
MAX_USERNAME = 256
MAX_PASSWORD = 1024
MAX_GROUPS = 1000
NEST_DEPTH = 8  # levels of groups in groups followed in the memberof and search modes
NEST_CHUNK = 50  # groups per search filter while following the nesting
AD_NESTED_RULE = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested membership in AD
# Bind results that say the server, not the credentials, failed: busy, unavailable, other.
_SERVER_TROUBLE = {3, 51, 52, 80}
_HEX_ESCAPE = re.compile(r"\\([0-9A-Fa-f]{2}|.)")


@dataclass(frozen=True)
class DirectoryUser:
    """A user the directory authenticated: ``name`` is the value of ``LdapUserAttribute`` (the
    account name the broker's user row is keyed by); ``groups`` holds lower-case DNs and CNs."""

    dn: str
    name: str
    display_name: str = ""
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoginResult:
    user: DirectoryUser | None = None
    failure: str = ""  # INVALID, UNAVAILABLE or REFUSED when user is None
    detail: str = ""  # for the log: what failed, never a secret

    @property
    def ok(self) -> bool:
        return self.user is not None


@dataclass(frozen=True)
class CheckLine:
    """One line of ``--check-identity``: what was checked and how it went."""

    ok: bool
    text: str


class DirectoryBusy(Busy):
    """Every directory thread of the domain is busy and the wait queue is full."""


class _ServerDown(Exception):
    """This server cannot be used now (connect, TLS, timeout): try the next one."""


# ---------------------------------------------------------------- filters


def user_filter(settings: DirectorySettings, username: str) -> str:
    """The search filter for ``username``: LdapUserFilter ANDed with the escaped name."""
    value = escape_filter_chars(username)
    match = f"({settings.user_attribute}={value})"
    if "@" in username:
        match = f"(|{match}(userPrincipalName={value}))"
    return f"(&{settings.user_filter}{match})"


def group_filter(settings: DirectorySettings, user_dn: str, account: str) -> str | None:
    """The group search filter of LdapGroupMode (None for ``memberof``: no search)."""
    dn = escape_filter_chars(user_dn)
    if settings.group_mode == "ad-nested":
        return f"(member:{AD_NESTED_RULE}:={dn})"
    if settings.group_mode == "search":
        return f"(|(member={dn})(uniqueMember={dn})(memberUid={escape_filter_chars(account)}))"
    return None


def precheck(username: str, password: str) -> LoginResult | None:
    """The refusal of a login that must not reach the directory, or None.

    An empty password would make the user bind an unauthenticated bind, which succeeds.
    """
    if not password:
        return LoginResult(failure=INVALID, detail="empty password refused before any LDAP request")
    if not username or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
        return LoginResult(failure=INVALID, detail="user name or password of an impossible length")
    return None


def _unescape(value: str) -> str:
    def one(match: re.Match[str]) -> str:
        text = match.group(1)
        return chr(int(text, 16)) if len(text) == 2 else text

    return _HEX_ESCAPE.sub(one, value)


def group_names(dns: list[str]) -> frozenset[str]:
    """Lower-case DNs of the groups and the CN of each (its first RDN when that is ``cn=``)."""
    names: set[str] = set()
    for dn in dns[:MAX_GROUPS]:
        names.add(dn.lower())
        with contextlib.suppress(LDAPException, ValueError, IndexError):
            attr, value, _sep = parse_dn(dn)[0]
            if attr.lower() == "cn":
                names.add(_unescape(value).lower())
    return frozenset(names)


# ---------------------------------------------------------------- connections


class ServerHealth:
    """When each server last failed; a server that failed within DOWN_FOR seconds is tried last."""

    def __init__(self) -> None:
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()

    def order(self, servers: tuple[LdapServer, ...], now: float | None = None) -> list[LdapServer]:
        now = time.monotonic() if now is None else now
        with self._lock:
            up = [s for s in servers if self._down.get(s.url, 0.0) <= now]
        return up + [s for s in servers if s not in up]

    def failed(self, server: LdapServer) -> None:
        with self._lock:
            self._down[server.url] = time.monotonic() + DOWN_FOR

    def worked(self, server: LdapServer) -> None:
        with self._lock:
            self._down.pop(server.url, None)


class ServicePool:
    """Bound service-account connections, kept per server for the next logins.

    At most ``size`` idle connections per server, none older than :data:`POOL_IDLE` seconds (a
    server drops idle connections on its own schedule: Active Directory after 15 minutes). A
    connection is in the pool or in one login's hands, never both.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: dict[str, list[tuple[float, Connection]]] = {}
        self._lock = threading.Lock()

    def take(self, server: LdapServer) -> Connection | None:
        now = time.monotonic()
        stale: list[Connection] = []
        found = None
        with self._lock:
            idle = self._idle.get(server.url, [])
            while idle:
                since, conn = idle.pop()
                if now - since <= POOL_IDLE and not conn.closed:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            _close(conn)
        return found

    def give(self, server: LdapServer, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(server.url, [])
            if len(idle) < self.size:
                idle.append((time.monotonic(), conn))
                return
        _close(conn)

    def drop(self, server: LdapServer | None = None) -> None:
        """Close the idle connections of ``server`` (of every server when None)."""
        with self._lock:
            if server is None:
                gone = [c for idle in self._idle.values() for _t, c in idle]
                self._idle.clear()
            else:
                gone = [c for _t, c in self._idle.pop(server.url, [])]
        for conn in gone:
            _close(conn)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tls(settings: DirectorySettings, server: LdapServer) -> Tls:
    # version=None: ldap3 builds ssl.create_default_context (TLS 1.2 or later), then checks the host name.
    return Tls(
        validate=ssl.CERT_REQUIRED,
        ca_certs_file=settings.ca_cert or None,
        sni=None if _is_ip(server.host) else server.host,
    )


def describe(exc: BaseException, settings: DirectorySettings) -> str:
    """A short reason for a failure, with any bind password blanked out."""
    text = str(exc)
    lowered = text.lower()
    if "certificate" in lowered or "ssl" in lowered or isinstance(exc, LDAPStartTLSError):
        kind = "TLS failure"
        if "doesn't match" in lowered or "match any name" in lowered:
            text = "the certificate does not name the server"
    elif "timed out" in lowered or "timeout" in lowered:
        kind = "timeout"
    else:
        kind = "cannot connect"
    text = text.replace(settings.bind_password, "***") if settings.bind_password else text
    return f"{kind}: {text[:240]}"


def _open(settings: DirectorySettings, server: LdapServer, user: str, password: str) -> Connection:
    """An open connection (TLS as configured) to ``server``, not yet bound; raises _ServerDown."""
    starttls = not server.use_ssl and not settings.allow_plain
    tls = _tls(settings, server) if server.use_ssl or starttls else None
    srv = Server(
        server.host,
        port=server.port,
        use_ssl=server.use_ssl,
        tls=tls,
        get_info=NONE,
        connect_timeout=settings.timeout,
    )
    conn = Connection(
        srv,
        user=user,
        password=password,
        authentication=SIMPLE,
        read_only=True,
        raise_exceptions=False,
        auto_referrals=False,
        receive_timeout=settings.timeout,
    )
    try:
        conn.open()
        # ldap3 leaves Nagle on: a bind's small writes then wait ~40 ms for a delayed ACK.
        conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if starttls and not conn.start_tls():
            raise _ServerDown("TLS failure: StartTLS was refused")
    except LDAPException as exc:
        _close(conn)
        raise _ServerDown(describe(exc, settings)) from None
    except OSError as exc:
        _close(conn)
        raise _ServerDown(f"cannot connect: {exc}") from None
    return conn


def _bind(conn: Connection, settings: DirectorySettings) -> tuple[bool, int]:
    """Bind; (ok, LDAP result code). A lost connection raises _ServerDown."""
    try:
        ok = bool(conn.bind())
    except LDAPException as exc:
        raise _ServerDown(describe(exc, settings)) from None
    return ok, int((conn.result or {}).get("result", 80))


def _close(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.unbind()


def _search(conn: Connection, settings: DirectorySettings, base: str, filt: str, **kwargs: Any) -> list[Any]:
    try:
        conn.search(base, filt, time_limit=settings.timeout, **kwargs)
    except LDAPException as exc:
        raise _ServerDown(describe(exc, settings)) from None
    return [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]


def _values(entry: dict[str, Any], attribute: str) -> list[str]:
    raw = entry.get("raw_attributes", {})
    for name, values in raw.items():
        if name.lower() == attribute.lower():
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return []


# ---------------------------------------------------------------- login


def login(
    settings: DirectorySettings,
    username: str,
    password: str,
    health: ServerHealth | None = None,
    pool: ServicePool | None = None,
    admit: Callable[[str], bool] | None = None,
) -> LoginResult:
    """Check one login against the directory (blocking; see the module docstring for the steps)."""
    refused = precheck(username, password)
    if refused is not None:
        return refused
    health = health or ServerHealth()
    reasons: list[str] = []
    for server in health.order(settings.servers):
        try:
            result = _login_on(settings, server, username, password, pool, admit)
        except _ServerDown as exc:
            health.failed(server)
            if pool is not None:
                pool.drop(server)
            reasons.append(f"{server.url}: {exc}")
            continue
        health.worked(server)
        return result
    return LoginResult(failure=UNAVAILABLE, detail="; ".join(reasons)[:1000])


def _login_on(
    settings: DirectorySettings,
    server: LdapServer,
    username: str,
    password: str,
    pool: ServicePool | None = None,
    admit: Callable[[str], bool] | None = None,
) -> LoginResult:
    """The login on one server, with a pooled service connection when there is one.

    A pooled connection the server has closed meanwhile (idle timeout, restart) fails its search:
    the login is tried once more on a new connection before the server counts as down.
    """
    while True:
        service = pool.take(server) if pool is not None else None
        pooled = service is not None
        if service is None:
            service = _open(settings, server, settings.bind_dn, settings.bind_password)
            try:
                ok, code = _bind(service, settings)
            except BaseException:
                _close(service)
                raise
            if not ok:
                _close(service)
                if code == 49:
                    return LoginResult(
                        failure=UNAVAILABLE, detail=f"invalid credentials for {settings.bind_dn}"
                    )
                raise _ServerDown(f"service bind refused (LDAP result {code})")
        try:
            result = _as_user(settings, server, service, username, password, admit)
        except _ServerDown:
            _close(service)
            if pooled:
                continue
            raise
        except BaseException:
            _close(service)
            raise
        if pool is not None:
            pool.give(server, service)
        else:
            _close(service)
        return result


def _as_user(
    settings: DirectorySettings,
    server: LdapServer,
    service: Connection,
    username: str,
    password: str,
    admit: Callable[[str], bool] | None = None,
) -> LoginResult:
    """Search the user with the (bound) service connection, ask ``admit``, bind as the user, read
    the groups."""
    attributes = [settings.user_attribute, "displayName", "cn"]
    if settings.group_mode == "memberof":
        attributes.append("memberOf")
    entries = _search(
        service,
        settings,
        settings.base_dn,
        user_filter(settings, username),
        search_scope=SUBTREE,
        attributes=attributes,
        size_limit=2,
    )
    code = int((service.result or {}).get("result", 0))
    if code == 32:
        return LoginResult(failure=UNAVAILABLE, detail=f"LdapBaseDn {settings.base_dn} does not exist")
    if code not in (0, 4):  # 4: sizeLimitExceeded, i.e. more than one match
        raise _ServerDown(f"user search failed (LDAP result {code})")
    if len(entries) != 1:
        # The same work as a wrong password (a connection and a failing bind), so the answer's
        # timing does not tell an unknown name from a known one.
        _decoy_bind(settings, server, password)
        what = "no entry" if not entries else "more than one entry"
        return LoginResult(failure=INVALID, detail=f"{what} matches the user name")
    entry = entries[0]
    dn = entry["dn"]
    name = next(iter(_values(entry, settings.user_attribute)), "")
    if admit is not None and not admit(name or dn):
        # The work of a wrong password: the timing does not tell which names find an account.
        _decoy_bind(settings, server, password)
        return LoginResult(failure=REFUSED, detail="refused for the account the name resolves to")
    # A fresh connection for the user's bind: the service connection keeps its own identity.
    user_conn = _open(settings, server, dn, password)
    try:
        ok, code = _bind(user_conn, settings)
    finally:
        _close(user_conn)
    if not ok:
        if code in _SERVER_TROUBLE:
            raise _ServerDown(f"user bind failed (LDAP result {code})")
        return LoginResult(failure=INVALID, detail=f"user bind refused (LDAP result {code})")
    account = name or username
    display = next(iter(_values(entry, "displayName") or _values(entry, "cn")), "")
    groups = _groups(service, settings, entry, dn, account)
    return LoginResult(DirectoryUser(dn, account, display, group_names(groups)))


def _decoy_bind(settings: DirectorySettings, server: LdapServer, password: str) -> None:
    """A bind that fails like a wrong password: a DN under LdapBaseDn that no entry has."""
    with contextlib.suppress(_ServerDown):
        conn = _open(settings, server, f"cn=gatehouse-no-such-user,{settings.base_dn}", password)
        try:
            _bind(conn, settings)
        finally:
            _close(conn)


def _groups(
    service: Connection, settings: DirectorySettings, entry: dict[str, Any], dn: str, account: str
) -> list[str]:
    filt = group_filter(settings, dn, account)
    if settings.group_mode == "ad-nested":
        # The server resolves the nesting (LDAP_MATCHING_RULE_IN_CHAIN): one search.
        return [g["dn"] for g in _group_search(service, settings, filt or "")]
    direct = (
        _values(entry, "memberOf")
        if filt is None
        else [g["dn"] for g in _group_search(service, settings, filt)]
    )
    return _nested(service, settings, direct)


def _group_search(service: Connection, settings: DirectorySettings, filt: str) -> list[dict[str, Any]]:
    return _search(
        service,
        settings,
        settings.group_base_dn,
        filt,
        search_scope=SUBTREE,
        attributes=["1.1"],
        size_limit=MAX_GROUPS,
    )


def _nested(service: Connection, settings: DirectorySettings, direct: list[str]) -> list[str]:
    """``direct`` and every group that holds one of them as a member, level by level.

    OpenLDAP has no transitive membership rule: the groups of the groups are searched, at most
    NEST_DEPTH levels and MAX_GROUPS groups; a cycle ends because a group is visited once.
    """
    found = {dn.lower(): dn for dn in direct[:MAX_GROUPS]}
    frontier = list(found.values())
    for _level in range(NEST_DEPTH):
        if not frontier or len(found) >= MAX_GROUPS:
            break
        level, frontier = frontier, []
        for start in range(0, len(level), NEST_CHUNK):
            terms = "".join(
                f"(member={escape_filter_chars(dn)})(uniqueMember={escape_filter_chars(dn)})"
                for dn in level[start : start + NEST_CHUNK]
            )
            for group in _group_search(service, settings, f"(|{terms})"):
                if group["dn"].lower() not in found:
                    found[group["dn"].lower()] = group["dn"]
                    frontier.append(group["dn"])
    return list(found.values())[:MAX_GROUPS]


# ---------------------------------------------------------------- the domain's pool


class Directory(BoundedPool):
    """One domain's directory: logins on ``LdapPoolSize`` threads, at most ``WAIT_PER_THREAD``
    per thread waiting; one more raises :class:`DirectoryBusy` before anything is sent."""

    def __init__(self, settings: DirectorySettings, login_fn: Callable[..., LoginResult] = login) -> None:
        pool = settings.pool_size
        super().__init__(pool, pool * WAIT_PER_THREAD, f"ldap-{settings.domain}", DirectoryBusy)
        self.settings = settings
        self.health = ServerHealth()
        self.connections = ServicePool(pool)
        self._login = login_fn

    async def authenticate(
        self, username: str, password: str, admit: Callable[[str], bool] | None = None
    ) -> LoginResult:
        """:func:`login` on a thread of the domain; ``admit`` runs on the caller's event loop (the
        thread waits for it), so the state it reads needs no lock."""
        refused = precheck(username, password)
        if refused is not None:
            return refused
        gate = None if admit is None else _on_loop(admit, asyncio.get_running_loop(), self.settings.timeout)
        return await self.run(
            self._login, self.settings, username, password, self.health, self.connections, gate
        )

    def close(self) -> None:
        super().close()
        self.connections.drop()


def _on_loop(
    admit: Callable[[str], bool], loop: asyncio.AbstractEventLoop, timeout: float
) -> Callable[[str], bool]:
    """``admit`` called from a directory thread, run on ``loop``; no answer in time refuses."""

    def gate(name: str) -> bool:
        answer: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def ask() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(admit(name))
                except BaseException as exc:
                    answer.set_exception(exc)

        loop.call_soon_threadsafe(ask)
        try:
            return answer.result(timeout)
        except concurrent.futures.TimeoutError:
            # Cancelled before it ran, admit never runs; if it is running, wait for its answer.
            return False if answer.cancel() else answer.result()

    return gate


# ---------------------------------------------------------------- deploy-time check


def check(settings: DirectorySettings) -> list[CheckLine]:
    """Bind with the service account on every server and read LdapBaseDn; one line per server."""
    lines = []
    for server in settings.servers:
        where = f"ldap {settings.domain} {server.url}"
        try:
            conn = _open(settings, server, settings.bind_dn, settings.bind_password)
        except _ServerDown as exc:
            lines.append(CheckLine(False, f"{where}: {exc}"))
            continue
        try:
            ok, code = _bind(conn, settings)
            if not ok:
                reason = (
                    f"invalid credentials for {settings.bind_dn}"
                    if code == 49
                    else f"bind refused (LDAP result {code})"
                )
                lines.append(CheckLine(False, f"{where}: {reason}"))
                continue
            found = _search(
                conn, settings, settings.base_dn, "(objectClass=*)", search_scope=BASE, attributes=["1.1"]
            )
            if not found:
                lines.append(CheckLine(False, f"{where}: LdapBaseDn {settings.base_dn} not found"))
                continue
            tls = (
                "LDAPS"
                if server.use_ssl
                else "plain LDAP (LdapAllowPlain)"
                if settings.allow_plain
                else "StartTLS"
            )
            lines.append(CheckLine(True, f"{where}: bound as {settings.bind_dn} over {tls}"))
        except _ServerDown as exc:
            lines.append(CheckLine(False, f"{where}: {exc}"))
        finally:
            _close(conn)
    return lines
