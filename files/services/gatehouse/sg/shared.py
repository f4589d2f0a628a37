"""State that the SG's worker processes share (Workers > 1, see workers.py): one memory region
that the supervisor creates before it forks the first worker.

Invariants:

- The counter ``open`` (gatehouse.shared: one cell per worker, the limit held across workers) is
  the client connections held against MaxConnections, from accept until the socket is closed.
- A grant's nonce is in the replay table from its first acceptance by any worker until the grant
  expires; a nonce found there (unexpired) is a replay, whichever worker accepted it. The table
  is bounded: a nonce is kept within ``PROBE`` slots of its hash, and when all of them hold
  unexpired grants the new grant is refused (``replay-cache-full``), never accepted unrecorded.
- The replay table is read and written under the counters' lock (gatehouse.shared).
"""

from __future__ import annotations

import struct
import time

from gatehouse.grant import Grant
from gatehouse.shared import SharedCounters

_ENTRY = struct.Struct("<12s4xd")  # nonce (12 bytes, gatehouse.grant), pad, expiry (unix time)
REPLAY_SLOTS = 1 << 17  # about 3 MiB; far more than the grants unexpired at any time
PROBE = 64


class ReplayTableFull(Exception):
    """Every slot a grant's nonce may use holds an unexpired grant: refuse, never forget."""


class SharedState(SharedCounters):
    def __init__(self, workers: int, replay_slots: int = REPLAY_SLOTS) -> None:
        super().__init__("sg", workers, ("open",), extra=replay_slots * _ENTRY.size)
        self.replay_slots = replay_slots
        self._replay_at = self.extra_at

    # ------------------------------------------------------------ connection slots

    def open_count(self, worker: int) -> int:
        return self.cell("open", worker)

    def total_open(self) -> int:
        return self.total("open")

    def take_slot(self, worker: int, limit: int) -> bool:
        """Count one connection for ``worker`` if fewer than ``limit`` are open in all workers."""
        return self.take("open", worker, limit)

    def give_slot(self, worker: int) -> None:
        self.give("open", worker)

    # ------------------------------------------------------------ grants

    def accept_grant(self, grant: Grant, now: float | None = None) -> bool:
        """True the first time any worker presents ``grant``; False for a replay. Raises
        ReplayTableFull when the grant cannot be recorded."""
        now = time.time() if now is None else now
        nonce = grant.nonce
        start = int.from_bytes(nonce[:8], "little") % self.replay_slots
        with self.locked():
            free = -1
            for step in range(PROBE):
                offset = self._replay_at + ((start + step) % self.replay_slots) * _ENTRY.size
                seen, expires = _ENTRY.unpack_from(self.mem, offset)
                if expires < now:  # empty (0.0) or expired: reusable
                    if free < 0:
                        free = offset
                elif seen == nonce:
                    return False
            if free < 0:
                raise ReplayTableFull()
            _ENTRY.pack_into(self.mem, free, nonce, max(grant.expires, now + 1.0))
            return True
