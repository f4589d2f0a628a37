"""The tenant_settings filter (plugins/filter/tenant_settings.py): tenants from the inventory.

Invariant: an inventory without gatehouse_tenant gets the single-tenant values site.yml used
before tenants (no tenants, the first broker for every host, objects at the first broker only,
every desktop there); the end-to-end check is the molecule scenario ``tenants``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
flt = importlib.import_module("ansible_collections.gatehouse.access.plugins.filter.tenant_settings")

GROUPS = {
    "brokers": ["broker-a", "broker-b"],
    "cmsg": ["cmsg1"],
    "desktops": ["desk-a", "desk-b", "desk-b2"],
}
HOSTVARS = {
    "broker-a": {
        "gatehouse_address": "10.31.0.10",
        "gatehouse_tenant": "tenant-a",
        "gatehouse_tenant_host_names": ["desktops.tenant-a.example"],
        "gatehouse_tenant_agent_networks": ["10.31.0.0/16"],
    },
    # another port, an IPv6 address, two names
    "broker-b": {
        "ansible_host": "fd00::10",
        "gatehouse_broker_port": 9443,
        "gatehouse_tenant": "tenant-b",
        "gatehouse_tenant_host_names": ["desktops.tenant-b.example", "b.example.net"],
    },
    "cmsg1": {"gatehouse_address": "10.30.0.21"},
    "desk-a": {"gatehouse_tenant": "tenant-a"},
    "desk-b": {"gatehouse_tenant": "tenant-b"},
    "desk-b2": {"gatehouse_tenant": "tenant-b"},
}


def settings(host: str, groups: dict | None = None, hostvars: dict | None = None, **kwargs) -> dict:
    return flt.tenant_settings(groups or GROUPS, hostvars or HOSTVARS, host, **kwargs)


def test_every_tenant_for_the_cmsg_hosts_in_broker_order() -> None:
    assert settings("cmsg1", broker_port=8443)["tenants"] == [
        {
            "name": "tenant-a",
            "host_names": ["desktops.tenant-a.example"],
            "broker_url": "https://10.31.0.10:8443",
            "agent_networks": ["10.31.0.0/16"],
        },
        {
            "name": "tenant-b",
            "host_names": ["desktops.tenant-b.example", "b.example.net"],
            "broker_url": "https://[fd00::10]:9443",
            "agent_networks": [],
        },
    ]
    # The entries are what the cmsg module takes (its own checks accept them).
    cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
    errors: list[str] = []
    cmsg.tenant_entries(settings("cmsg1")["tenants"], errors)
    assert errors == []


def test_each_broker_gets_its_own_objects_and_desktops() -> None:
    a, b, cm = settings("broker-a"), settings("broker-b"), settings("cmsg1")
    assert (a["tenant"], a["broker"], a["objects"], a["desktops"]) == (
        "tenant-a",
        "broker-a",
        True,
        ["desk-a"],
    )
    assert (b["tenant"], b["broker"], b["objects"], b["desktops"]) == (
        "tenant-b",
        "broker-b",
        True,
        ["desk-b", "desk-b2"],
    )
    assert (cm["tenant"], cm["objects"], cm["desktops"]) == ("", False, [])


def test_a_tenants_own_certificate_from_its_broker_host() -> None:
    """gatehouse_tenant_ssl_cert/_ssl_key/_broker_ca_cert of a broker host become its entry's files."""
    own = {
        "gatehouse_tenant_ssl_cert": "/etc/pki/b.pem",
        "gatehouse_tenant_ssl_key": "/etc/pki/b.key",
        "gatehouse_tenant_broker_ca_cert": "/etc/pki/b-ca.pem",
    }
    entries = settings("cmsg1", hostvars={**HOSTVARS, "broker-b": {**HOSTVARS["broker-b"], **own}})["tenants"]
    assert "ssl_cert" not in entries[0] and "broker_ca_cert" not in entries[0]
    assert (entries[1]["ssl_cert"], entries[1]["ssl_key"], entries[1]["broker_ca_cert"]) == (
        "/etc/pki/b.pem",
        "/etc/pki/b.key",
        "/etc/pki/b-ca.pem",
    )
    cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
    errors: list[str] = []
    cmsg.tenant_entries(entries, errors)
    assert errors == []
    half = {"broker-b": {**HOSTVARS["broker-b"], "gatehouse_tenant_ssl_cert": "/etc/pki/b.pem"}}
    with pytest.raises(AnsibleFilterError, match="gatehouse_tenant_ssl_cert and gatehouse_tenant_ssl_key"):
        settings("cmsg1", hostvars={**HOSTVARS, **half})


def test_a_tenant_broker_knows_its_own_desktops_addresses() -> None:
    hostvars = {**HOSTVARS, "desk-b": {"gatehouse_tenant": "tenant-b", "ansible_host": "10.32.0.31"}}
    assert settings("broker-b", hostvars=hostvars)["desktop_addresses"] == ["10.32.0.31", "desk-b2"]
    assert settings("broker-a")["desktop_addresses"] == ["desk-a"]
    assert settings("cmsg1")["desktop_addresses"] == []


def test_a_desktop_belongs_to_its_tenants_broker() -> None:
    assert settings("desk-b2")["broker"] == "broker-b"
    assert settings("desk-a")["broker"] == "broker-a"


def test_the_broker_url_of_a_host_is_its_brokers_own() -> None:
    """One rule for every broker URL: a tenant's entry and a host's own broker_url agree (IPv6 in brackets)."""
    assert settings("desk-b2", broker_port=443)["broker_url"] == "https://[fd00::10]:9443"
    assert settings("desk-a", broker_port=8443)["broker_url"] == "https://10.31.0.10:8443"
    for entry in settings("cmsg1")["tenants"]:
        broker = "broker-a" if entry["name"] == "tenant-a" else "broker-b"
        assert settings(broker)["broker_url"] == entry["broker_url"]


def test_without_tenants_the_single_tenant_values() -> None:
    groups = {"brokers": ["broker1", "broker2"], "desktops": ["d1", "d2"], "cmsg": ["c1"]}
    hostvars = {h: {} for hs in groups.values() for h in hs}
    first, second = settings("broker1", groups, hostvars), settings("broker2", groups, hostvars)
    assert first == {
        "tenants": [],
        "tenant": "",
        "broker": "broker1",
        "broker_url": "https://broker1:443",
        "objects": True,
        "desktops": ["d1", "d2"],
        "desktop_addresses": ["d1", "d2"],
    }
    assert (second["objects"], second["desktops"], second["broker"]) == (False, [], "broker1")
    assert (
        settings("d2", groups, hostvars)["broker"] == settings("c1", groups, hostvars)["broker"] == "broker1"
    )
    assert settings("c1", {"cmsg": ["c1"]}, {"c1": {}})["broker"] == ""
    assert settings("c1", {"cmsg": ["c1"]}, {"c1": {}})["broker_url"] == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"broker-b": {**HOSTVARS["broker-b"], "gatehouse_tenant": "tenant-a"}},
            "tenant tenant-a has two broker",
        ),
        ({"broker-b": {**HOSTVARS["broker-b"], "gatehouse_tenant": "Tenant_B"}}, "not 1-32 characters"),
        (
            {"broker-b": {**HOSTVARS["broker-b"], "gatehouse_tenant_host_names": []}},
            "needs gatehouse_tenant_host_names",
        ),
        (
            {"broker-b": {"gatehouse_address": "10.32.0.10"}},
            "broker-b in the brokers group without gatehouse_tenant",
        ),
        ({"desk-b": {"gatehouse_tenant": "tenant-c"}}, "gatehouse_tenant of desk-b is tenant-c"),
    ],
)
def test_bad_inventories_are_refused(change: dict, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        settings("desk-b", hostvars={**HOSTVARS, **change})
