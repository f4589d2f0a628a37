"""gatehouse.access.database in its production network mode, ``bridge``, three nodes on one engine.

The default network mode runs each node's containers on Docker's default bridge and publishes
5432, 8008, 2379 and 2380 on the host. Three nodes on one engine cannot all publish on every
address, so each one publishes on an address of its own (``publish_address``): 10.231.4.11-13 by
default (GATEHOUSE_TEST_DATABASE_BRIDGE_ADDRESSES), /32 addresses on the host side of a veth pair
the test creates. Each node advertises that address (``address``) and its certificate names it.
The nodes reach each other only through the published ports: a container on the default bridge
dials another node's host address and the engine (its docker-proxy, or its DNAT) hands the
connection to that node's container.

The cluster elects one primary; a multi-host URL over the three addresses (target_session_attrs=
read-write, sslmode=verify-full) writes rows; the primary's Patroni container is killed and a write
through the same URL succeeds within 15 s. With the old primary started again (it rejoins as a
replica), a second run of the module on every node changes nothing. The containers, the data
directories, the addresses and the veth pair are removed at the end, also when the test fails.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from database_cluster import Cluster, bridged_hosts, ok, run_all
from pki import TestPKI

pytestmark = [pytest.mark.docker, pytest.mark.images]

FAILOVER_LIMIT = 15.0
ADDRESSES = os.environ.get("GATEHOUSE_TEST_DATABASE_BRIDGE_ADDRESSES", "10.231.4.11,10.231.4.12,10.231.4.13")
PREFIX = os.environ.get("GATEHOUSE_TEST_DATABASE_BRIDGE_PREFIX", "ghd-db-")


@pytest.fixture
def cluster(pki: TestPKI, tmp_path: Path):
    with bridged_hosts(pki, tmp_path, f"{PREFIX}{uuid.uuid4().hex[:4]}", ADDRESSES.split(",")) as built:
        yield built


def test_database_cluster_in_bridge_mode_fails_over_through_the_published_ports(cluster: Cluster) -> None:
    first = cluster.nodes[0]

    # publish_address with another network mode is refused before anything is changed.
    bad = run_module("database", {**cluster.params(first), "network_mode": "host"})
    assert bad.failed and "publish_address is only used with network_mode=bridge" in str(bad.result)
    assert not first.data_dir.exists()

    started = time.monotonic()
    for run in run_all(cluster):
        result = ok(run)
        assert result["changed"], result
        assert result["config"]["network_mode"] == "bridge"
        assert result["config"]["publish_address"] == result["config"]["address"]
    roles = cluster.wait_healthy(180)
    print(f"\nhealthy {time.monotonic() - started:.0f} s after the deployment began: {roles}")
    for node in cluster.nodes:
        for service in ("etcd", "patroni"):
            attrs = cluster.cli.containers.get(f"{node.prefix}-{service}").attrs
            assert attrs["HostConfig"]["NetworkMode"] in ("bridge", "default")
            bindings = attrs["HostConfig"]["PortBindings"]
            assert len(bindings) == 2
            assert all(
                b == [{"HostIp": node.address, "HostPort": p.split("/")[0]}] for p, b in bindings.items()
            )
    # Patroni knows the members by their advertised (published) addresses.
    assert {m["host"] for m in cluster.cluster_state()} == {n.address for n in cluster.nodes}

    # One primary; the broker's multi-host URL writes to it.
    primaries = [n for n in cluster.nodes if cluster.rest(n, "/primary")[0] == 200]
    assert len(primaries) == 1, cluster.cluster_state()
    (primary,) = primaries
    assert roles[primary.name] == "leader"
    with cluster.connect() as conn:
        assert conn.info.host == primary.address
        conn.execute("CREATE TABLE bridged (id integer PRIMARY KEY)")
        for i in range(1, 51):
            conn.execute("INSERT INTO bridged (id) VALUES (%s)", (i,))
        assert conn.pgconn.ssl_in_use

    failover, new_host = cluster.write_after_kill(primary, "bridged", 1000, FAILOVER_LIMIT)
    print(f"\nbridge-mode failover: first successful write {failover:.1f} s after the kill ({new_host})")
    assert failover <= FAILOVER_LIMIT, f"failover took {failover:.1f} s"
    assert new_host != primary.address
    with cluster.connect() as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM bridged ORDER BY id")] == [*range(1, 51), 1000]

    # The old primary, started again, rejoins as a replica; then the same options change nothing.
    cluster.cli.containers.get(primary.patroni).start()
    deadline = time.monotonic() + 90
    while cluster.rest(primary, "/replica")[0] != 200:
        assert time.monotonic() < deadline, f"{primary.name} did not rejoin: {cluster.cluster_state()}"
        time.sleep(1)
    for run in run_all(cluster):
        result = ok(run)
        assert not result["changed"], result
        assert result["containers"] == []
