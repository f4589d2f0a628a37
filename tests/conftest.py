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
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
