"""Client sessions of the CM: the per-client state machine and the table that finds a session.

A session is found by its JSESSIONID cookie (a random token, not the session id) or, when a client
sends no cookie, by its ``Client-Log-Id`` header. Each session has a uuid4 session id that goes into
every log line about it and into the broker and agent requests.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
import uuid
from dataclasses import dataclass, field

from gatehouse import protocol as p


class State(enum.Enum):
    HELLO = "hello"  # hello answered; authenticate (again after a failure) next
    AUTHENTICATED = "authenticated"
    LISTED = "listed"
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"


# message tag → states in which it is accepted (hello and bye are accepted in any state)
_ALLOWED: dict[str, frozenset[State]] = {
    p.Authenticate.tag: frozenset({State.HELLO}),
    p.GetResourceList.tag: frozenset({State.AUTHENTICATED, State.LISTED}),
    p.AllocateResource.tag: frozenset({State.AUTHENTICATED, State.LISTED}),
}
_NEEDS_AUTH = {p.GetResourceList.tag, p.AllocateResource.tag}
REQUESTS = {p.Hello.tag, p.Authenticate.tag, p.GetResourceList.tag, p.AllocateResource.tag, p.Bye.tag}


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
    # The upstream broker's cookies for this client (the CM speaks for one client per broker session).
    broker_cookies: dict[str, str] = field(default_factory=dict, repr=False)
    last_seen: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def touch(self, now: float | None = None) -> None:
        self.last_seen = time.monotonic() if now is None else now


class SessionsFull(Exception):
    """MaxClients live sessions exist already."""


class SessionTable:
    """Live client sessions, bounded by MaxClients and forgotten after SessionIdleTimeout."""

    def __init__(self, max_clients: int, idle_timeout: float) -> None:
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._by_cookie: dict[str, Session] = {}
        self._by_log_id: dict[str, Session] = {}
        self._next_full_sweep = 0.0

    def __len__(self) -> int:
        return len(self._by_cookie)

    def sessions(self) -> list[Session]:
        return list(self._by_cookie.values())

    def create(self, client_ip: str, log_id: str = "", now: float | None = None) -> Session:
        if len(self._by_cookie) >= self.max_clients:
            # When full, look for idle sessions at most once a second: a crowd of refused
            # clients must not each pay for a scan of the whole table.
            moment = time.monotonic() if now is None else now
            if moment >= self._next_full_sweep:
                self._next_full_sweep = moment + 1.0
                self.expire(moment)
            if len(self._by_cookie) >= self.max_clients:
                raise SessionsFull(f"{self.max_clients} client sessions are active")
        session = Session(
            session_id=str(uuid.uuid4()),
            cookie=secrets.token_urlsafe(32),
            client_ip=client_ip,
            log_id=log_id,
        )
        session.touch(now)
        self._by_cookie[session.cookie] = session
        if log_id:
            # A newer session of the same client log id wins; the older one stays reachable by cookie.
            self._by_log_id[log_id] = session
        return session

    def find(
        self, cookie: str | None, log_id: str | None, client_ip: str, now: float | None = None
    ) -> Session | None:
        """The live session of a request: by cookie, else by Client-Log-Id from the same address."""
        session = self._by_cookie.get(cookie) if cookie else None
        if session is None and log_id:
            candidate = self._by_log_id.get(log_id)
            # The header is not a secret, so it only counts from the address that opened the session.
            if candidate is not None and candidate.client_ip == client_ip:
                session = candidate
        if session is None:
            return None
        now = time.monotonic() if now is None else now
        if now - session.last_seen > self.idle_timeout:
            self.remove(session)
            return None
        return session

    def remove(self, session: Session) -> bool:
        removed = self._by_cookie.pop(session.cookie, None) is not None
        if session.log_id and self._by_log_id.get(session.log_id) is session:
            del self._by_log_id[session.log_id]
        return removed

    def expire(self, now: float | None = None) -> list[Session]:
        """Forget sessions idle for longer than SessionIdleTimeout; returns them."""
        now = time.monotonic() if now is None else now
        idle = [s for s in self._by_cookie.values() if now - s.last_seen > self.idle_timeout]
        for session in idle:
            self.remove(session)
        return idle


class EstablishmentLimiter:
    """At most ``limit`` allocate-resource calls in flight; the next is refused at once, not queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
