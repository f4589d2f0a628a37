"""The monitoring_targets filter (plugins/filter/monitoring_targets.py): scrape targets from the inventory."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
flt = importlib.import_module("ansible_collections.gatehouse.access.plugins.filter.monitoring_targets")

GROUPS = {
    "brokers": ["broker1", "broker2"],
    "cmsg": ["cmsg1", "cmsg2", "cmsg3"],
    "halb": ["halb1", "halb2"],
    "monitoring": ["cmsg1"],
}
HOSTVARS = {
    # bridge (the default): no management port published; host mode: reachable on its address
    "broker1": {"ansible_host": "10.0.0.11"},
    "broker2": {
        "ansible_host": "10.0.0.12",
        "gatehouse_network_mode": "host",
        "gatehouse_address": "10.1.0.12",
    },
    # the monitoring host itself, bridge mode with its own published admin ports
    "cmsg1": {
        "ansible_host": "10.0.0.21",
        "cmsg_cm_admin_host_port": 19180,
        "cmsg_sg_admin_host_port": 19172,
    },
    # another host, bridge mode: its ports are on its own loopback only
    "cmsg2": {"ansible_host": "10.0.0.22"},
    # another host, host mode, no SG ("false" as an inventory string)
    "cmsg3": {
        "ansible_host": "10.0.0.23",
        "gatehouse_network_mode": "host",
        "cmsg_enable_security_gateway": "false",
    },
    "halb1": {"ansible_host": "10.0.0.41"},
    "halb2": {"ansible_host": "10.0.0.42", "halb_metrics_port": 0},
}


def test_every_node_reachable_from_the_monitoring_host_once_on_the_right_address_and_port():
    assert flt.monitoring_targets(GROUPS, HOSTVARS, "cmsg1") == {
        "broker": ["10.1.0.12:9181"],
        "cm": ["127.0.0.1:19180", "10.0.0.23:9180"],
        "sg": ["127.0.0.1:19172"],
        "halb": ["10.0.0.41:8405"],
        "postgresql": [],
    }


def test_a_bridge_mode_broker_is_scraped_on_its_own_host_only_at_its_published_port():
    assert flt.monitoring_targets(GROUPS, HOSTVARS, "broker2")["broker"] == ["127.0.0.1:9181"]
    assert flt.monitoring_targets(GROUPS, HOSTVARS, "broker1")["broker"] == [
        "127.0.0.1:9181",
        "10.1.0.12:9181",
    ]
    moved = dict(HOSTVARS, broker1=dict(HOSTVARS["broker1"], gatehouse_broker_admin_host_port=19181))
    assert flt.monitoring_targets(GROUPS, moved, "broker1")["broker"] == ["127.0.0.1:19181", "10.1.0.12:9181"]
    off = dict(HOSTVARS, broker1=dict(HOSTVARS["broker1"], gatehouse_broker_admin_host_port=0))
    assert flt.monitoring_targets(GROUPS, off, "broker1")["broker"] == ["10.1.0.12:9181"]


def test_extra_targets_of_every_kind_are_added_once():
    extra = {"postgresql": ["10.0.0.61:8008"], "halb": ["10.0.0.41:8405", "10.0.0.43:8405"]}
    out = flt.monitoring_targets(GROUPS, HOSTVARS, "cmsg1", extra)
    assert out["postgresql"] == ["10.0.0.61:8008"]
    assert out["halb"] == ["10.0.0.41:8405", "10.0.0.43:8405"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"database": ["10.0.0.61:8008"]}, "unknown kind(s) database"),
        ({"postgresql": "10.0.0.61:8008"}, "extra.postgresql must be a list"),
    ],
)
def test_bad_extra_targets_are_refused(extra, message):
    with pytest.raises(AnsibleFilterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flt.monitoring_targets(GROUPS, HOSTVARS, "cmsg1", extra)


def test_an_empty_inventory_gives_every_kind_empty():
    assert flt.monitoring_targets({}, {}, "mon1") == {kind: [] for kind in flt.TARGET_KINDS}


def test_the_filter_is_registered_under_its_documented_name():
    assert flt.FilterModule().filters() == {"monitoring_targets": flt.monitoring_targets}


def test_the_database_nodes_patroni_api_but_not_an_etcd_only_witness():
    groups = {"databases": ["db1", "db2", "db3"]}
    hostvars = {
        "db1": {"ansible_host": "10.0.0.61"},
        "db2": {"ansible_host": "10.0.0.62", "gatehouse_address": "10.1.0.62"},
        "db3": {"ansible_host": "10.0.0.63", "database_patroni": "false"},
    }
    found = flt.monitoring_targets(groups, hostvars, "m1")
    assert found["postgresql"] == ["10.0.0.61:8008", "10.1.0.62:8008"]
