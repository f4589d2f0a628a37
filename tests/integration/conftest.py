"""Fixtures for integration tests: a test PKI, a registry of service processes stopped at the end,
the test directory and RADIUS server (identity_servers.py), started once per session, and the
broker's database on each engine (``broker_database``: SQLite and PostgreSQL, the one place the
engines are parametrized; postgres_server.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import identity_servers
import postgres_server
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


@pytest.fixture(scope="session")
def identity(
    pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[identity_servers.IdentityServers]:
    """slapd and FreeRADIUS containers, shared by the session (see identity_servers.py)."""
    with identity_servers.running(pki, tmp_path_factory.mktemp("identity")) as servers:
        yield servers


@pytest.fixture
def directory(identity: identity_servers.IdentityServers) -> identity_servers.Directory:
    """The test directory, running (a test that stopped or paused it does not leak that)."""
    identity.directory.ensure_running()
    return identity.directory


@pytest.fixture
def radius(identity: identity_servers.IdentityServers) -> identity_servers.Radius:
    return identity.radius


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_server.PostgresServer]:
    """A PostgreSQL server (gatehouse/postgres) shared by the session; tests take a database each."""
    with postgres_server.running() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def broker_database(request: pytest.FixtureRequest, tmp_path: Path) -> postgres_server.BrokerDatabase:
    """The broker's database on each engine: SQLite (a file) and PostgreSQL (a new database on the
    session's server, reached by a libpq multi-host URL whose first host does not answer)."""
    if request.param == "sqlite":
        return postgres_server.BrokerDatabase("sqlite", str(tmp_path / "broker.db"))
    server: postgres_server.PostgresServer = request.getfixturevalue("postgres")
    from services import free_port

    dead = f"127.0.0.1:{free_port()}"
    url = server.url(server.create_database(), hosts=f"{dead},{server.host}")
    return postgres_server.BrokerDatabase("postgresql", url, server.password)
