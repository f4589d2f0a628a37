"""The dmz_settings filter (plugins/filter/dmz_settings.py): double-hop DMZ settings from the inventory."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
flt = importlib.import_module("ansible_collections.gatehouse.access.plugins.filter.dmz_settings")

GROUPS = {
    "brokers": ["broker1"],
    "cmsg": ["cmsg1", "cmsg2", "lan1"],
    "sg_forwarders": ["fwd1", "fwd2", "fwd3"],
}
HOSTVARS = {
    "broker1": {"gatehouse_address": "10.2.0.10"},
    "cmsg1": {"gatehouse_address": "10.2.0.21", "gatehouse_dmz_address": "10.1.0.21"},
    # published on another port (bridge mode), no separate dmz address, IPv6 enabled
    "cmsg2": {"ansible_host": "10.2.0.22", "cmsg_pcoip_port": 14172, "cmsg_enable_ipv6": "true"},
    # no security gateway: never an inner gateway
    "lan1": {"gatehouse_address": "10.2.0.23", "cmsg_enable_security_gateway": "false"},
    "fwd1": {"gatehouse_address": "203.0.113.11", "gatehouse_dmz_address": "10.1.0.11"},
    "fwd2": {"gatehouse_address": "203.0.113.12", "gatehouse_dmz_address": "10.1.0.12"},
    # names its inner gateway; reached by the clients over IPv6 (cmsg2 has IPv6)
    "fwd3": {
        "gatehouse_address": "2001:db8::13",
        "gatehouse_dmz_address": "fd00::13",
        "gatehouse_forward_to_host": "cmsg2",
    },
}


def settings(host: str, groups: dict | None = None, hostvars: dict | None = None) -> dict:
    return flt.dmz_settings(
        GROUPS if groups is None else groups, HOSTVARS if hostvars is None else hostvars, host
    )


def test_forwarders_pair_with_the_inner_gateways_by_position_or_by_name() -> None:
    assert settings("fwd1")["forward_to"] == ["10.1.0.21:4172"]
    # cmsg2 has no gatehouse_dmz_address: its gatehouse_address (here ansible_host), its own pcoip port
    assert settings("fwd2")["forward_to"] == ["10.2.0.22:14172"]
    assert settings("fwd3")["forward_to"] == ["10.2.0.22:14172"]


def test_inner_gateways_hand_out_their_forwarders_and_read_their_headers() -> None:
    inner1 = settings("cmsg1")
    assert inner1["forwarders"] == ["fwd1"]
    assert inner1["proxy_protocol_sources"] == ["10.1.0.11"]
    assert inner1["external_pcoip_ip"] == ["203.0.113.11"]
    assert inner1["forward_to"] == []
    inner2 = settings("cmsg2")
    assert inner2["forwarders"] == ["fwd2", "fwd3"]
    assert inner2["proxy_protocol_sources"] == ["10.1.0.12", "fd00::13"]
    # one IPv4 and (with cmsg_enable_ipv6) one IPv6 address, as external_pcoip_ip takes them
    assert inner2["external_pcoip_ip"] == ["203.0.113.12", "2001:db8::13"]


def test_ipv6_inner_address_is_bracketed() -> None:
    hostvars = {**HOSTVARS, "cmsg1": {"gatehouse_address": "fd00:2::21"}}
    assert settings("fwd1", hostvars=hostvars)["forward_to"] == ["[fd00:2::21]:4172"]


def test_other_hosts_get_nothing_but_the_outer_addresses() -> None:
    for host in ("broker1", "lan1"):
        out = settings(host)
        assert out["forward_to"] == out["forwarders"] == out["proxy_protocol_sources"] == []
        assert out["external_pcoip_ip"] == []
        assert out["outer_addresses"] == [
            "203.0.113.11",
            "10.1.0.11",
            "203.0.113.12",
            "10.1.0.12",
            "2001:db8::13",
            "fd00::13",
        ]


def test_without_forwarders_nothing_changes() -> None:
    groups = {"cmsg": ["cmsg1"], "brokers": ["broker1"]}
    out = settings("cmsg1", groups=groups)
    assert out == {
        "forward_to": [],
        "forwarders": [],
        "proxy_protocol_sources": [],
        "external_pcoip_ip": [],
        "outer_addresses": [],
    }


def test_a_forwarder_without_a_dmz_address_uses_its_address() -> None:
    hostvars = {**HOSTVARS, "fwd1": {"gatehouse_address": "10.1.0.11"}}
    out = settings("cmsg1", hostvars=hostvars)
    assert out["proxy_protocol_sources"] == out["external_pcoip_ip"] == ["10.1.0.11"]


@pytest.mark.parametrize(
    ("groups", "hostvars", "message"),
    [
        # a named inner gateway that is not one
        (GROUPS, {**HOSTVARS, "fwd1": {"gatehouse_forward_to_host": "lan1"}}, "not a host of the cmsg group"),
        (
            GROUPS,
            {**HOSTVARS, "fwd1": {"gatehouse_forward_to_host": "broker1"}},
            "not a host of the cmsg group",
        ),
        # no inner gateway at all
        ({"sg_forwarders": ["fwd1"], "cmsg": ["lan1"]}, HOSTVARS, "no inner security gateway"),
        # a host in both groups
        ({"sg_forwarders": ["cmsg1"], "cmsg": ["cmsg1"]}, HOSTVARS, "in both"),
    ],
)
def test_inconsistent_inventories_are_refused(groups, hostvars, message) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        settings("broker1", groups=groups, hostvars=hostvars)


def test_inner_gateway_behind_ipv6_forwarders_only_is_refused() -> None:
    groups = {"cmsg": ["cmsg2"], "sg_forwarders": ["fwd3"]}
    with pytest.raises(AnsibleFilterError, match="no IPv4"):
        settings("cmsg2", groups=groups)


VIP_GROUPS = {"cmsg": ["cmsg1", "cmsg2"], "sg_forwarders": ["fwd1", "fwd2"], "brokers": ["broker1"]}


def with_vip(vip: str = "203.0.113.20/24", **more: dict) -> dict:
    """fwd1 and fwd2 both forward to cmsg1 behind one VIP."""
    hostvars = {**HOSTVARS}
    for host in ("fwd1", "fwd2"):
        hostvars[host] = {
            **HOSTVARS[host],
            "gatehouse_forward_to_host": "cmsg1",
            "gatehouse_forwarder_vip": vip,
        }
    hostvars.update(more)
    return hostvars


def test_forwarders_behind_a_vip_are_one_pair_and_the_cm_hands_out_the_vip() -> None:
    hostvars = with_vip()
    inner = settings("cmsg1", groups=VIP_GROUPS, hostvars=hostvars)
    assert inner["external_pcoip_ip"] == ["203.0.113.20"]
    assert inner["forwarders"] == ["fwd1", "fwd2"]
    assert inner["proxy_protocol_sources"] == ["10.1.0.11", "10.1.0.12"]
    assert inner["forwarder_vip"] == inner["listen_address"] == []
    for host in ("fwd1", "fwd2"):
        out = settings(host, groups=VIP_GROUPS, hostvars=hostvars)
        assert out["forward_to"] == ["10.1.0.21:4172"]
        assert out["forwarder_vip"] == ["203.0.113.20/24"]
        assert out["listen_address"] == ["203.0.113.20"]
        assert out["forwarder_vip_pairs"] == {"gatehouse_forwarder_vip_203_0_113_20": ["fwd1", "fwd2"]}
    # an inner gateway without forwarders keeps its own address (none from the filter)
    assert settings("cmsg2", groups=VIP_GROUPS, hostvars=hostvars)["external_pcoip_ip"] == []


@pytest.mark.parametrize(
    ("hostvars", "message"),
    [
        (with_vip("203.0.113.20"), "not an IPv4 address with its prefix"),
        (with_vip("2001:db8::20/64"), "not an IPv4 address with its prefix"),
        (with_vip("vip.example/24"), "not an IPv4 address with its prefix"),
        # one VIP in front of two inner gateways: half of the grants would be refused
        (
            with_vip(fwd2={**HOSTVARS["fwd2"], "gatehouse_forwarder_vip": "203.0.113.20/24"}),
            "one inner security",
        ),
        # the forwarders of one inner gateway with and without the VIP
        (
            with_vip(fwd2={**HOSTVARS["fwd2"], "gatehouse_forward_to_host": "cmsg1"}),
            "have different gatehouse_forwarder_vip",
        ),
    ],
)
def test_inconsistent_vips_are_refused(hostvars, message) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        settings("broker1", groups=VIP_GROUPS, hostvars=hostvars)


def site_vars(play: str, names: tuple[str, ...], **inventory: object) -> dict:
    """``names`` as playbooks/site.yml's play ``play`` (its name's start) sets them for a host with
    these ``inventory`` variables (plus vars/gatehouse.yml's), rendered by Ansible's own templar."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    yaml = importlib.import_module("yaml")
    plays = yaml.safe_load((REPO / "playbooks" / "site.yml").read_text())
    (found,) = [entry for entry in plays if entry["name"].startswith(play)]
    defined = {
        **yaml.safe_load((REPO / "playbooks" / "vars" / "gatehouse.yml").read_text()),
        **found["vars"],
        **inventory,
    }
    trusted = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in defined.items()}
    templar = Templar(loader=DataLoader(), variables=trusted)
    return {name: templar.template(trust_as_template("{{ " + name + " }}")) for name in names}


@pytest.mark.parametrize(
    ("network_mode", "listen"),
    [("", ""), ("bridge", ""), ("host", "203.0.113.20"), ("container:fwd1", "203.0.113.20")],
)
def test_site_yml_gives_the_vip_as_listen_address_only_outside_bridge_mode(network_mode, listen) -> None:
    """In bridge mode (the default) the forwarder's container does not hold the VIP and the cmsg
    module refuses listen_address: the engine's DNAT answers from the VIP there."""
    dmz = settings("fwd1", groups=VIP_GROUPS, hostvars=with_vip())
    rendered = site_vars(
        "Forwarding security gateways",
        ("cmsg_listen_address", "cmsg_network_mode"),
        gatehouse_network_mode=network_mode,
        gatehouse__dmz=dmz,
    )
    assert rendered["cmsg_listen_address"] == listen
    assert rendered["cmsg_network_mode"] == (network_mode or "bridge")
    # Without a VIP nothing to listen on, in any mode.
    plain = site_vars(
        "Forwarding security gateways",
        ("cmsg_listen_address",),
        gatehouse_network_mode=network_mode,
        gatehouse__dmz=settings("fwd1"),
    )
    assert plain["cmsg_listen_address"] == ""


@pytest.mark.parametrize(
    ("network_mode", "node", "halb_network_mode", "url"),
    [
        ("", {}, "host", "http://127.0.0.1:9172/health"),
        ("bridge", {"cmsg_sg_admin_host_port": 19172}, "host", "http://127.0.0.1:19172/health"),
        ("host", {}, "host", "http://127.0.0.1:9172/health"),
        ("host", {"cmsg_admin_address": "::"}, "host", "http://[::1]:9172/health"),
        ("host", {"cmsg_admin_address": "10.1.0.11"}, "host", "http://10.1.0.11:9172/health"),
        (
            "container:fwd1",
            {"cmsg_admin_address": "127.0.0.1"},
            "container:fwd1",
            "http://127.0.0.1:9172/health",
        ),
    ],
)
def test_site_yml_has_the_forwarders_vip_track_their_sg(network_mode, node, halb_network_mode, url) -> None:
    """The keepalived pair of the forwarders' VIP runs where the forwarder's SG is reachable and
    gives the VIP up when the SG's /health does not answer (halb_track_url)."""
    rendered = site_vars(
        "Keepalived pair of the forwarders' VIP",
        ("halb_network_mode", "halb_track_url", "halb_virtual_servers"),
        gatehouse_network_mode=network_mode,
        gatehouse__dmz=settings("fwd1", groups=VIP_GROUPS, hostvars=with_vip()),
        **node,
    )
    assert rendered == {
        "halb_network_mode": halb_network_mode,
        "halb_track_url": url,
        "halb_virtual_servers": [],
    }
