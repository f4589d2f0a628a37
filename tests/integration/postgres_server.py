"""Real PostgreSQL servers for the broker's database tests: containers of gatehouse/postgres.

The image (files/images/postgres, hack/build-debian-image.sh) runs initdb at the first start with
the role and database :data:`USER` and the password given here. Each server publishes 5432 on
127.0.0.1 at a free port, so the broker's code in the test process reaches it like a host on the
network; no Docker network is created. :func:`running` starts one (``extra_args``: postgres
settings, e.g. ``-c default_transaction_read_only=on`` for a server that does not take writes)
and removes it afterwards, also when a test or the start fails. :meth:`BrokerHost.start` puts
one on a Docker network of its own beside a holder container, for a broker the broker module
deploys into the holder's namespace (the collection tests of the broker on PostgreSQL). A missing
Docker engine or image fails the test with the command that fixes it: never a skip.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import docker
import pytest
from broker_helpers import Admin, BrokerClient, Http
from deploy_helpers import docker_client, free_cidr
from services import free_port

IMAGE = "gatehouse/postgres:0.1.0"
USER = "broker"
START_TIMEOUT = 60.0


def wait_healthy(container: Any) -> None:
    """Until a gatehouse/postgres container (started by a test, on a network of its own) takes
    connections on its socket; fails the test with its log if it stops or takes over a minute."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            pytest.fail(f"{IMAGE} stopped: {container.logs(tail=30).decode(errors='replace')}")
        if container.exec_run(["gatehouse-postgres", "health"])[0] == 0:
            return
        time.sleep(0.3)
    pytest.fail(f"{IMAGE} did not start within {START_TIMEOUT:.0f} s")


HOLDER_IMAGE = "gatehouse/base:0.1.0"


@dataclass
class BrokerHost:
    """A TLS PostgreSQL server and a host for a broker on a network of their own (:meth:`start`),
    with what the tests of a broker deployed there by the broker module share: its options, its
    admin API and the broker protocol as a connection manager speaks it."""

    cli: Any
    prefix: str
    tmp: Path  # the broker's data directory is tmp/broker
    pki: Any
    admin_token: str
    password: str  # the database role's (:data:`USER`)
    postgres: Any  # the server's container, named <prefix>-pg (the host of the broker's URL)
    holder: Any  # <prefix>-host, whose network namespace the broker joins
    pg_port: int  # the server's 5432 on the host's loopback
    port: int  # the holder's 8443 (the broker's) on the host's loopback
    cm: ssl.SSLContext  # a connection manager's TLS identity

    @classmethod
    def start(
        cls, cli: Any, pki: Any, tmp_path: Path, prefix: str, *, admin_token: str, password: str, pool: str
    ) -> Self:
        """A network (a /26 of ``pool``) with a gatehouse/postgres server over TLS (certificate of
        ``pki`` naming its container; role and database :data:`USER` with ``password``) and a holder
        container for a broker deployed with ``network_mode: container:<prefix>-host``. The caller
        removes them (deploy_helpers.cleanup with ``prefix``)."""
        for image in (IMAGE, HOLDER_IMAGE):
            try:
                cli.images.get(image)
            except docker.errors.ImageNotFound:
                pytest.fail(f"image {image} is missing: run make images")
        cidr = free_cidr(cli, pool=pool, prefixlen=26)
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=cidr)])
        network = cli.networks.create(f"{prefix}-net", driver="bridge", ipam=ipam)
        server = pki.issue(f"{prefix}-pg", [f"{prefix}-pg"])
        tls = tmp_path / "pg-tls"
        tls.mkdir()
        for source, name in ((server.cert, "server.crt"), (server.key, "server.key")):
            (tls / name).write_bytes(Path(source).read_bytes())
            (tls / name).chmod(0o644)  # the image copies the key to its own 0600 file
        tls.chmod(0o755)
        pg_port, port = free_port(), free_port()
        postgres = cli.containers.run(
            IMAGE,
            ["server"],
            name=f"{prefix}-pg",
            detach=True,
            network=network.name,
            ports={"5432/tcp": ("127.0.0.1", pg_port)},
            environment={"POSTGRES_USER": USER, "POSTGRES_PASSWORD": password},
            volumes={str(tls): {"bind": "/etc/gatehouse-postgres/tls", "mode": "ro"}},
        )
        holder = cli.containers.run(
            HOLDER_IMAGE,
            ["sleep", "infinity"],
            name=f"{prefix}-host",
            detach=True,
            network=network.name,
            ports={"8443/tcp": ("127.0.0.1", port)},
        )
        wait_healthy(postgres)
        certs = pki.issue(f"{prefix}-cm", ["localhost"], role="cm")
        cm = ssl.create_default_context(cafile=str(pki.ca))
        cm.load_cert_chain(str(certs.cert), str(certs.key))
        return cls(cli, prefix, tmp_path, pki, admin_token, password, postgres, holder, pg_port, port, cm)

    @property
    def data_dir(self) -> Path:
        return self.tmp / "broker"

    @property
    def url(self) -> str:
        """The broker's URL of the server, as the broker in the holder's namespace reaches it."""
        return f"postgresql://{USER}@{self.postgres.name}:5432/{USER}?target_session_attrs=read-write"

    def broker_args(self, postgresql: bool = True, **extra: Any) -> dict[str, Any]:
        """The broker module's options for a broker in the holder's namespace with domains CORP and
        LAB and a certificate of the test CA; on the server (``postgresql``) or on SQLite."""
        certs = self.pki.issue(f"{self.prefix}-broker", ["localhost", "127.0.0.1"], role="broker")
        args = {
            "admin_token": self.admin_token,
            "client_ca_cert": str(self.pki.ca),
            "domains": ["CORP", "LAB"],
            "ssl_cert": str(certs.cert),
            "ssl_key": str(certs.key),
            "data_dir": str(self.data_dir),
            "name_prefix": self.prefix,
            "network_mode": f"container:{self.holder.name}",
        }
        if postgresql:
            args.update(
                database_url=self.url, database_password=self.password, database_ca_cert=str(self.pki.ca)
            )
        return {**args, **extra}

    def connection(self, **extra: Any) -> dict[str, Any]:
        """The options of the broker_* object modules for this broker's admin API."""
        return {
            "broker_url": f"https://localhost:{self.port}",
            "admin_token": self.admin_token,
            "ca_cert": str(self.pki.ca),
            **extra,
        }

    def admin(self) -> Admin:
        return Admin(Http(self.port, ssl.create_default_context(cafile=str(self.pki.ca))), self.admin_token)

    def client(self) -> BrokerClient:
        """The broker protocol as a connection manager speaks it (its certificate)."""
        return BrokerClient(Http(self.port, self.cm))

    def wait_broker(self, timeout: float = 60.0) -> None:
        """Until the deployed broker's admin API answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.admin().call("GET", "/domains")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "the broker does not answer"
            time.sleep(0.3)

    def psql(self, sql: str) -> str:
        """Run ``sql`` as the superuser in the database :data:`USER` over the server's socket; its
        output (unaligned)."""
        return psql(self.postgres, sql, USER)


def psql(container: Any, sql: str, dbname: str) -> str:
    """Run ``sql`` as the superuser in ``dbname`` over the socket of the server in ``container``;
    its output (unaligned)."""
    code, out = container.exec_run(
        ["psql", "-h", "/var/lib/postgresql", "-U", "postgres", "-d", dbname, "-v", "ON_ERROR_STOP=1",
         "-At", "-c", sql],
    )  # fmt: skip
    text = out.decode(errors="replace").strip()
    assert code == 0, f"psql failed: {text}"
    return text


@dataclass
class PostgresServer:
    container: Any  # docker.models.containers.Container
    port: int
    password: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, dbname: str = USER, hosts: str = "") -> str:
        """The broker's ``Database`` URL for ``dbname`` here (or on ``hosts``, a libpq host list)."""
        return f"postgresql://{USER}@{hosts or self.host}/{dbname}?target_session_attrs=read-write"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the container's socket; its output (unaligned)."""
        return psql(self.container, sql, dbname)

    def create_database(self, name: str = "") -> str:
        """A new empty database owned by :data:`USER` (named ``name``, or a new name); its name."""
        name = name or f"t{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}" OWNER "{USER}"')
        return name

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.container.reload()
            if self.container.status != "running":
                logs = self.container.logs(tail=30).decode(errors="replace")
                pytest.fail(f"{IMAGE} stopped while starting:\n{logs}")
            code, _out = self.container.exec_run(["gatehouse-postgres", "health"])
            if code == 0 and self._tcp_login():
                return
            time.sleep(0.3)
        pytest.fail(f"{IMAGE} did not accept connections within {START_TIMEOUT:.0f} s")

    def _tcp_login(self) -> bool:
        import psycopg

        try:
            psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                            dbname=USER, connect_timeout=2).close()  # fmt: skip
        except psycopg.OperationalError:
            return False
        return True

    def set_read_only(self, read_only: bool) -> None:
        """Take writes or not, like a primary and a standby to libpq's ``target_session_attrs``;
        sessions already open follow from their next transaction on."""
        self.psql(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}")
        self.psql("SELECT pg_reload_conf()")

    def restart(self) -> None:
        """``docker restart``: the server shuts down (its connections end) and comes back."""
        self.container.restart(timeout=10)
        self.wait_ready()


@contextlib.contextmanager
def running(*extra_args: str, password: str = "", tls_dir: str = "") -> Iterator[PostgresServer]:
    """A new server; ``password``: :data:`USER`'s (a new one if empty); ``tls_dir``: a host
    directory with server.crt and server.key, mounted where the image turns TLS on."""
    cli = docker_client()
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: run IMAGES=postgres hack/build-images.sh (or make images)")
    port = free_port()
    password = password or f"pw-{uuid.uuid4().hex}"
    container = cli.containers.run(
        IMAGE,
        ["server", *extra_args],
        name=f"ghtest-pg-{uuid.uuid4().hex[:8]}",
        detach=True,
        ports={"5432/tcp": ("127.0.0.1", port)},
        environment={"POSTGRES_USER": USER, "POSTGRES_PASSWORD": password},
        volumes={tls_dir: {"bind": "/etc/gatehouse-postgres/tls", "mode": "ro"}} if tls_dir else {},
    )
    try:
        server = PostgresServer(container, port, password)
        server.wait_ready()
        yield server
    finally:
        container.remove(force=True, v=True)


@dataclass
class BrokerDatabase:
    """One empty broker database of ``engine``: ``open()`` opens it (again) as the broker does."""

    engine: str
    target: str
    password: str = ""

    def open(self, upto: int | None = None):  # -> gatehouse.broker.db.Database
        from gatehouse.broker.db import SCHEMA_VERSION, Database

        return Database.open(
            self.target, upto=SCHEMA_VERSION if upto is None else upto, password=self.password
        )
