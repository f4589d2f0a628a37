"""The garbage collector of a serving process: full collections at a bounded rate.

CPython runs a full collection (every tracked object of the process) whenever the long-lived heap
has grown by a quarter since the last one. In a server the heap grows while clients arrive - each
kept-alive connection holds its transport, protocol, handler task and session - so those pauses
come in a burst exactly when a wave of clients logs in, and the last of them walk every connection
held: with 4,000 kept-alive CM clients, pauses of up to ~180 ms that freed nothing. Every request
of the process waits them out.

:func:`settle`, called once a serving process has loaded (its imports, settings and TLS contexts),
just before its event loop runs:

- collects once and freezes what is there (``gc.freeze``): the modules, classes and settings live
  as long as the process and no later collection walks them again;
- keeps the young generations as they are, so short-lived cycles (a failed request's exception and
  frames) are still freed at once;
- lets a full collection start at most once per ``interval`` seconds, and then only on CPython's
  own rule (a quarter of growth). Cyclic garbage that outlived the young generations waits at most
  that long; garbage without cycles is freed by reference counting as always.

Invariant: the policy only delays full collections, never drops them: after ``interval`` the next
young collection that finds a quarter's growth runs one. An explicit ``gc.collect()`` counts as the
full collection of its interval. The rule needs CPython's three-generation collector (3.11-3.13,
the images' Python).
"""

from __future__ import annotations

import gc
import time
from typing import Any

FULL_COLLECTION_INTERVAL = 300.0  # seconds between two automatic full collections, at least
_NEVER = 1_000_000_000  # a generation-2 threshold no count of young collections reaches


class FullCollections:
    """The gc callback that opens the generation-2 threshold once ``interval`` has passed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.before = gc.get_threshold()
        self.young = self.before[:2]
        self.last = time.monotonic()
        self.full = 0  # full collections since settle() (each explicit gc.collect() included)
        gc.set_threshold(*self.young, _NEVER)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop":
            return
        if info["generation"] == 2:
            self.full += 1
            self.last = time.monotonic()
            gc.set_threshold(*self.young, _NEVER)
        elif time.monotonic() - self.last >= self.interval:
            gc.set_threshold(*self.young, 0)  # the next young collection may be a full one

    def remove(self) -> None:
        """Back to CPython's rule (tests; a process keeps its policy for life)."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        gc.set_threshold(*self.before)
        gc.unfreeze()


def settle(interval: float = FULL_COLLECTION_INTERVAL) -> FullCollections:
    """Freeze the loaded process and bound its full collections (see the module docstring)."""
    gc.collect()
    gc.freeze()
    policy = FullCollections(interval)
    gc.callbacks.append(policy)
    return policy
