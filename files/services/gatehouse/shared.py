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
- A source table (``sources``) counts per source (an address, as the caller keys it) and worker:
  a caller takes one for a source only while that source's sum over the workers is below the
  limit, so a per-source cap holds across workers too. An entry is a keyed digest of the source
  (the key is random per region: a client cannot aim its addresses at one entry) and one count
  per worker; it is free again when every count is 0. A source finds its entry within ``PROBE``
  entries of its digest; when they are all taken by other sources, it is refused (the tables are
  sized at several times the counts they can hold, so that takes an attacker with more sources
  than the limits allow connections).
- A region may hold more than counters (``extra`` bytes after them, from ``extra_at``): the SG
  keeps its grant replay table there, under the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence

_CELL = struct.Struct("<q")
_DIGEST = 16
PROBE = 64


class SharedCounters:
    def __init__(
        self,
        name: str,
        workers: int,
        counters: Sequence[str],
        extra: int = 0,
        sources: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``sources``: the source tables, each (name, entries)."""
        self.workers = workers
        self._at = {counter: n * workers * _CELL.size for n, counter in enumerate(counters)}
        at = len(counters) * workers * _CELL.size
        self._entry = struct.Struct(f"<{_DIGEST}s{workers}i")
        self._tables: dict[str, tuple[int, int]] = {}
        for table, entries in sources:
            self._tables[table] = (at, entries)
            at += entries * self._entry.size
        self._key = os.urandom(16)
        self.extra_at = at
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
            for at, entries in self._tables.values():
                for offset in range(at, at + entries * self._entry.size, self._entry.size):
                    digest, *counts = self._entry.unpack_from(self.mem, offset)
                    if counts[worker]:
                        counts[worker] = 0
                        self._entry.pack_into(self.mem, offset, digest, *counts)

    # ------------------------------------------------------------ per source

    def _find(self, table: str, source: str) -> tuple[bytes, int | None, int | None]:
        """The source's digest, its entry's offset (None: it has none) and a free one (or None)."""
        at, entries = self._tables[table]
        digest = hashlib.blake2b(source.encode(), digest_size=_DIGEST, key=self._key).digest()
        start = int.from_bytes(digest[:8], "little") % entries
        free = None
        for step in range(min(PROBE, entries)):
            offset = at + ((start + step) % entries) * self._entry.size
            seen, *counts = self._entry.unpack_from(self.mem, offset)
            if not any(counts):
                if free is None:
                    free = offset
            elif seen == digest:
                return digest, offset, free
        return digest, None, free

    def source_take(self, table: str, source: str, worker: int, limit: int) -> bool:
        """Count one of ``source`` for ``worker`` if that source's sum over the workers is below ``limit``."""
        with self.locked():
            digest, offset, free = self._find(table, source)
            if offset is None:
                if free is None or limit < 1:
                    return False
                offset, counts = free, [0] * self.workers
            else:
                counts = list(self._entry.unpack_from(self.mem, offset)[1:])
                if sum(counts) >= limit:
                    return False
            counts[worker] += 1
            self._entry.pack_into(self.mem, offset, digest, *counts)
            return True

    def source_give(self, table: str, source: str, worker: int) -> None:
        with self.locked():
            digest, offset, _free = self._find(table, source)
            if offset is not None:
                counts = list(self._entry.unpack_from(self.mem, offset)[1:])
                counts[worker] = max(0, counts[worker] - 1)
                self._entry.pack_into(self.mem, offset, digest, *counts)

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


class WorkerSourceSlots:
    """One worker's view of one shared source table: take/give per source, as LocalSourceSlots."""

    def __init__(self, shared: SharedCounters, table: str, worker: int) -> None:
        self.shared = shared
        self.table = table
        self.worker = worker

    def take(self, source: str, limit: int) -> bool:
        return self.shared.source_take(self.table, source, self.worker, limit)

    def give(self, source: str) -> None:
        self.shared.source_give(self.table, source, self.worker)


class LocalSourceSlots:
    """Counts per source of one process (Workers=1): the same shape as WorkerSourceSlots."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def take(self, source: str, limit: int) -> bool:
        count = self.counts.get(source, 0)
        if count >= limit:
            return False
        self.counts[source] = count + 1
        return True

    def give(self, source: str) -> None:
        count = self.counts.pop(source, 0)
        if count > 1:
            self.counts[source] = count - 1


SourceSlots = WorkerSourceSlots | LocalSourceSlots
