"""Collaboration invitations: an owner's single-use code that lets another client join its session.

Invariants:

- A code is ``secrets.token_urlsafe(CODE_BYTES)`` (192 bits): never guessed, only leaked. The book
  keeps only its SHA-256 digest, so a memory dump or a log of the book holds no usable code, and a
  lookup is by digest (what an attacker controls never meets a stored code byte by byte).
- An invitation is bound to the owner's CM session object and to the agent session (agent address
  and the agent's session-id) that the owner's allocate-resource launched. It is redeemed only while
  that session is alive and still on that agent session.
- It is accepted once: :meth:`InvitationBook.redeem` marks it used before it returns, with no
  ``await`` in between, so two redemptions of one code (on one event loop) cannot both pass.
- With Workers > 1 a code ends in ``tag`` ("-<worker>"), the worker whose book holds it: a
  collaborator on another worker redeems it there (:func:`owner_of_code`).
- It lives ``ttl`` seconds. Used and expired entries are kept ``max(ttl, MIN_RETAIN)`` after their
  expiry, so a late redemption learns "used" or "expired" rather than "unknown"; then they are
  forgotten.
- At most ``max_per_session`` unused, unexpired invitations exist per owner session, and at most
  ``RETAINED_PER_OUTSTANDING`` times that many entries in all per owner session (the oldest spent
  ones go first), so a short lifetime does not let one owner pile up remembered entries.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field

from gatehouse import protocol as p
from gatehouse.cm.sessions import Session, worker_of

CODE_BYTES = 24
CODE_CHARS = 32  # secrets.token_urlsafe(CODE_BYTES)
MIN_RETAIN = 60.0
RETAINED_PER_OUTSTANDING = 4


class InvitationRefused(Exception):
    """``reason`` is a metrics label (limit, unknown, used, expired, ended); ``result_id`` the wire's."""

    def __init__(self, reason: str, result_id: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.result_id = result_id


@dataclass(eq=False)
class Invitation:
    owner: Session = field(repr=False)
    agent: p.AgentInfo
    agent_session_id: str
    expires: float
    used: bool = False


def digest(code: str) -> bytes:
    return hashlib.sha256(code.encode("ascii", "replace")).digest()


class InvitationBook:
    def __init__(self, ttl: float, max_per_session: int, tag: str = "") -> None:
        self.ttl = ttl
        self.tag = tag
        self.max_per_session = max_per_session
        self.retain = max(ttl, MIN_RETAIN)
        self._by_digest: dict[bytes, Invitation] = {}  # insertion order = age
        self._by_owner: dict[Session, dict[bytes, None]] = {}
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._by_digest)

    def outstanding(self, now: float | None = None) -> int:
        """Unused invitations within their lifetime."""
        now = time.monotonic() if now is None else now
        return sum(1 for i in self._by_digest.values() if not i.used and now <= i.expires)

    def prune(self, now: float | None = None) -> None:
        """Forget entries ``retain`` past their expiry (at most once a second)."""
        now = time.monotonic() if now is None else now
        if now < self._next_prune:
            return
        self._next_prune = now + 1.0
        gone = [d for d, i in self._by_digest.items() if now > i.expires + self.retain]
        for d in gone:
            self._forget(d)

    def _forget(self, key: bytes) -> None:
        invitation = self._by_digest.pop(key)
        mine = self._by_owner.get(invitation.owner)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_owner[invitation.owner]

    def create(
        self, owner: Session, agent: p.AgentInfo, agent_session_id: str, now: float | None = None
    ) -> str:
        """A new code for ``owner``'s current agent session; InvitationRefused("limit") past the cap."""
        now = time.monotonic() if now is None else now
        self.prune(now)
        mine = self._by_owner.setdefault(owner, {})
        live = {d for d in mine if not self._by_digest[d].used and now <= self._by_digest[d].expires}
        if len(live) >= self.max_per_session:
            raise InvitationRefused(
                "limit",
                p.INVITE_LIMIT,
                f"{self.max_per_session} invitations of this session are outstanding",
            )
        spent = [d for d in mine if d not in live]
        while spent and len(mine) >= RETAINED_PER_OUTSTANDING * self.max_per_session:
            self._forget(spent.pop(0))
        code = secrets.token_urlsafe(CODE_BYTES) + self.tag
        key = digest(code)
        self._by_digest[key] = Invitation(owner, agent, agent_session_id, now + self.ttl)
        self._by_owner.setdefault(owner, {})[key] = None
        return code

    def redeem(self, code: str, now: float | None = None) -> Invitation:
        """The invitation of ``code``, marked used; raises InvitationRefused for unknown, used and
        expired codes. Whether the owner's session still runs is the caller's check
        (:func:`owner_refusal`): the book knows codes, the session table knows sessions."""
        now = time.monotonic() if now is None else now
        self.prune(now)
        invitation = self._by_digest.get(digest(code))
        if invitation is None:
            raise InvitationRefused("unknown", p.JOIN_UNKNOWN, "no such invitation")
        if invitation.used:
            raise InvitationRefused("used", p.JOIN_USED, "the invitation has been used")
        if now > invitation.expires:
            raise InvitationRefused("expired", p.JOIN_EXPIRED, "the invitation has expired")
        # Consumed before any check that might await: a second redemption sees "used".
        invitation.used = True
        return invitation


def owner_of_code(code: str) -> int | None:
    """The worker index a code names (its "-<worker>" tag), or None."""
    return worker_of(code, CODE_CHARS, "-")


def owner_refusal(invitation: Invitation, owner_live: bool) -> InvitationRefused | None:
    """Why ``invitation`` can no longer be joined (owner's session gone or moved on), or None."""
    owner = invitation.owner
    if not owner_live or owner.agent_session_id != invitation.agent_session_id:
        return InvitationRefused("ended", p.JOIN_ENDED, "the owner's session has ended")
    return None
