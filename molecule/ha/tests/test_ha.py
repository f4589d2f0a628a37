"""ha: two CM/SG hosts behind a HALB pair, a broker, three desktops; failover of the primary HALB."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import gatehouse_verify as gv

SCENARIO = "ha"
NETWORK = "gh-mol-ha"
VIP = gv.address(2, 100)
CMS = {gv.address(2, 21), gv.address(2, 22)}
HALB = ["gh-ha-halb1", "gh-ha-halb2"]


def test_services_run_with_labels(host: Any, groups: list[str]) -> None:
    name = host.backend.get_hostname()
    found = gv.services(name)
    assert set(found) == gv.expected_roles(groups)
    for containers in found.values():
        for container in containers:
            assert container.status == "running", container.name
            assert container.labels["gatehouse.host"] == name


def test_secrets_are_private(host: Any, groups: list[str], hostvars: dict[str, Any]) -> None:
    name = host.backend.get_hostname()
    agents = [a["name"] for a in hostvars.get("agent_instances", [])] if "desktops" in groups else []
    root = str(gv.STATE_ROOT / SCENARIO / name)
    files = gv.secret_files(root, groups, agents)
    if "halb" in groups:
        files += [f"{root}/halb-tls/vip.key", f"{root}/halb/haproxy/certs/cm.pem"]
    for path in files:
        assert host.file(path).mode == 0o600, path


def test_vip_listens_tls_1_2_only(host: Any, groups: list[str]) -> None:
    if "halb" not in groups:
        return
    assert host.socket(f"tcp://{VIP}:443").is_listening or host.socket("tcp://0.0.0.0:443").is_listening
    if gv.holds_vip(host.backend.get_hostname(), VIP):
        old, new = gv.tls_version_results(host, VIP, 443)
        assert new == 0 and old != 0


def test_exactly_one_halb_holds_the_vip() -> None:
    assert [gv.holds_vip(node, VIP) for node in HALB].count(True) == 1


def test_sessions_through_the_vip_are_balanced_over_both_cms() -> None:
    targets = set()
    for attempt in range(6):
        report = gv.run_client(NETWORK, f"https://{VIP}", gv.password(SCENARIO))
        assert report["ok"], f"session {attempt + 1}: {gv.client_failure(report)}"
        gv.assert_session(report)
        targets.add(report["target"].split(":")[0])
    # Each session's gateway is the SG of the CM that handled it; new clients are spread
    # round-robin over both CMs, so both gateways appear.
    assert targets == CMS


def test_service_containers_are_locked_down(host: Any) -> None:
    name = host.backend.get_hostname()
    nofile = gv.engine_nofile()
    for containers in gv.services(name).values():
        for container in containers:
            gv.assert_locked_down(container, nofile)


def test_a_cm_whose_sg_dies_gets_no_new_clients_after_2_s_and_returns() -> None:
    """Two clients loop sessions through the VIP while one node's SG is killed and started again.

    The CM answers 503 on /health while its SG is down; the HALB (check every 500 ms, fall 2)
    takes it out of service, so no session that starts 2 s after the kill or later fails.
    """
    node, dead = "gh-ha-cmsg1", gv.address(2, 21)
    sg = gv.services(node)["sg"][0]
    secret = gv.password(SCENARIO)
    loops = [
        gv.start_session_loop(NETWORK, f"https://{VIP}", secret, 40, name=f"gh-ha-sgloop{i}") for i in (1, 2)
    ]
    try:
        for loop in loops:
            gv.wait_for_first_session(loop)
        killed_at = time.time()
        sg.kill()
        time.sleep(12)
        sg.reload()
        assert sg.status != "running", "the SG came back by itself; the test needs it down"
        sg.start()
        restarted_at = time.time()
        sessions = sorted(
            (s for loop in loops for s in gv.session_loop_results(loop, 120)), key=lambda s: s["start"]
        )
    finally:
        for loop in loops:
            gv.remove_quietly(loop)
        sg.reload()
        if sg.status != "running":
            sg.start()
    before = [s for s in sessions if s["end"] < killed_at]
    counted = [s for s in sessions if s["start"] >= killed_at + 2]
    failed = [s for s in counted if not s["ok"]]
    print(
        f"\nSG of {node} killed: {len(before)} sessions before, {len(counted)} from 2 s after the kill, "
        f"{len(failed)} of them failed; first failures {[s['failure'] for s in failed[:3]]}"
    )
    assert before and all(s["ok"] for s in before), [s["failure"] for s in before if not s["ok"]]
    assert len(counted) >= 10, len(counted)
    assert not failed, [(round(s["start"] - killed_at, 2), s["failure"]) for s in failed]
    down = [s for s in counted if s["start"] < restarted_at]
    assert down and all(s["target"].split(":")[0] != dead for s in down)

    # Back in service once its SG runs again: new sessions reach it.
    def reaches_the_node() -> bool:
        report = gv.run_client(NETWORK, f"https://{VIP}", secret)
        return bool(report["ok"]) and report["target"].split(":")[0] == dead

    later = [s for s in sessions if s["start"] >= restarted_at]
    assert any(s["target"].split(":")[0] == dead for s in later) or gv.wait_for(reaches_the_node, 20, 0.5), (
        f"{node} did not return to service after its SG was started"
    )


def test_failover_of_the_primary_halb() -> None:
    primary = next(node for node in HALB if gv.holds_vip(node, VIP))
    backup = next(node for node in HALB if node != primary)
    halb = gv.services(primary)["halb"][0]
    halb.kill()  # no goodbye advertisement: the backup must notice the silence
    try:
        assert gv.wait_for(lambda: gv.holds_vip(backup, VIP)), f"{backup} did not take the VIP"
        report = gv.run_client(NETWORK, f"https://{VIP}", gv.password(SCENARIO))
        gv.assert_session(report)
        assert report["target"].split(":")[0] in CMS
    finally:
        halb.reload()
        if halb.status != "running":
            halb.start()


PROMETHEUS = f"http://{gv.address(2, 10)}:9090"


def prometheus(path: str, **query: str) -> Any:
    url = f"{PROMETHEUS}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the scenario's own Prometheus
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_every_node_and_sees_one_vrrp_master() -> None:
    def all_up() -> bool:
        found = {(r["metric"]["job"], r["value"][1]) for r in prometheus("query", query="up")["result"]}
        jobs = {job for job, _value in found}
        return jobs == {
            "gatehouse-broker",
            "gatehouse-cm",
            "gatehouse-sg",
            "gatehouse-halb",
            "gatehouse-halb-vrrp",
        } and all(value == "1" for _job, value in found)

    assert gv.wait_for(all_up, 60, 1), prometheus("query", query="up")["result"]
    up = prometheus("query", query="up")["result"]
    targets = {(r["metric"]["job"], r["metric"]["instance"]) for r in up}
    assert targets == {
        ("gatehouse-broker", "127.0.0.1:9181"),
        ("gatehouse-cm", f"{gv.address(2, 21)}:9180"),
        ("gatehouse-cm", f"{gv.address(2, 22)}:9180"),
        ("gatehouse-sg", f"{gv.address(2, 21)}:9172"),
        ("gatehouse-sg", f"{gv.address(2, 22)}:9172"),
        ("gatehouse-halb", f"{gv.address(2, 41)}:8405"),
        ("gatehouse-halb", f"{gv.address(2, 42)}:8405"),
        ("gatehouse-halb-vrrp", f"{gv.address(2, 41)}:8405"),
        ("gatehouse-halb-vrrp", f"{gv.address(2, 42)}:8405"),
    }
    rules = {r["name"] for g in prometheus("rules")["groups"] for r in g["rules"]}
    assert {"GatehouseSecurityGatewayDown", "GatehouseVipOnTwoNodes", "GatehouseHalbBackendDown"} <= rules

    # The VRRP state of each HALB node (keepalived's notify commands) agrees with who holds the VIP.
    # The HALB failover test just restarted the old primary, which takes the VIP back (preemption):
    # wait until the VIP and the scraped states have settled on one node.
    def one_master_holding_the_vip() -> bool:
        result = prometheus("query", query="gatehouse_halb_vrrp_master")["result"]
        masters = [r["metric"]["instance"] for r in result if r["value"][1] == "1"]
        holders = [node for node in HALB if gv.holds_vip(node, VIP)]
        return (
            len(result) == 2
            and len(holders) == 1
            and masters == [f"{gv.address(2, 41 if holders[0] == 'gh-ha-halb1' else 42)}:8405"]
        )

    assert gv.wait_for(one_master_holding_the_vip, 60, 1), (
        prometheus("query", query="gatehouse_halb_vrrp_master")["result"],
        [node for node in HALB if gv.holds_vip(node, VIP)],
    )
    # HAProxy's exporter: both connection managers UP behind the cm virtual server.
    servers = prometheus("query", query='haproxy_server_status{state="UP"} == 1')["result"]
    assert {r["metric"]["server"] for r in servers} == {"gh-ha-cmsg1", "gh-ha-cmsg2"}


def test_a_stopped_sg_makes_its_alert_pending_within_30_s() -> None:
    node, instance = "gh-ha-cmsg2", f"{gv.address(2, 22)}:9172"

    def sg_alerts() -> list[dict[str, Any]]:
        return [
            a
            for a in prometheus("alerts")["alerts"]
            if a["labels"]["alertname"] == "GatehouseSecurityGatewayDown"
            and a["labels"]["instance"] == instance
        ]

    assert gv.wait_for(lambda: not sg_alerts(), 60, 1), sg_alerts()
    sg = gv.services(node)["sg"][0]
    sg.stop(timeout=5)
    stopped_at = time.monotonic()
    try:
        assert gv.wait_for(lambda: bool(sg_alerts()), 60, 0.5), "no alert for the stopped SG"
        elapsed = time.monotonic() - stopped_at
        print(
            f"\nGatehouseSecurityGatewayDown for {instance}: {sg_alerts()[0]['state']} {elapsed:.1f} s after the stop"
        )
        assert elapsed <= 30, elapsed
        assert sg_alerts()[0]["state"] in ("pending", "firing")
    finally:
        sg.reload()
        if sg.status != "running":
            sg.start()
    # Back: the alert goes away once Prometheus scrapes the SG again.
    assert gv.wait_for(lambda: not sg_alerts(), 60, 1), sg_alerts()
