"""Client sessions of the CM: the per-client state machine and the table that finds a session.

A session is found by its JSESSIONID cookie (a random token, not the session id, renewed at
authentication) or, when a client keeps no cookies, by its ``Client-Log-Id`` header under the
restrictions of :class:`SessionTable`. Each session has a uuid4 session id that goes into every log
line about it and into the broker and agent requests.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from gatehouse import protocol as p
from gatehouse.shared import LocalSlots, LocalSourceSlots, Slots, SourceSlots
from gatehouse.tenants import Tenant
from gatehouse.web import Network, in_networks

COOKIE_BYTES = 32
COOKIE_CHARS = 43  # secrets.token_urlsafe(COOKIE_BYTES)


class State(enum.Enum):
    HELLO = (
        "hello"  # hello answered; authenticate next (each step of a multi-step login, again after a failure)
    )
    AUTHENTICATED = "authenticated"
    LISTED = "listed"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"


# message tag → states in which it is accepted (hello and bye are accepted in any state)
_ALLOWED: dict[str, frozenset[State]] = {
    p.Authenticate.tag: frozenset({State.HELLO}),
    p.GetResourceList.tag: frozenset({State.AUTHENTICATED, State.LISTED}),
    p.AllocateResource.tag: frozenset({State.AUTHENTICATED, State.LISTED}),
    # The owner invites once its desktop session is allocated; a collaborator joins instead of
    # allocating a desktop of its own.
    p.CreateInvitation.tag: frozenset({State.ALLOCATED}),
    p.RedeemInvitation.tag: frozenset({State.AUTHENTICATED, State.LISTED}),
}
_NEEDS_AUTH = {p.GetResourceList.tag, p.AllocateResource.tag, p.CreateInvitation.tag, p.RedeemInvitation.tag}
REQUESTS = {
    p.Hello.tag,
    p.Authenticate.tag,
    p.GetResourceList.tag,
    p.AllocateResource.tag,
    p.CreateInvitation.tag,
    p.RedeemInvitation.tag,
    p.Bye.tag,
}


def check_transition(state: State | None, tag: str) -> None:
    """Raise the ProtocolError a client gets for ``tag`` in ``state`` (None: no session)."""
    if tag not in REQUESTS:
        raise p.ProtocolError(p.E_UNKNOWN, f"<{tag}> is not a request a client can send")
    if tag in (p.Hello.tag, p.Bye.tag):
        return
    if state is not None and state in _ALLOWED[tag]:
        return
    if tag in _NEEDS_AUTH and state in (None, State.HELLO):
        raise p.ProtocolError(p.E_USER_AUTH, f"<{tag}> needs an authenticated session")
    if state is None:
        raise p.ProtocolError(p.E_OUT_OF_STATE, f"<{tag}> needs a session; send <hello> first")
    raise p.ProtocolError(p.E_OUT_OF_STATE, f"<{tag}> is not expected in state {state.value}")


@dataclass(eq=False)
class Session:
    session_id: str
    cookie: str = field(repr=False)
    client_ip: str
    log_id: str = ""
    state: State = State.HELLO
    username: str = ""
    domain: str = ""
    # What the client reported about itself in hello (for the agent's client-name / client-mac).
    client_name: str = ""
    client_mac: str = ""
    # The user's password for the desktop's Windows logon, from a successful password step until the
    # agent call that uses it (or a failed step, or the session's end): see take_password.
    password: bytearray | None = field(default=None, repr=False)
    # The upstream broker's cookies for this client (the CM speaks for one client per broker session).
    broker_cookies: dict[str, str] = field(default_factory=dict, repr=False)
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    auth_failures: int = 0
    # The client has shown its cookie: from then on only the cookie finds the session.
    cookie_seen: bool = False
    # A cookie-less client's session, once authenticated, is bound to the connection that carried
    # the password (an opaque object, compared by identity): see SessionTable.find.
    bound_connection: object | None = field(default=None, repr=False)
    # The desktop session this client is in (set with state ALLOCATED): the agent and the agent's
    # session-id. A collaborator's names the owner's agent session; ``joined`` is then the owner's
    # CM session id, for the logs.
    agent: p.AgentInfo | None = None
    agent_session_id: str = ""
    joined: str = ""
    invitation_failures: int = 0
    # The tenant whose host name the session was opened on (None: a CM without tenants), and that
    # host name: every later request must come through one of this tenant's host names, and the
    # session's broker is this tenant's (docs/tenants.md).
    tenant: Tenant | None = field(default=None, repr=False)
    host_name: str = ""

    @property
    def tenant_name(self) -> str:
        return self.tenant.name if self.tenant is not None else ""

    @property
    def authenticated(self) -> bool:
        # Only SessionTable.authenticated moves a session out of HELLO, and nothing moves it back.
        return self.state is not State.HELLO

    def touch(self, now: float | None = None) -> None:
        self.last_seen = time.monotonic() if now is None else now

    def keep_password(self, password: str) -> None:
        self.forget_password()
        self.password = bytearray(password.encode())

    def take_password(self) -> str | None:
        """The held password, once: the CM's copy is overwritten and dropped as it is handed out."""
        if self.password is None:
            return None
        value = self.password.decode()
        self.forget_password()
        return value

    def forget_password(self) -> None:
        # Overwritten in place, then dropped; copies made by the XML and TLS layers for the one
        # request are freed with it but Python gives no way to wipe them.
        if self.password is not None:
            self.password[:] = bytes(len(self.password))
            self.password = None


class SessionsFull(Exception):
    """A session cap is reached; ``limit`` names it (max_clients, max_pre_auth_sessions_per_source)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class SessionTable:
    """Live client sessions, in two pools with their own caps and lifetimes.

    Invariants:

    - *Unauthenticated* sessions (hello answered, no successful authenticate yet) live at most
      ``pre_auth_timeout`` from their creation, at most ``max_pre_auth`` exist, and at most
      ``max_pre_auth_per_source`` per client address (addresses in ``exempt``, the trusted proxies,
      are not capped per source: they carry many clients). A hello over the per-source cap is
      refused; a hello that finds the pool full evicts the oldest unauthenticated session of the
      source holding the most of them (so a flood from a few addresses evicts itself first, not a
      user in the middle of logging in). Evicted sessions are handed to the server through
      :meth:`take_evicted` so it can end their broker sessions.
    - *Authenticated* sessions are bounded by ``max_clients`` (checked at hello and again at
      authentication) and forgotten after ``idle_timeout`` without a request or
      ``max_lifetime`` after creation, whichever comes first. Anonymous traffic never counts
      against them.
    - With Workers > 1, ``max_clients`` counts the authenticated sessions of every worker (``slots``,
      a shared counter: a slot is taken at authentication and given back when the session goes),
      and every cookie ends in ``tag`` (".<worker>"), which names the worker that holds the
      session (see :func:`owner_of_cookie`); ``max_pre_auth_per_source`` counts every worker's
      sessions too (``sources``). The unauthenticated pool (``max_pre_auth``, the worker's share
      of MaxPreAuthSessions) and its evictions are each worker's.
    - A session is found by its cookie. ``Client-Log-Id`` is a fallback for clients that keep no
      cookies; it is not a secret, so it finds a session only from the address that opened it,
      only while the client has never shown the cookie, and, once the session is authenticated,
      only on the connection that authenticated it.
    """

    def __init__(
        self,
        max_clients: int,
        idle_timeout: float,
        *,
        pre_auth_timeout: float = 60.0,
        max_pre_auth: int = 400,
        max_pre_auth_per_source: int = 16,
        max_lifetime: float = 36000.0,
        exempt: Sequence[Network] = (),
        slots: Slots | None = None,
        sources: SourceSlots | None = None,
        tag: str = "",
    ) -> None:
        self.max_clients = max_clients
        self.slots: Slots = slots if slots is not None else LocalSlots()
        # The unauthenticated sessions per client address (max_pre_auth_per_source).
        self.sources: SourceSlots = sources if sources is not None else LocalSourceSlots()
        self.tag = tag
        self.idle_timeout = idle_timeout
        self.pre_auth_timeout = pre_auth_timeout
        self.max_pre_auth = max_pre_auth
        self.max_pre_auth_per_source = max_pre_auth_per_source
        self.max_lifetime = max_lifetime
        self.exempt = tuple(exempt)
        self._by_cookie: dict[str, Session] = {}
        self._by_log_id: dict[str, Session] = {}
        self._pre: dict[Session, None] = {}  # insertion order = age
        self._pre_by_source: dict[str, dict[Session, None]] = {}
        self._evicted: list[Session] = []
        self.evictions = 0
        self._next_full_sweep = 0.0

    def __len__(self) -> int:
        return len(self._by_cookie)

    @property
    def authenticated_count(self) -> int:
        # Every live session is in _by_cookie; the unauthenticated ones are also in _pre.
        return len(self._by_cookie) - len(self._pre)

    @property
    def pre_auth_count(self) -> int:
        return len(self._pre)

    def sessions(self) -> list[Session]:
        return list(self._by_cookie.values())

    def take_evicted(self) -> list[Session]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def _expired(self, session: Session, now: float) -> bool:
        if not session.authenticated:
            return now - session.created > self.pre_auth_timeout
        return now - session.last_seen > self.idle_timeout or now - session.created > self.max_lifetime

    def _new_cookie(self) -> str:
        return secrets.token_urlsafe(COOKIE_BYTES) + self.tag

    def _full(self) -> SessionsFull:
        return SessionsFull("max_clients", f"{self.max_clients} client sessions are active")

    def _sweep_when_full(self, now: float) -> None:
        # Look for expired sessions at most once a second: a crowd of refused clients must not
        # each pay for a scan of the whole table.
        if now >= self._next_full_sweep:
            self._next_full_sweep = now + 1.0
            self._evicted.extend(self.expire(now))

    def _room_for_user(self, now: float) -> None:
        if self.slots.total() >= self.max_clients:
            self._sweep_when_full(now)
            if self.slots.total() >= self.max_clients:
                raise self._full()

    def create(self, client_ip: str, log_id: str = "", now: float | None = None) -> Session:
        """A new unauthenticated session (see the class invariants for the caps)."""
        now = time.monotonic() if now is None else now
        self._room_for_user(now)
        if not in_networks(client_ip, self.exempt):
            for old in [s for s in self._pre_by_source.get(client_ip, {}) if self._expired(s, now)]:
                self._evicted.append(old)
                self.remove(old)
            if not self.sources.take(client_ip, self.max_pre_auth_per_source):
                raise SessionsFull(
                    "max_pre_auth_sessions_per_source",
                    f"{self.max_pre_auth_per_source} unauthenticated sessions from this address",
                )
        while len(self._pre) >= self.max_pre_auth:
            self._evict_one(now)
        session = Session(
            session_id=str(uuid.uuid4()),
            cookie=self._new_cookie(),
            client_ip=client_ip,
            log_id=log_id,
            created=now,
            last_seen=now,
        )
        self._by_cookie[session.cookie] = session
        self._pre[session] = None
        self._pre_by_source.setdefault(client_ip, {})[session] = None
        if log_id:
            # A newer session of the same client log id wins; the older one stays reachable by cookie.
            self._by_log_id[log_id] = session
        return session

    def _evict_one(self, now: float) -> None:
        oldest = next(iter(self._pre))
        if not self._expired(oldest, now):
            busiest = max(self._pre_by_source.values(), key=len)
            # A session whose authenticate is with the broker right now is passed over if possible.
            oldest = next((s for s in busiest if not s.lock.locked()), next(iter(busiest)))
        self.evictions += 1
        self._evicted.append(oldest)
        self.remove(oldest)

    def alive(self, session: Session, now: float | None = None) -> bool:
        """``session`` is still in the table and within its lifetimes (it is not touched)."""
        if self._by_cookie.get(session.cookie) is not session:
            return False
        return not self._expired(session, time.monotonic() if now is None else now)

    def check_room(self, now: float | None = None) -> None:
        """Raise SessionsFull when no authenticated session can be added (before asking the broker)."""
        self._room_for_user(time.monotonic() if now is None else now)

    def authenticated(self, session: Session, connection: object | None = None) -> str | None:
        """Move ``session`` to the authenticated pool (state AUTHENTICATED) under a new cookie.

        Returns the new cookie (the old one dies), or None when the session was evicted or
        expired meanwhile. ``connection`` identifies the client's connection: a cookie-less
        client's session stays reachable by Client-Log-Id only on it.
        """
        if self._by_cookie.get(session.cookie) is not session:
            return None
        if session.authenticated:
            return session.cookie
        if not self.slots.take(self.max_clients):
            self._sweep_when_full(time.monotonic())
            if not self.slots.take(self.max_clients):
                raise self._full()
        self._drop_pre(session)
        session.state = State.AUTHENTICATED
        del self._by_cookie[session.cookie]
        session.cookie = self._new_cookie()
        self._by_cookie[session.cookie] = session
        session.bound_connection = connection
        return session.cookie

    def find(
        self,
        cookie: str | None,
        log_id: str | None,
        client_ip: str,
        now: float | None = None,
        connection: object | None = None,
    ) -> Session | None:
        """The live session of a request: by cookie, else by Client-Log-Id (see the class invariants)."""
        session = self._by_cookie.get(cookie) if cookie else None
        if session is not None:
            session.cookie_seen = True
        elif log_id:
            candidate = self._by_log_id.get(log_id)
            if (
                candidate is not None
                and candidate.client_ip == client_ip
                and not candidate.cookie_seen
                and (
                    not candidate.authenticated
                    or (candidate.bound_connection is not None and candidate.bound_connection is connection)
                )
            ):
                session = candidate
        if session is None:
            return None
        now = time.monotonic() if now is None else now
        if self._expired(session, now):
            self.remove(session)
            self._evicted.append(session)
            return None
        return session

    def _drop_pre(self, session: Session) -> None:
        if session in self._pre:
            del self._pre[session]
            if not in_networks(session.client_ip, self.exempt):
                self.sources.give(session.client_ip)
            mine = self._pre_by_source.get(session.client_ip)
            if mine is not None:
                mine.pop(session, None)
                if not mine:
                    del self._pre_by_source[session.client_ip]

    def remove(self, session: Session) -> bool:
        removed = self._by_cookie.pop(session.cookie, None) is not None
        if session.log_id and self._by_log_id.get(session.log_id) is session:
            del self._by_log_id[session.log_id]
        if removed:
            if session.authenticated:
                self.slots.give()
            self._drop_pre(session)
        session.bound_connection = None
        session.forget_password()
        return removed

    def expire(self, now: float | None = None) -> list[Session]:
        """Forget expired sessions (pre-auth timeout, idle timeout, maximum lifetime); returns them."""
        now = time.monotonic() if now is None else now
        gone = [s for s in self._by_cookie.values() if self._expired(s, now)]
        for session in gone:
            self.remove(session)
        return gone


class EstablishmentLimiter:
    """At most ``limit`` allocate-resource calls in flight (in all workers, with shared ``slots``);
    the next is refused at once, not queued. ``in_flight`` is this process's."""

    def __init__(self, limit: int, slots: Slots | None = None) -> None:
        self.limit = limit
        self.slots: Slots = slots if slots is not None else LocalSlots()
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if not self.slots.take(self.limit):
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1
            self.slots.give()


def worker_of(value: str | None, token_chars: int, sep: str) -> int | None:
    """The worker index that ``value`` (a random token of ``token_chars`` characters, then
    ``sep`` and the index) names, or None: no value, an untagged one (one process), or any other
    shape. A tag is what a client sends back; the caller checks that the index is one of its own."""
    if not value or len(value) <= token_chars + 1 or value[token_chars] != sep:
        return None
    index = value[token_chars + 1 :]
    return int(index) if len(index) <= 2 and index.isdigit() else None


def owner_of_cookie(cookie: str | None) -> int | None:
    """The worker index a cookie names (its ".<worker>" tag), or None."""
    return worker_of(cookie, COOKIE_CHARS, ".")
