"""gatehouse.access.database: a three-node Patroni + etcd cluster on the local Docker engine.

Three "hosts" are holder containers with fixed addresses on a Docker network of their own (a /26
of GATEHOUSE_TEST_DATABASE_POOL, 10.231.1.0/24 by default); the module deploys each node's etcd
member and Patroni node into its holder's network namespace (``network_mode:
container:<holder>``, the way the collection's tests run several hosts on one engine), each
node with its own name prefix and data directory. Every connection is TLS, verified against the
test CA: etcd's clients and peers with client certificates, PostgreSQL with sslmode=verify-full,
Patroni's REST API over HTTPS.

The broker's way in is a multi-host URL with target_session_attrs=read-write. Rows are written
through it; the primary's Patroni container is killed (docker kill); a write through the same URL
succeeds within 15 s, and every row committed before the kill is there (synchronous replication).
The old primary, started again, rejoins as a replica (its REST API answers 200 on /replica and it
has the rows written after its loss: pg_rewind). A second run of the module changes nothing, and
neither does the role on an inventory group databases of the three nodes (members from the
inventory). state=absent removes a node and keeps its data unless purge is set.
Check mode changes nothing, the diff shows no password, and a bad option fails before any change.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import AnsibleRun, PlaybookRun, run_module, run_playbook
from deploy_helpers import cleanup, docker_client, free_cidr
from pki import TestPKI

pytestmark = [pytest.mark.docker, pytest.mark.images]

IMAGE = "gatehouse/database:0.1.0"
SUPERUSER_PW = "Su-" + uuid.uuid4().hex
REPLICATION_PW = "Rep-" + uuid.uuid4().hex
BROKER_PW = "Brk-" + uuid.uuid4().hex
SECRETS = (SUPERUSER_PW, REPLICATION_PW, BROKER_PW)
NAMES = ("db1", "db2", "db3")
FAILOVER_LIMIT = 15.0


@dataclass
class Node:
    name: str
    address: str
    prefix: str
    holder: Any
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
            "network_mode": f"container:{node.holder.name}",
            "host_label": node.name,
            "min_free_disk_gb": 0.5,
            **extra,
        }

    def url(self) -> str:
        hosts = ",".join(f"{n.address}:5432" for n in self.nodes)
        return (
            f"postgresql://broker@{hosts}/broker?target_session_attrs=read-write&sslmode=verify-full"
            f"&sslrootcert={self.pki.ca}&connect_timeout=2"
        )

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url(), password=BROKER_PW, autocommit=True)

    def rest(self, node: Node, path: str) -> tuple[int, Any]:
        """(status, JSON body) of GET https://<node>:8008<path>; (0, None) when it does not answer."""
        try:
            with urllib.request.urlopen(
                f"https://{node.address}:8008{path}", context=self.ca, timeout=2
            ) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

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


def no_secret(run: AnsibleRun) -> None:
    for secret in SECRETS:
        assert secret not in run.stdout and secret not in run.stderr


def ok(run: AnsibleRun) -> dict[str, Any]:
    assert not run.failed, run.result.get("msg", run.stdout[-3000:])
    no_secret(run)
    return run.result


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


@pytest.fixture
def cluster(pki: TestPKI, tmp_path: Path):
    cli = docker_client()
    try:
        cli.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: run make images (IMAGES=database hack/build-images.sh)")
    prefix = f"ghp-db-{uuid.uuid4().hex[:8]}"
    try:
        cidr = free_cidr(
            cli, pool=os.environ.get("GATEHOUSE_TEST_DATABASE_POOL", "10.231.1.0/24"), prefixlen=26
        )
        hosts = list(ipaddress.ip_network(cidr).hosts())
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=cidr, gateway=str(hosts[0]))]
        )
        network = cli.networks.create(f"{prefix}-net", driver="bridge", ipam=ipam)
        nodes = []
        for index, name in enumerate(NAMES):
            address = str(hosts[10 + index])
            node_prefix = f"{prefix}-{name}"
            box = holder(cli, f"{node_prefix}-host", network.name, address)
            cert = pki.issue(f"{node_prefix}", [address, name])
            nodes.append(Node(name, address, node_prefix, box, tmp_path / name, cert))
        context = ssl.create_default_context(cafile=str(pki.ca))
        yield Cluster(cli, prefix, pki, nodes, context)
    finally:
        cleanup(cli, prefix)


def run_all(cluster: Cluster, **kwargs: Any) -> list[AnsibleRun]:
    """The module on every node at once (like a play on the group databases)."""
    runs: list[AnsibleRun | None] = [None] * len(cluster.nodes)

    def one(i: int) -> None:
        runs[i] = run_module("database", cluster.params(cluster.nodes[i]), **kwargs)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cluster.nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in runs if r is not None]


def test_database_cluster_failover(cluster: Cluster) -> None:
    first = cluster.nodes[0]

    # A bad option fails before anything is changed.
    bad = run_module("database", cluster.params(first, ttl=6, loop_wait=2, retry_timeout=4))
    assert bad.failed and "must not exceed ttl" in bad.result["msg"]
    assert not first.data_dir.exists()
    # So does the preflight: too little free disk, a host port taken (held here, or by another program).
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            taken.bind(("0.0.0.0", 2380))
            taken.listen()
        bad = run_module("database", cluster.params(first, network_mode="host", min_free_disk_gb=1e6))
    assert bad.failed
    errors = bad.result["errors"]
    assert any("GiB free on the file system" in e for e in errors), errors
    assert any("already in use" in e and "2380" in e for e in errors), errors
    assert not first.data_dir.exists()

    # Check mode with diff: the plan, no change on the host, no password in the diff.
    planned = run_module("database", cluster.params(first), check=True, diff=True)
    result = ok(planned)
    assert result["changed"]
    assert {c["name"]: c["action"] for c in result["containers"]} == {
        f"{first.prefix}-etcd": "create",
        f"{first.prefix}-patroni": "create",
    }
    assert not first.data_dir.exists()
    assert not cluster.cli.containers.list(all=True, filters={"name": f"{first.prefix}-etcd"})

    # The three nodes, for real.
    started = time.monotonic()
    for run in run_all(cluster, diff=True):
        assert ok(run)["changed"]
    print(f"\ndeployed in {time.monotonic() - started:.0f} s")
    roles = cluster.wait_healthy(120)
    deployed = time.monotonic() - started
    for node in cluster.nodes:
        secrets = node.data_dir / "secrets"
        assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
        for name in ("superuser", "replication", "broker"):
            assert stat.S_IMODE((secrets / f"{name}.password").stat().st_mode) == 0o600
        attrs = cluster.cli.containers.get(node.patroni).attrs
        exposed = json.dumps(
            [attrs["Config"].get("Env"), attrs["Config"].get("Cmd"), attrs["Config"]["Labels"]]
        )
        assert not any(s in exposed for s in SECRETS)
        logs = cluster.cli.containers.get(node.patroni).logs().decode(errors="replace")
        assert not any(s in logs for s in SECRETS)
        assert SUPERUSER_PW not in (node.data_dir / "data" / "patroni.yml").read_text()

    # etcd refuses a client without a certificate of the CA (its client port needs one).
    with pytest.raises(OSError):
        urllib.request.urlopen(f"https://{first.address}:2379/version", context=cluster.ca, timeout=3)

    # Rows through the broker's multi-host URL.
    with cluster.connect() as conn:
        primary_address = conn.info.host
        conn.execute(
            "CREATE TABLE IF NOT EXISTS failover (id integer PRIMARY KEY, at timestamptz DEFAULT now())"
        )
        for i in range(1, 201):
            conn.execute("INSERT INTO failover (id) VALUES (%s)", (i,))
        assert conn.execute("SHOW ssl").fetchone()[0] == "on"
        assert conn.pgconn.ssl_in_use
    primary = next(n for n in cluster.nodes if n.address == primary_address)
    assert roles[primary.name] == "leader"
    assert cluster.rest(primary, "/primary")[0] == 200

    # Kill the primary's Patroni (and so its PostgreSQL): a write through the same URL succeeds soon.
    killed = time.monotonic()
    cluster.cli.containers.get(primary.patroni).kill()
    failover = None
    last_error = ""
    while time.monotonic() - killed < FAILOVER_LIMIT + 5:
        try:
            with cluster.connect() as conn:
                conn.execute("INSERT INTO failover (id) VALUES (%s)", (1000,))
                failover = time.monotonic() - killed
                new_primary = conn.info.host
                break
        except psycopg.Error as exc:
            last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            time.sleep(0.2)
    assert failover is not None, f"no write succeeded within {FAILOVER_LIMIT + 5} s: {last_error}"
    print(
        f"\nfailover: first successful write {failover:.1f} s after the kill (deployed in {deployed:.0f} s)"
    )
    assert failover <= FAILOVER_LIMIT, f"failover took {failover:.1f} s"
    assert new_primary != primary.address
    with cluster.connect() as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM failover ORDER BY id")]
        # Every row committed before the kill survived (synchronous replication); no row was lost.
        assert ids == [*range(1, 201), 1000]
        for i in range(1001, 1011):
            conn.execute("INSERT INTO failover (id) VALUES (%s)", (i,))

    # The old primary, started again, rejoins as a replica and catches up.
    cluster.cli.containers.get(primary.patroni).start()
    deadline = time.monotonic() + 90
    while cluster.rest(primary, "/replica")[0] != 200:
        assert time.monotonic() < deadline, f"{primary.name} did not rejoin: {cluster.cluster_state()}"
        time.sleep(1)
    deadline = time.monotonic() + 30
    replica_url = (
        f"postgresql://broker@{primary.address}:5432/broker?sslmode=verify-full&sslrootcert={cluster.pki.ca}"
    )
    while True:
        try:
            with psycopg.connect(replica_url, password=BROKER_PW, autocommit=True) as conn:
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
                if conn.execute("SELECT count(*) FROM failover WHERE id > 1000").fetchone()[0] == 10:
                    break
        except psycopg.OperationalError:
            pass
        assert time.monotonic() < deadline, (
            "the rejoined replica does not have the rows written after the failover"
        )
        time.sleep(0.5)

    # The same options again: nothing changes, on every node.
    for run in run_all(cluster, diff=True):
        result = ok(run)
        assert not result["changed"], result
        assert result["containers"] == []

    # The role on the group databases (members from the inventory) asks for the same: no change.
    play = run_role(cluster, cluster.nodes[0].data_dir.parent)
    assert not any(s in play.stdout or s in play.stderr for s in SECRETS)
    assert play.returncode == 0, play.stdout[-3000:]
    stats = play.report["stats"]
    assert set(stats) == set(NAMES)
    assert all(stats[name]["changed"] == 0 and stats[name]["failures"] == 0 for name in NAMES), stats

    # state=absent removes a node's containers and files but keeps its data; purge deletes that too.
    last = cluster.nodes[-1]
    removal = run_module("database", {**cluster.params(last), "state": "absent"})
    gone = ok(removal)
    assert {c["name"] for c in gone["containers"]} == {f"{last.prefix}-etcd", last.patroni}
    assert sorted(p.name for p in last.data_dir.iterdir()) == ["etcd", "pgdata"]
    assert any("purge=true" in w for w in removal.warnings), removal.warnings
    purged = ok(run_module("database", {**cluster.params(last), "state": "absent", "purge": True}))
    assert purged["changed"] and not last.data_dir.exists()


def run_role(cluster: Cluster, workdir: Path) -> PlaybookRun:
    """The role gatehouse.access.database on an inventory group databases of the three nodes."""
    hosts = {}
    for node in cluster.nodes:
        params = cluster.params(node)
        hosts[node.name] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ansible_host": node.address,
            "database_ssl_cert": params["ssl_cert"],
            "database_ssl_key": params["ssl_key"],
            "database_ca_cert": params["ca_cert"],
            "database_data_dir": params["data_dir"],
            "database_name_prefix": params["name_prefix"],
            "database_network_mode": params["network_mode"],
        }
    group_vars = {
        "database_superuser_password": SUPERUSER_PW,
        "database_replication_password": REPLICATION_PW,
        "database_broker_password": BROKER_PW,
        "database_broker_database": "broker",
        "database_broker_role": "broker",
        "database_min_free_disk_gb": 0.5,
    }
    inventory = workdir / "inventory.yml"
    inventory.write_text(json.dumps({"databases": {"hosts": hosts, "vars": group_vars}}))
    playbook = workdir / "database.yml"
    playbook.write_text(
        json.dumps([{"hosts": "databases", "gather_facts": False, "roles": ["gatehouse.access.database"]}])
    )
    return run_playbook("-i", str(inventory), str(playbook), "--diff")
