"""Fixtures shared by all tests: the collection as Ansible sees it, and running its modules.

Ansible finds ``gatehouse.access`` only below ``<dir>/ansible_collections/gatehouse/access``;
a checkout is not laid out that way. ``tests/integration/collection_helpers.py`` creates a
temporary tree with the symlink ``ansible_collections/gatehouse/access`` -> repository root
(once per test process); these fixtures expose it:

- ``collection_path``: the directory to put in ``ANSIBLE_COLLECTIONS_PATH`` (the one that
  contains ``ansible_collections/``).
- ``run_module``: ``run_module(name, args, check=False, diff=False, env=None)`` runs
  ``ansible localhost -m gatehouse.access.<name> -a <json>`` with the json callback and returns
  an ``AnsibleRun``: ``.result`` (the module's result dict), ``.changed``, ``.failed``,
  ``.stdout``/``.stderr`` (to check that no secret leaked) and ``.warnings``.

Unit tests that import module_utils call ``collection_helpers.ensure_importable()`` to make
``ansible_collections.gatehouse.access`` importable in the test interpreter.

With ``GATEHOUSE_NO_SKIP=1`` (``make test`` and CI set it) a skipped test is reported as a
failure: a missing Docker engine, image, tool or privilege must not turn a red run green.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))

import collection_helpers


@pytest.fixture(scope="session")
def collection_path() -> Path:
    """Directory holding ``ansible_collections/gatehouse/access`` (a symlink to the checkout)."""
    return collection_helpers.collection_tree()


@pytest.fixture
def run_module(collection_path: Path) -> Callable[..., collection_helpers.AnsibleRun]:
    """``run_module(name, args, check=False, diff=False, env=None)`` -> AnsibleRun."""

    def run(name: str, args: dict[str, Any], **kwargs: Any) -> collection_helpers.AnsibleRun:
        return collection_helpers.run_module(name, args, **kwargs)

    return run


def _no_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if os.environ.get("GATEHOUSE_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, which GATEHOUSE_NO_SKIP=1 does not allow: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _no_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _no_skip(outcome.get_result())  # type: ignore[attr-defined]
