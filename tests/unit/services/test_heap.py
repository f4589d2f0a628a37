"""gatehouse.heap: a serving process's full collections at a bounded rate, young cycles freed at once."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gatehouse import heap


@pytest.fixture
def settle() -> Iterator[object]:
    policies: list[heap.FullCollections] = []

    def make(interval: float) -> heap.FullCollections:
        policy = heap.settle(interval)
        policies.append(policy)
        return policy

    before = gc.get_threshold()
    yield make
    for policy in policies:
        policy.remove()
    assert gc.get_threshold() == before


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def _grow(objects: int) -> list[list[int]]:
    """A long-lived heap growing as connections pile up: many times CPython's quarter of growth."""
    held = []
    for i in range(objects):
        held.append([i])  # a list is always tracked (a dict of ints is not)
    return held


def test_the_loaded_process_is_frozen(settle) -> None:
    settle(3600)
    assert gc.get_freeze_count() > 1000  # this test process's modules and classes


def test_no_full_collection_within_the_interval_however_the_heap_grows(settle) -> None:
    policy = settle(3600)
    held = _grow(400_000)
    assert policy.full == 0
    assert len(held) == 400_000


def test_full_collections_run_again_once_the_interval_has_passed(settle) -> None:
    policy = settle(0)
    held = _grow(400_000)
    assert policy.full >= 1
    assert len(held) == 400_000


def test_young_cycles_are_still_freed_without_a_full_collection(settle) -> None:
    policy = settle(3600)
    freed = []
    node = _Node()
    weakref.finalize(node, freed.append, True)
    del node
    _grow(50_000)  # allocations run the young collections
    assert freed == [True]
    assert policy.full == 0


def test_an_explicit_collection_counts_as_the_full_one(settle) -> None:
    policy = settle(3600)
    gc.collect()
    assert policy.full == 1
    assert gc.get_threshold()[2] == heap._NEVER  # closed again until the next interval
