"""multisite: two sites, one broker; cross-site sessions and the client's failover when site 1 is down."""

from __future__ import annotations

import json
import ssl
import urllib.request
from typing import Any

import gatehouse_verify as gv

SCENARIO = "multisite"
NETWORK = "gh-mol-multisite"
BROKER = gv.address(20, 10)
VIP_S1 = gv.address(20, 100)
VIP_S2 = gv.address(20, 200)
SG_S1 = gv.address(20, 21)
SG_S2 = gv.address(20, 22)
HALB_S1 = ["gh-ms-halb1-s1", "gh-ms-halb2-s1"]
HALB_S2 = ["gh-ms-halb1-s2", "gh-ms-halb2-s2"]
SITE1_HOSTS = [*HALB_S1, "gh-ms-cmsg-s1", "gh-ms-desk-s1"]
WAN = f"https://{VIP_S1},https://{VIP_S2}"


def sites() -> dict[str, dict[str, Any]]:
    """GET /api/v1/sites of the broker (admin token from the scenario's secrets), by site name."""
    token = (gv.STATE_ROOT / SCENARIO / "secrets" / "admin_token").read_text(encoding="utf-8").strip()
    request = urllib.request.Request(
        f"https://{BROKER}:8443/api/v1/sites", headers={"Authorization": "Bearer " + token}
    )
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the scenario's self-signed broker certificate
    with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
        return {entry["name"]: entry for entry in json.load(response)["sites"]}


def session(url: str, resource: str, *args: str) -> dict[str, Any]:
    return gv.run_client(
        NETWORK, url, gv.password(SCENARIO), "--resource", resource, "--timeout", "15", *args
    )


def test_services_run_where_the_topology_puts_them(host: Any, groups: list[str]) -> None:
    found = gv.services(host.backend.get_hostname())
    assert set(found) == gv.expected_roles(groups), found
    for containers in found.values():
        assert all(c.status == "running" for c in containers)


def test_each_cmsg_node_has_its_site_and_every_sites_gateway() -> None:
    for name, site in (("gh-ms-cmsg-s1", "site1"), ("gh-ms-cmsg-s2", "site2")):
        conf = (gv.STATE_ROOT / SCENARIO / name / "cmsg" / "data" / "config.properties").read_text(
            encoding="utf-8"
        )
        lines = {
            line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip()
            for line in conf.splitlines()
            if "=" in line
        }
        assert lines["Site"] == site, conf
        assert sorted(lines["SiteGateways"].split(",")) == [f"site1={SG_S1}:4172", f"site2={SG_S2}:4172"], (
            conf
        )


def test_each_site_has_its_own_halb_pair_holding_its_vip() -> None:
    """Each pair is the site's own two nodes (VRRP peers of each other only): one holds the VIP."""
    for pair, vip, other in ((HALB_S1, VIP_S1, VIP_S2), (HALB_S2, VIP_S2, VIP_S1)):
        assert [gv.holds_vip(node, vip) for node in pair].count(True) == 1, (pair, vip)
        assert not any(gv.holds_vip(node, other) for node in pair), (pair, other)


def test_each_halb_balances_its_own_sites_cm_only() -> None:
    nodes = [(name, SG_S1, SG_S2) for name in HALB_S1] + [(name, SG_S2, SG_S1) for name in HALB_S2]
    for name, own, other in nodes:
        configs = list((gv.STATE_ROOT / SCENARIO / name / "halb").rglob("haproxy.cfg"))
        assert configs, name
        text = configs[0].read_text(encoding="utf-8")
        assert f" {own}:" in text and f" {other}:" not in text, text


def test_both_sites_are_up() -> None:
    assert gv.wait_for(lambda: {s["state"] for s in sites().values()} == {"up"}, attempts=40), sites()
    assert set(sites()) == {"site1", "site2"}


def test_a_client_at_site_1_gets_site_2s_desktop_through_site_2s_gateway() -> None:
    """Logged in through VIP s1 (site 1's CM), allocated site 2's desktop: the PCoIP session (TCP +
    UDP echo) goes to site 2's SG with a grant sealed for site 2's key."""
    report = session(f"https://{VIP_S1}", "desk-s2")
    gv.assert_session(report, target_ip=SG_S2)
    assert report["url"].startswith(f"https://{VIP_S1}"), report["url"]
    # And the other way round, and a site's own desktop through its own gateway.
    gv.assert_session(session(f"https://{VIP_S2}", "desk-s1"), target_ip=SG_S1)
    gv.assert_session(session(f"https://{VIP_S1}", "desk-s1"), target_ip=SG_S1)


def written_configs() -> dict[str, bytes]:
    """The configuration files site.yml wrote for every CM/SG and HALB node of both sites."""
    names = {"config.properties", "SecurityGateway.conf", "haproxy.cfg", "keepalived.conf"}
    nodes = [*HALB_S1, *HALB_S2, "gh-ms-cmsg-s1", "gh-ms-cmsg-s2"]
    found = {
        str(path): path.read_bytes()
        for node in nodes
        for path in (gv.STATE_ROOT / SCENARIO / node).rglob("*")
        if path.name in names and path.is_file()
    }
    assert len(found) >= 12, sorted(found)  # 2 files on each of the 6 nodes
    return found


def test_a_rolling_upgrade_keeps_each_nodes_site_and_pair() -> None:
    """playbooks/upgrade.yml (to the version that runs) drains each node at its own site's HALB pair
    and leaves every node as site.yml made it: the same files (Site, SiteGateways, each pair's own
    peers and backends), no CM/SG container recreated, and sessions at both sites afterwards."""
    before = written_configs()
    ids = {
        node: {role: c[0].id for role, c in gv.services(node).items()}
        for node in ("gh-ms-cmsg-s1", "gh-ms-cmsg-s2")
    }
    run = gv.run_playbook("upgrade.yml", "-e", "gatehouse_upgrade_grace=0", timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # Each node was drained at its own site's pair only.
    assert "gatehouse_halb_site1: gh-ms-halb1-s1" in run.stdout, run.stdout[-4000:]
    after = written_configs()
    assert after == before, [path for path in before if after.get(path) != before[path]]
    assert {node: {role: c[0].id for role, c in gv.services(node).items()} for node in ids} == ids
    gv.assert_session(session(f"https://{VIP_S2}", "desk-s1"), target_ip=SG_S1)
    gv.assert_session(session(f"https://{VIP_S1}", "desk-s2"), target_ip=SG_S2)


def test_site_1_down_the_wan_list_fails_over_and_its_desktops_are_not_offered() -> None:
    """Every service container of site 1 stopped (its HALB pair, CM, SG, the desktop's agent): the WAN list
    [VIP s1, VIP s2] completes sessions through site 2, the broker shows site 1 down and places the
    cross-site pool on site 2, and site 1's desktop has nothing to offer."""
    stopped = [c for name in SITE1_HOSTS for cs in gv.services(name).values() for c in cs]
    assert {c.labels["gatehouse.role"] for c in stopped} == {"halb", "cm", "sg", "agent"}
    try:
        for container in stopped:
            container.stop(timeout=5)
        # The agent's reports stop: site 1 is down after AgentStaleAfter (30 s).
        assert gv.wait_for(lambda: sites()["site1"]["state"] == "down", attempts=30, interval=2), sites()
        assert sites()["site2"]["state"] == "up"
        for attempt in range(3):
            report = session(WAN, "both", "--attempt-timeout", "5")
            assert report["ok"], f"session {attempt + 1}: {gv.client_failure(report)}"
            gv.assert_session(report, target_ip=SG_S2)
            assert report["url"].startswith(f"https://{VIP_S2}"), report
            assert report["attempts"][0]["url"].startswith(f"https://{VIP_S1}"), report["attempts"]
        # Site 1's desktop: not offered, or offered with nothing to allocate; never a session.
        refused = session(WAN, "desk-s1", "--attempt-timeout", "5")
        failed = [s for s in refused["steps"] if not s["ok"]]
        assert not refused["ok"] and failed, refused
        assert failed[0]["name"] in ("get-resource-list", "allocate-resource"), refused["steps"]
        if failed[0]["name"] == "allocate-resource":
            assert "NO_RESOURCE_AVAILABLE" in failed[0]["result"], failed[0]
    finally:
        for container in stopped:
            container.start()
    assert gv.wait_for(lambda: sites()["site1"]["state"] == "up", attempts=30, interval=2), sites()
