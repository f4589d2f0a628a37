"""Fixtures shared by the scenarios (imported by each scenario's tests/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def hostvars(host: Any) -> dict[str, Any]:
    return host.ansible.get_variables()


@pytest.fixture
def groups(hostvars: dict[str, Any]) -> list[str]:
    return list(hostvars.get("group_names", []))
