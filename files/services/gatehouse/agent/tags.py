"""Session-tags the agent has issued: each is accepted once, within its time to live."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Issued:
    session_id: str
    client_ip: str
    expires: float
    # Issued by join-session: the channel joins the owner's session and ends with it.
    collaborator: bool = False


class TagStore:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._tags: dict[str, Issued] = {}

    def __len__(self) -> int:
        return len(self._tags)

    def issue(
        self, session_id: str, client_ip: str, now: float | None = None, *, collaborator: bool = False
    ) -> str:
        now = time.monotonic() if now is None else now
        self.prune(now)
        tag = secrets.token_urlsafe(32)
        self._tags[tag] = Issued(session_id, client_ip, now + self.ttl, collaborator)
        return tag

    def consume(self, tag: str, now: float | None = None) -> Issued | None:
        """The session a tag was issued for, once; None for unknown, used or expired tags."""
        now = time.monotonic() if now is None else now
        issued = self._tags.pop(tag, None)
        if issued is None or now > issued.expires:
            return None
        return issued

    def prune(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        expired = [tag for tag, issued in self._tags.items() if now > issued.expires]
        for tag in expired:
            del self._tags[tag]
