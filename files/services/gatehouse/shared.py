"""Counters that the worker processes of one service share (Workers > 1, see workers.py): one
memory region that the supervisor creates before it forks the first worker.

Invariants:

- Each counter has one cell per worker: ``cell(name, i)`` is what worker ``i`` holds of it
  (connections, sessions, calls in flight). The service-wide value is the sum of the cells; a
  worker takes one only while that sum is below the limit, under the lock, so a limit holds
  exactly across workers, never "once per worker".
- When a worker dies, what it held died with it (the kernel closed its sockets, its sessions were
  in its memory): the supervisor sets its cells back to 0 before it starts the replacement.
- Every read-modify-write happens under one POSIX record lock (``lockf``) on the region's file,
  which the kernel releases when its holder dies: a worker killed inside the lock cannot wedge
  the others.
- A region may hold more than counters (``extra`` bytes after them, from ``extra_at``): the SG
  keeps its grant replay table there, under the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator, Sequence

_CELL = struct.Struct("<q")


class SharedCounters:
    def __init__(self, name: str, workers: int, counters: Sequence[str], extra: int = 0) -> None:
        self.workers = workers
        self._at = {counter: n * workers * _CELL.size for n, counter in enumerate(counters)}
        self.extra_at = len(counters) * workers * _CELL.size
        size = max(1, self.extra_at + extra)
        self.fd = os.memfd_create(f"gatehouse-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _offset(self, counter: str, worker: int) -> int:
        return self._at[counter] + worker * _CELL.size

    def cell(self, counter: str, worker: int) -> int:
        return _CELL.unpack_from(self.mem, self._offset(counter, worker))[0]

    def total(self, counter: str) -> int:
        return sum(self.cell(counter, i) for i in range(self.workers))

    def take(self, counter: str, worker: int, limit: int) -> bool:
        """Count one for ``worker`` if the sum over all workers is below ``limit``."""
        with self.locked():
            if self.total(counter) >= limit:
                return False
            _CELL.pack_into(self.mem, self._offset(counter, worker), self.cell(counter, worker) + 1)
            return True

    def give(self, counter: str, worker: int) -> None:
        with self.locked():
            _CELL.pack_into(self.mem, self._offset(counter, worker), max(0, self.cell(counter, worker) - 1))

    def reset_worker(self, worker: int) -> None:
        """Worker ``worker`` is gone, and everything it held (supervisor, before a restart)."""
        with self.locked():
            for counter in self._at:
                _CELL.pack_into(self.mem, self._offset(counter, worker), 0)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class WorkerSlots:
    """One worker's view of one shared counter, with the shape of a local counter (take/give)."""

    def __init__(self, shared: SharedCounters, counter: str, worker: int) -> None:
        self.shared = shared
        self.counter = counter
        self.worker = worker

    def take(self, limit: int) -> bool:
        return self.shared.take(self.counter, self.worker, limit)

    def give(self) -> None:
        self.shared.give(self.counter, self.worker)

    def total(self) -> int:
        return self.shared.total(self.counter)


class LocalSlots:
    """A counter of one process (Workers=1): the same shape as :class:`WorkerSlots`."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, limit: int) -> bool:
        if self.count >= limit:
            return False
        self.count += 1
        return True

    def give(self) -> None:
        self.count = max(0, self.count - 1)

    def total(self) -> int:
        return self.count


Slots = WorkerSlots | LocalSlots
