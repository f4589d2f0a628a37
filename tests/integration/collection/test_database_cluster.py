"""gatehouse.access.database: a three-node Patroni + etcd cluster on the local Docker engine.

Three "hosts" are holder containers with fixed addresses on a Docker network of their own (a /26
of GATEHOUSE_TEST_DATABASE_POOL, 10.231.1.0/24 by default); the module deploys each node's etcd
member and Patroni node into its holder's network namespace (``network_mode:
container:<holder>``, the way the collection's tests run several hosts on one engine), each
node with its own name prefix and data directory (tests/integration/database_cluster.py builds
it; bench/database_failover.py uses the same). Every connection is TLS, verified against the
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
import json
import socket
import stat
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import PlaybookRun, no_secret, run_module, run_playbook
from database_cluster import (
    BROKER_PW,
    NAMES,
    PREFIX,
    REPLICATION_PW,
    SECRETS,
    SUPERUSER_PW,
    Cluster,
    hosts,
    ok,
    run_all,
)
from pki import TestPKI

pytestmark = [pytest.mark.docker, pytest.mark.images]

FAILOVER_LIMIT = 15.0


@pytest.fixture
def cluster(pki: TestPKI, tmp_path: Path):
    with hosts(pki, tmp_path, f"{PREFIX}{uuid.uuid4().hex[:8]}") as built:
        yield built


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
    no_secret(play, SECRETS)
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
