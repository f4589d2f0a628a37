"""A three-node Patroni + etcd cluster deployed by gatehouse.access.database on the local engine.

Three "hosts" are holder containers with fixed addresses on a Docker network of their own (a /26
of GATEHOUSE_TEST_DATABASE_POOL, 10.231.1.0/24 by default; names starting with
GATEHOUSE_TEST_DATABASE_PREFIX, ghp-db- by default); the module deploys each node's etcd
member and Patroni node into its holder's network namespace (``network_mode:
container:<holder>``), each node with its own name prefix and data directory. Every connection is
TLS, verified against the test CA. Shared by tests/integration/collection/test_database_cluster.py
and bench/database_failover.py.

:func:`bridged_hosts` builds the production layout instead: three addresses of this host (on the
host side of a veth pair the test creates), each node in ``network_mode: bridge`` publishing its
ports on its own address (``publish_address``); the nodes reach each other through the
published ports (relayed by the engine's docker-proxy, whose address the certificates name too).

Invariant: every Docker object of a cluster starts with its ``prefix``; :func:`deployed` removes
them all when it ends, whatever happened.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import collection_helpers
import docker
import psycopg
import pytest
from collection_helpers import AnsibleRun, run_module
from deploy_helpers import cleanup, docker_client, free_cidr
from pki import TestPKI

IMAGE = "gatehouse/database:0.1.0"
SUPERUSER_PW = "Su-" + uuid.uuid4().hex
REPLICATION_PW = "Rep-" + uuid.uuid4().hex
BROKER_PW = "Brk-" + uuid.uuid4().hex
SECRETS = (SUPERUSER_PW, REPLICATION_PW, BROKER_PW)
# Every run of the cluster's modules the tests and the bench check: none of SECRETS in its output.
ok = partial(collection_helpers.ok, secrets=SECRETS)
NAMES = ("db1", "db2", "db3")
POOL = os.environ.get("GATEHOUSE_TEST_DATABASE_POOL", "10.231.1.0/24")
# The start of every Docker object's name (a cluster adds a random suffix).
PREFIX = os.environ.get("GATEHOUSE_TEST_DATABASE_PREFIX", "ghp-db-")


@dataclass
class Node:
    name: str
    address: str
    prefix: str
    holder: Any  # None: the node runs in bridge mode, publishing on ``address``
    data_dir: Path
    cert: Any

    @property
    def patroni(self) -> str:
        return f"{self.prefix}-patroni"


@dataclass
class Cluster:
    cli: Any
    prefix: str
    pki: TestPKI
    nodes: list[Node]
    ca: ssl.SSLContext

    def params(self, node: Node, **extra: Any) -> dict[str, Any]:
        return {
            "name": node.name,
            "address": node.address,
            "members": [{"name": n.name, "address": n.address} for n in self.nodes],
            "superuser_password": SUPERUSER_PW,
            "replication_password": REPLICATION_PW,
            "broker_password": BROKER_PW,
            "broker_database": "broker",
            "broker_role": "broker",
            "ssl_cert": str(node.cert.cert),
            "ssl_key": str(node.cert.key),
            "ca_cert": str(node.cert.ca),
            "data_dir": str(node.data_dir),
            "name_prefix": node.prefix,
            **(
                {"network_mode": f"container:{node.holder.name}"}
                if node.holder is not None
                else {"network_mode": "bridge", "publish_address": node.address}
            ),
            "host_label": node.name,
            "min_free_disk_gb": 0.5,
            **extra,
        }

    def url(self, connect_timeout: int = 2) -> str:
        """The broker's way in: every node, target_session_attrs=read-write, sslmode=verify-full."""
        hosts = ",".join(f"{n.address}:5432" for n in self.nodes)
        return (
            f"postgresql://broker@{hosts}/broker?target_session_attrs=read-write&sslmode=verify-full"
            f"&sslrootcert={self.pki.ca}&connect_timeout={connect_timeout}"
        )

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url(), password=BROKER_PW, autocommit=True)

    def rest(self, node: Node, path: str, timeout: float = 2) -> tuple[int, Any]:
        """(status, JSON body) of GET https://<node>:8008<path>; (0, None) when it does not answer."""
        try:
            with urllib.request.urlopen(
                f"https://{node.address}:8008{path}", context=self.ca, timeout=timeout
            ) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def primary(self) -> Node | None:
        """The node whose Patroni answers 200 on /primary (None while there is none)."""
        for node in self.nodes:
            if self.rest(node, "/primary")[0] == 200:
                return node
        return None

    def cluster_state(self) -> list[dict]:
        for node in self.nodes:
            status, body = self.rest(node, "/cluster")
            if status == 200 and body:
                return body.get("members", [])
        return []

    def wait_healthy(self, timeout: float) -> dict[str, str]:
        """Wait for a leader, a synchronous standby and a streaming replica; {name: role}."""
        deadline = time.monotonic() + timeout
        members: list[dict] = []
        while time.monotonic() < deadline:
            members = self.cluster_state()
            roles = {m["name"]: m["role"] for m in members}
            running = all(m.get("state") in ("running", "streaming") for m in members)
            if (
                len(members) == 3
                and running
                and sorted(roles.values()) == ["leader", "replica", "sync_standby"]
                and all(m.get("lag", 0) == 0 for m in members if m["role"] != "leader")
            ):
                return roles
            time.sleep(1)
        logs = {
            n.name: self.cli.containers.get(n.patroni).logs(tail=15).decode(errors="replace")
            for n in self.nodes
        }
        pytest.fail(f"the cluster is not healthy within {timeout} s: {members}\n{logs}")

    def write_after_kill(self, node: Node, table: str, row: int, limit: float) -> tuple[float, str]:
        """Kill ``node``'s Patroni container; (seconds until a write through the broker's URL
        succeeded, the host it went to). Fails the test after ``limit`` + 5 s."""
        killed = time.monotonic()
        self.cli.containers.get(node.patroni).kill()
        last_error = ""
        while time.monotonic() - killed < limit + 5:
            try:
                with self.connect() as conn:
                    conn.execute(f"INSERT INTO {table} (id) VALUES (%s)", (row,))
                    return time.monotonic() - killed, conn.info.host
            except psycopg.Error as exc:
                last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                time.sleep(0.2)
        pytest.fail(f"no write succeeded within {limit + 5} s of the kill: {last_error}")


def holder(cli: Any, name: str, network: str, address: str) -> Any:
    """A container that stands for a host: a network namespace with a fixed address."""
    host_config = cli.api.create_host_config(network_mode=network)
    networking = cli.api.create_networking_config(
        {network: cli.api.create_endpoint_config(ipv4_address=address)}
    )
    created = cli.api.create_container(
        IMAGE,
        entrypoint=["sleep", "infinity"],
        name=name,
        host_config=host_config,
        networking_config=networking,
        detach=True,
    )
    cli.api.start(created["Id"])
    return cli.containers.get(created["Id"])


@contextmanager
def hosts(pki: TestPKI, workdir: Path, prefix: str, pool: str = POOL) -> Iterator[Cluster]:
    """The network and the three holders of a cluster (nothing deployed yet); all removed at the end."""
    cli = docker_client()
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: run make images (IMAGES=database hack/build-images.sh)")
    try:
        cidr = free_cidr(cli, pool=pool, prefixlen=26)
        addresses = list(ipaddress.ip_network(cidr).hosts())
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=cidr, gateway=str(addresses[0]))]
        )
        network = cli.networks.create(f"{prefix}-net", driver="bridge", ipam=ipam)
        nodes = []
        for index, name in enumerate(NAMES):
            address = str(addresses[10 + index])
            node_prefix = f"{prefix}-{name}"
            box = holder(cli, f"{node_prefix}-host", network.name, address)
            cert = pki.issue(f"{node_prefix}", [address, name])
            nodes.append(Node(name, address, node_prefix, box, workdir / name, cert))
        context = ssl.create_default_context(cafile=str(pki.ca))
        yield Cluster(cli, prefix, pki, nodes, context)
    finally:
        cleanup(cli, prefix)


def require_image(cli: Any) -> None:
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: run make images (IMAGES=database hack/build-images.sh)")


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@contextmanager
def host_addresses(link: str, addresses: list[str]) -> Iterator[None]:
    """``addresses`` (/32 each) as addresses of this host, on the host side ``link`` of a veth
    pair made for them (a dummy interface needs a kernel module that may be missing); the pair,
    and with it the addresses, is deleted at the end, whatever happened."""
    try:
        _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
        for address in addresses:
            _ip("addr", "add", f"{address}/32", "dev", link)
        _ip("link", "set", f"{link}p", "up")
        _ip("link", "set", link, "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def proxy_source(cli: Any) -> str:
    """The address the engine's docker-proxy connects to a container on the default bridge from."""
    config = cli.networks.get("bridge").attrs["IPAM"]["Config"][0]
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@contextmanager
def bridged_hosts(pki: TestPKI, workdir: Path, prefix: str, addresses: list[str]) -> Iterator[Cluster]:
    """A cluster of three bridge-mode nodes on this host, each publishing on one of ``addresses``
    (made addresses of the host here, named by the node's certificate); at the end the
    containers, the data directories and the addresses are removed, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("the host addresses of the bridge-mode nodes need root (ip link, ip addr)")
    cli = docker_client()
    require_image(cli)
    try:
        with host_addresses(f"{prefix[:11]}v", addresses):
            # etcd accepts a peer only from an address its certificate names. On one engine a
            # container's connection to another node's published port is relayed by the engine's
            # docker-proxy, so every peer arrives from the default bridge's gateway: the
            # certificates name it too, as a production certificate names the address its host's
            # connections leave from (docs/broker-ha.md, "TLS").
            source = proxy_source(cli)
            nodes = []
            for name, address in zip(NAMES, addresses, strict=True):
                node_prefix = f"{prefix}-{name}"
                cert = pki.issue(node_prefix, [address, name, source])
                nodes.append(Node(name, address, node_prefix, None, workdir / name, cert))
            context = ssl.create_default_context(cafile=str(pki.ca))
            try:
                yield Cluster(cli, prefix, pki, nodes, context)
            finally:
                cleanup(cli, prefix)
    finally:
        cleanup(cli, prefix)
        for name in NAMES:
            shutil.rmtree(workdir / name, ignore_errors=True)


def run_all(cluster: Cluster, **kwargs: Any) -> list[AnsibleRun]:
    """The module on every node at once (like a play on the group databases); ``extra`` adds options."""
    extra = kwargs.pop("extra", {})
    runs: list[AnsibleRun | None] = [None] * len(cluster.nodes)

    def one(i: int) -> None:
        runs[i] = run_module("database", cluster.params(cluster.nodes[i], **extra), **kwargs)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cluster.nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in runs if r is not None]
