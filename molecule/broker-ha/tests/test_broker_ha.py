"""broker-ha: two brokers on a Patroni/etcd PostgreSQL cluster behind the HALB; the database primary
and a broker killed under client load."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import gatehouse_verify as gv

SCENARIO = "broker-ha"
NETWORK = "gh-mol-bha"
VIP = gv.address(6, 100)
BROKERS = ["gh-bha-broker1", "gh-bha-broker2"]
DATABASES = {
    "gh-bha-broker1": gv.address(6, 10),
    "gh-bha-broker2": gv.address(6, 11),
    "gh-bha-db3": gv.address(6, 12),
}
SECRETS = gv.STATE_ROOT / SCENARIO / "secrets"
RESUME_WITHIN = 15.0  # s from the primary's kill to logins that all succeed


def tls() -> ssl.SSLContext:
    """The deployment CA: the brokers and the database nodes carry its certificates."""
    return ssl.create_default_context(cafile=str(SECRETS / "ca" / "ca.pem"))


def status(url: str, **request: Any) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, **request), timeout=5, context=tls()) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def patroni(node: str, path: str) -> int:
    """Patroni's REST API on a database node: /primary, /replica answer 200 on such a node."""
    return status(f"https://{DATABASES[node]}:8008/{path}")


def primary() -> str:
    found = [node for node in DATABASES if patroni(node, "primary") == 200]
    assert len(found) == 1, found
    return found[0]


def admin(method: str, path: str, body: dict[str, Any] | None = None) -> int:
    """The brokers' admin API through the HALB's broker virtual server."""
    token = (SECRETS / "admin_token").read_text(encoding="utf-8").strip()
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return status(f"https://{VIP}:8443/api/v1/{path}", data=data, method=method, headers=headers)


def test_services_run_with_labels(host: Any, groups: list[str]) -> None:
    name = host.backend.get_hostname()
    found = gv.services(name)
    assert set(found) == gv.expected_roles(groups)
    for containers in found.values():
        for container in containers:
            assert container.status == "running", container.name
            assert container.labels["gatehouse.host"] == name


def test_the_brokers_share_the_cluster_and_both_serve_behind_the_vip() -> None:
    assert gv.wait_for(lambda: len([n for n in DATABASES if patroni(n, "replica") == 200]) == 2, 60, 1)
    primary()
    for node in BROKERS:
        ip = gv.address(6, 10 if node.endswith("1") else 11)
        assert status(f"https://{ip}:8443/health") == 200, node
    # A user made through one broker is there for the other: both nodes answer the same objects.
    name = f"shared-{uuid.uuid4().hex[:8]}"
    assert admin("PUT", f"users/CORP/{name}", {"display_name": name}) == 200
    for node, ip in (("gh-bha-broker1", gv.address(6, 10)), ("gh-bha-broker2", gv.address(6, 11))):
        token = (SECRETS / "admin_token").read_text(encoding="utf-8").strip()
        got = status(
            f"https://{ip}:8443/api/v1/users/CORP/{name}", headers={"Authorization": f"Bearer {token}"}
        )
        assert got == 200, node
    report = gv.run_client(NETWORK, f"https://{VIP}", gv.password(SCENARIO))
    gv.assert_session(report)


def loop_sessions(seconds: float) -> list[Any]:
    loops = [
        gv.start_session_loop(
            NETWORK, f"https://{VIP}", gv.password(SCENARIO), seconds, name=f"gh-bha-loop{i}"
        )
        for i in (1, 2)
    ]
    for loop in loops:
        gv.wait_for_first_session(loop, 60)
    return loops


def loop_results(loops: list[Any]) -> list[dict[str, Any]]:
    try:
        return sorted(
            (s for loop in loops for s in gv.session_loop_results(loop, 180)), key=lambda s: s["start"]
        )
    finally:
        for loop in loops:
            gv.remove_quietly(loop)


PROMETHEUS = f"http://{gv.address(6, 12)}:9090"


def prometheus(path: str, **query: str) -> Any:
    url = f"{PROMETHEUS}/api/v1/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the scenario's own Prometheus
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_database_nodes_over_https() -> None:
    def all_up() -> bool:
        found = prometheus("query", query='up{job="gatehouse-postgresql"}')["result"]
        return len(found) == 3 and all(r["value"][1] == "1" for r in found)

    assert gv.wait_for(all_up, 60, 1), prometheus("query", query='up{job="gatehouse-postgresql"}')["result"]
    primaries = prometheus("query", query="sum(patroni_primary)")["result"]
    assert primaries and primaries[0]["value"][1] == "1", primaries


def failover_alerts() -> list[dict[str, Any]]:
    return [
        a for a in prometheus("alerts")["alerts"] if a["labels"]["alertname"] == "GatehouseDatabaseFailover"
    ]


def test_a_killed_database_primary_loses_no_user_and_logins_resume_within_15_s() -> None:
    old = primary()
    patroni_container = gv.services(old)["database-patroni"][0]
    loops = loop_sessions(45)
    try:
        # Committed through the API just before the kill: synchronous replication keeps them.
        made = [f"failover-{uuid.uuid4().hex[:8]}" for _n in range(5)]
        for name in made:
            assert admin("PUT", f"users/CORP/{name}", {"display_name": name}) == 200
        killed_at = time.time()
        patroni_container.kill()
        sessions = loop_results(loops)
    finally:
        patroni_container.reload()
        if patroni_container.status != "running":
            patroni_container.start()
    before = [s for s in sessions if s["end"] < killed_at]
    after = [s for s in sessions if s["start"] >= killed_at + RESUME_WITHIN]
    first_ok = min((s["end"] for s in sessions if s["ok"] and s["start"] >= killed_at), default=None)
    print(
        f"\ndatabase primary {old} killed: {len(before)} sessions before; first successful session ended "
        f"{(first_ok - killed_at) if first_ok else float('nan'):.1f} s after the kill; "
        f"{len(after)} started {RESUME_WITHIN:.0f} s after it, {sum(not s['ok'] for s in after)} failed"
    )
    assert before and all(s["ok"] for s in before), [s["failure"] for s in before if not s["ok"]]
    assert len(after) >= 10, len(after)
    assert all(s["ok"] for s in after), [
        (round(s["start"] - killed_at, 1), s["failure"]) for s in after if not s["ok"]
    ]
    assert primary() != old
    for name in made:
        assert admin("GET", f"users/CORP/{name}") == 200, name
    # Prometheus saw the primary change (GatehouseDatabaseFailover, no pending time).
    assert gv.wait_for(lambda: bool(failover_alerts()), 60, 1), "no GatehouseDatabaseFailover alert"
    # The old primary, running again, rejoins as a replica.
    assert gv.wait_for(lambda: patroni(old, "replica") == 200, 120, 1), f"{old} did not rejoin as a replica"


def test_a_killed_broker_fails_no_session_from_2_s_after_the_kill() -> None:
    node = BROKERS[0]
    broker = gv.services(node)["broker"][0]
    loops = loop_sessions(30)
    try:
        killed_at = time.time()
        broker.kill()
        sessions = loop_results(loops)
    finally:
        broker.reload()
        if broker.status != "running":
            broker.start()
    before = [s for s in sessions if s["end"] < killed_at]
    counted = [s for s in sessions if s["start"] >= killed_at + 2]
    failed = [s for s in counted if not s["ok"]]
    print(
        f"\nbroker {node} killed: {len(before)} sessions before, {len(counted)} from 2 s after, {len(failed)} failed"
    )
    assert before and all(s["ok"] for s in before), [s["failure"] for s in before if not s["ok"]]
    assert len(counted) >= 10, len(counted)
    assert not failed, [(round(s["start"] - killed_at, 2), s["failure"]) for s in failed]
    assert gv.wait_for(lambda: status(f"https://{gv.address(6, 10)}:8443/health") == 200, 60, 1)
