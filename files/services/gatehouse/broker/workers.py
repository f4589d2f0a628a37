"""Bounded thread pools for the broker's blocking checks: scrypt, directory binds, RADIUS requests.

A check that would wait without end is worse than a quick "busy": a flood of logins must not hold
the event loop, ``/health`` or the other sessions hostage (docs/security.md). :class:`BoundedPool`
runs jobs on ``workers`` threads and lets at most ``queue`` more wait; one more raises its
:class:`Busy` subclass at once, before anything is computed or sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class Busy(Exception):
    """Every worker is busy and the queue is full: answer "busy" now instead of waiting.

    ``pool`` names the pool that refused (the ``pool`` label of the busy metrics).
    """

    def __init__(self, message: str, pool: str = "") -> None:
        super().__init__(message)
        self.pool = pool


class BoundedPool:
    """``workers`` threads, at most ``queue`` jobs waiting for one.

    Invariant: jobs running plus waiting never exceed ``workers + queue``. A job is counted until
    it ends, not until its caller stops waiting: a cancelled request leaves its job running.
    """

    def __init__(self, workers: int, queue: int, name: str, busy: type[Busy] = Busy) -> None:
        self.limit = workers + queue
        self.name = name
        self.busy = busy
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._pending >= self.limit:
                raise self.busy(f"{self.name} busy ({self.limit} jobs running or waiting)", self.name)
            self._pending += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
