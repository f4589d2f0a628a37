"""The site_settings filter (plugins/filter/site_settings.py): multi-site settings from the inventory."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
flt = importlib.import_module("ansible_collections.gatehouse.access.plugins.filter.site_settings")

SECRET = "s" * 40
GROUPS = {
    "brokers": ["broker1"],
    "cmsg": ["cm1-s1", "cm2-s1", "cm1-s2", "lan-s2"],
    "halb": ["halb1-s1", "halb2-s1", "halb1-s2"],
    "desktops": ["desk1-s1", "desk1-s2"],
}
HOSTVARS = {
    "broker1": {"gatehouse_address": "10.0.0.10"},
    "cm1-s1": {"gatehouse_site": "site1", "gatehouse_address": "10.1.0.21", "cmsg_grant_secret": SECRET},
    "cm2-s1": {"gatehouse_site": "site1", "gatehouse_address": "10.1.0.22", "cmsg_grant_secret": SECRET},
    # its gateway is handed out at its external address, published on another port
    "cm1-s2": {
        "gatehouse_site": "site2",
        "ansible_host": "10.2.0.21",
        "cmsg_external_pcoip_ip": ["198.51.100.21", "2001:db8::21"],
        "cmsg_pcoip_port": 14172,
        "cmsg_grant_secret": SECRET,
    },
    # listed first for its site would not matter: no gateway
    "lan-s2": {
        "gatehouse_site": "site2",
        "gatehouse_address": "10.2.0.23",
        "cmsg_enable_security_gateway": "false",
        "cmsg_grant_secret": SECRET,
    },
    "halb1-s1": {"gatehouse_site": "site1", "gatehouse_address": "10.1.0.41", "halb_address": "10.1.1.41"},
    "halb2-s1": {"gatehouse_site": "site1", "gatehouse_address": "10.1.0.42"},
    "halb1-s2": {"gatehouse_site": "site2", "gatehouse_address": "10.2.0.41"},
    "desk1-s1": {"gatehouse_site": "site1", "gatehouse_address": "10.1.0.31"},
    "desk1-s2": {"gatehouse_site": "site2", "gatehouse_address": "10.2.0.31"},
}


def settings(host: str, groups: dict | None = None, hostvars: dict | None = None) -> dict:
    return flt.site_settings(
        GROUPS if groups is None else groups, HOSTVARS if hostvars is None else hostvars, host
    )


def test_every_cmsg_node_gets_one_gateway_of_each_site() -> None:
    gateways = {"site1": "10.1.0.21:4172", "site2": "198.51.100.21:14172"}
    for host in GROUPS["cmsg"]:
        assert settings(host)["site_gateways"] == gateways
        assert settings(host)["sites"] == ["site1", "site2"]
    assert settings("cm1-s2")["site"] == "site2"


def test_an_ipv6_gateway_is_bracketed() -> None:
    hostvars = {**HOSTVARS, "cm1-s2": {**HOSTVARS["cm1-s2"], "cmsg_external_pcoip_ip": ["2001:db8::21"]}}
    assert settings("cm1-s1", hostvars=hostvars)["site_gateways"]["site2"] == "[2001:db8::21]:14172"


def test_a_site_sees_its_own_hosts_only() -> None:
    s1 = settings("halb2-s1")
    assert s1["cmsg_hosts"] == ["cm1-s1", "cm2-s1"]
    assert s1["halb_hosts"] == ["halb1-s1", "halb2-s1"]
    assert s1["desktop_hosts"] == ["desk1-s1"]
    assert s1["addresses"] == {
        "cmsg": ["10.1.0.21", "10.1.0.22"],
        # a HALB node's halb_address too (its VRRP and stick-table peers source)
        "halb": ["10.1.0.41", "10.1.1.41", "10.1.0.42"],
        "desktops": ["10.1.0.31"],
    }
    # Every site's pair, in inventory order (the first node is the primary), whichever host asks.
    assert (
        s1["halb_pairs"]
        == settings("broker1")["halb_pairs"]
        == {
            "site1": ["halb1-s1", "halb2-s1"],
            "site2": ["halb1-s2"],
        }
    )
    s2 = settings("desk1-s2")
    assert s2["cmsg_hosts"] == ["cm1-s2", "lan-s2"]
    assert s2["addresses"]["cmsg"] == ["10.2.0.21", "10.2.0.23"]
    assert s2["addresses"]["halb"] == ["10.2.0.41"]


def test_a_host_of_no_site_gets_no_site_hosts() -> None:
    broker = settings("broker1")
    assert broker["site"] == ""
    assert broker["cmsg_hosts"] == broker["halb_hosts"] == broker["desktop_hosts"] == []
    assert broker["addresses"] == {"cmsg": [], "halb": [], "desktops": []}
    # the gateways are still those of the inventory's sites
    assert broker["site_gateways"]["site1"] == "10.1.0.21:4172"


def test_without_sites_nothing_is_derived() -> None:
    hostvars = {
        host: {k: v for k, v in node.items() if k not in ("gatehouse_site", "cmsg_grant_secret")}
        for host, node in HOSTVARS.items()
    }
    for host in hostvars:
        assert settings(host, hostvars=hostvars) == {
            "site": "",
            "sites": [],
            "site_gateways": {},
            "cmsg_hosts": [],
            "halb_hosts": [],
            "desktop_hosts": [],
            "halb_pairs": {},
            "addresses": {"cmsg": [], "halb": [], "desktops": []},
        }


def test_one_site_needs_no_shared_secret() -> None:
    hostvars = {
        host: {**{k: v for k, v in node.items() if k != "cmsg_grant_secret"}, "gatehouse_site": "site1"}
        for host, node in HOSTVARS.items()
        if host != "broker1"
    }
    hostvars["broker1"] = HOSTVARS["broker1"]
    assert settings("cm1-s1", hostvars=hostvars)["sites"] == ["site1"]


@pytest.mark.parametrize("host", ["cm2-s1", "lan-s2"])
def test_more_than_one_site_needs_the_grant_secret_on_every_cmsg_node(host: str) -> None:
    hostvars = {**HOSTVARS, host: {k: v for k, v in HOSTVARS[host].items() if k != "cmsg_grant_secret"}}
    with pytest.raises(AnsibleFilterError, match=f"cmsg_grant_secret .*missing on {host}$"):
        settings("broker1", hostvars=hostvars)


def test_more_than_one_site_needs_the_same_grant_secret() -> None:
    hostvars = {**HOSTVARS, "cm1-s2": {**HOSTVARS["cm1-s2"], "cmsg_grant_secret": "t" * 40}}
    with pytest.raises(AnsibleFilterError, match="different cmsg_grant_secret") as raised:
        settings("cm1-s1", hostvars=hostvars)
    assert SECRET not in str(raised.value) and "t" * 40 not in str(raised.value)


@pytest.mark.parametrize(("host", "group"), [("cm2-s1", "cmsg"), ("halb1-s2", "halb")])
def test_more_than_one_site_needs_every_cmsg_and_halb_node_in_a_site(host: str, group: str) -> None:
    hostvars = {**HOSTVARS, host: {k: v for k, v in HOSTVARS[host].items() if k != "gatehouse_site"}}
    with pytest.raises(AnsibleFilterError, match=f"{host} of the {group} group belong to none"):
        settings("desk1-s1", hostvars=hostvars)


def test_desktops_without_a_site_are_allowed() -> None:
    """The broker never leaves desktops without a site out (docs/multisite.md)."""
    hostvars = {**HOSTVARS, "desk1-s1": {"gatehouse_address": "10.1.0.31"}}
    assert settings("desk1-s1", hostvars=hostvars)["site"] == ""
    assert settings("halb1-s1", hostvars=hostvars)["addresses"]["desktops"] == []
