"""Fixtures for integration tests: a test PKI and a registry of service processes stopped at the end."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pki import TestPKI
from services import ServiceProcess


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """Append started ServiceProcess objects here; they are stopped (SIGTERM) after the test."""
    started: list[ServiceProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()
