"""State that the SG's worker processes share (Workers > 1, see workers.py): one memory region
that the supervisor creates before it forks the first worker.

Invariants:

- ``open[i]`` is the number of client connections worker ``i`` holds against MaxConnections (from
  accept until the socket is closed). The global count is the sum over the workers; a worker
  takes a slot only while that sum is below MaxConnections, under the lock, so the limit holds
  exactly across workers. When a worker dies the kernel has closed its connections; the
  supervisor sets its ``open[i]`` back to 0 before starting its replacement.
- A grant's nonce is in the replay table from its first acceptance by any worker until the grant
  expires; a nonce found there (unexpired) is a replay, whichever worker accepted it. The table
  is bounded: a nonce is kept within ``PROBE`` slots of its hash, and when all of them hold
  unexpired grants the new grant is refused (``replay-cache-full``), never accepted unrecorded.
- Every read-modify-write happens under one POSIX record lock (``lockf``) on the region's file,
  which the kernel releases when its holder dies: a worker killed inside the lock cannot wedge
  the others.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from gatehouse.grant import Grant

_COUNT = struct.Struct("<q")
_ENTRY = struct.Struct("<12s4xd")  # nonce (12 bytes, gatehouse.grant), pad, expiry (unix time)
REPLAY_SLOTS = 1 << 17  # about 3 MiB; far more than the grants unexpired at any time
PROBE = 64


class ReplayTableFull(Exception):
    """Every slot a grant's nonce may use holds an unexpired grant: refuse, never forget."""


class SharedState:
    def __init__(self, workers: int, replay_slots: int = REPLAY_SLOTS) -> None:
        self.workers = workers
        self.replay_slots = replay_slots
        self._replay_at = workers * _COUNT.size
        size = self._replay_at + replay_slots * _ENTRY.size
        self.fd = os.memfd_create("gatehouse-sg", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------ connection slots

    def open_count(self, worker: int) -> int:
        return _COUNT.unpack_from(self.mem, worker * _COUNT.size)[0]

    def total_open(self) -> int:
        return sum(self.open_count(i) for i in range(self.workers))

    def take_slot(self, worker: int, limit: int) -> bool:
        """Count one connection for ``worker`` if fewer than ``limit`` are open in all workers."""
        self._lock()
        try:
            if self.total_open() >= limit:
                return False
            _COUNT.pack_into(self.mem, worker * _COUNT.size, self.open_count(worker) + 1)
            return True
        finally:
            self._unlock()

    def give_slot(self, worker: int) -> None:
        self._lock()
        try:
            _COUNT.pack_into(self.mem, worker * _COUNT.size, max(0, self.open_count(worker) - 1))
        finally:
            self._unlock()

    def reset_worker(self, worker: int) -> None:
        """Worker ``worker`` is gone: its connections are closed (supervisor, before a restart)."""
        self._lock()
        try:
            _COUNT.pack_into(self.mem, worker * _COUNT.size, 0)
        finally:
            self._unlock()

    # ------------------------------------------------------------ grants

    def accept_grant(self, grant: Grant, now: float | None = None) -> bool:
        """True the first time any worker presents ``grant``; False for a replay. Raises
        ReplayTableFull when the grant cannot be recorded."""
        now = time.time() if now is None else now
        nonce = grant.nonce
        start = int.from_bytes(nonce[:8], "little") % self.replay_slots
        self._lock()
        try:
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
        finally:
            self._unlock()

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
