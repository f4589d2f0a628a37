"""Options and rendering of the monitoring module (plugins/module_utils/_deploy/monitoring.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
mon = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.monitoring")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")


def params(**overrides) -> dict:
    values = {name: spec.get("default") for name, spec in mon.ARGUMENT_SPEC.items()}
    values.update(
        targets={
            "broker": ["127.0.0.1:9181"],
            "cm": ["10.0.0.21:9180"],
            "sg": ["10.0.0.21:9172"],
            "halb": ["10.0.0.41:8405", "[fd00::42]:8405"],
            "postgresql": [],
        },
        alert_rules="groups: []\n",
    )
    values.update(overrides)
    return values


def test_one_job_per_kind_and_the_vrrp_state_of_the_halb_nodes():
    config = yaml.safe_load(mon.prometheus_yml(params()))
    assert config["global"] == {"scrape_interval": "15s", "evaluation_interval": "15s"}
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "alerting" not in config
    assert [
        (j["job_name"], j["metrics_path"], j["static_configs"][0]["targets"])
        for j in config["scrape_configs"]
    ] == [
        ("gatehouse-broker", "/metrics", ["127.0.0.1:9181"]),
        ("gatehouse-cm", "/metrics", ["10.0.0.21:9180"]),
        ("gatehouse-sg", "/metrics", ["10.0.0.21:9172"]),
        ("gatehouse-halb", "/metrics", ["10.0.0.41:8405", "[fd00::42]:8405"]),
        ("gatehouse-halb-vrrp", "/vrrp", ["10.0.0.41:8405", "[fd00::42]:8405"]),
    ]
    assert mon.prometheus_yml(params()) == mon.prometheus_yml(params())


def test_the_rules_file_the_alert_rules_name_every_job_the_module_writes():
    # The rules select on job names; a job the module writes must not be missing from them.
    rules = (REPO / "roles" / "monitoring" / "files" / "gatehouse-alerts.yml").read_text()
    for job in ("gatehouse-sg", "gatehouse-halb", "gatehouse-halb-vrrp", "gatehouse-postgresql"):
        assert job in rules, job


def test_alertmanagers_and_no_rules():
    config = yaml.safe_load(mon.prometheus_yml(params(alert_rules=None, alertmanagers=["10.0.0.5:9093"])))
    assert config["rule_files"] == []
    assert config["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": ["10.0.0.5:9093"]}]}]}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:9180", ("10.0.0.1", 9180)),
        ("cm1.example.com:1", ("cm1.example.com", 1)),
        ("[fd00::1]:8405", ("fd00::1", 8405)),
    ],
)
def test_targets_are_host_and_port(value, expected):
    assert mon.parse_target(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1", "needs a port"),
        ("fd00::1:9180", "needs a port"),
        ("[fd00::1]", "write an IPv6 target"),
        ("10.0.0.1:0", "invalid port"),
        ("bad host:80", "no valid host"),
    ],
)
def test_bad_targets_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        mon.parse_target(value)


def test_every_problem_is_listed_at_once():
    bad = params(
        targets={"sg": ["10.0.0.1", "10.0.0.2:9172", "10.0.0.2:9172"]},
        retention="forever",
        port=0,
        listen_address="any",
        purge=True,
        max_connections=0,
        read_timeout="ten seconds",
    )
    with pytest.raises(dep.ValidationError) as caught:
        mon.validate(bad)
    errors = caught.value.errors
    for fragment in (
        "targets.sg: '10.0.0.1' needs a port",
        "targets.sg lists 10.0.0.2:9172 twice",
        "retention 'forever'",
        "port must be between 1 and 65535",
        "listen_address 'any'",
        "purge is only used with state=absent",
        "max_connections must be between 1 and 4096",
        "read_timeout 'ten seconds'",
    ):
        assert any(fragment in e for e in errors), (fragment, errors)


def test_bridge_mode_publishes_the_port_and_listens_inside_on_9090():
    spec = mon.container_spec(params(network_mode="bridge", port=19090), "gatehouse/prometheus:0.1.0", "m1")
    assert spec["ports"] == [{"host": 19090, "container": 9090, "protocol": "tcp"}]
    assert "--web.listen-address=0.0.0.0:9090" in spec["command"]
    host = mon.container_spec(params(port=19090), "gatehouse/prometheus:0.1.0", "m1")
    assert host["ports"] == [] and "--web.listen-address=0.0.0.0:19090" in host["command"]
    # The configuration read-only, the time series writable.
    assert [(m["target"], m["read_only"]) for m in host["mounts"]] == [
        ("/etc/prometheus", True),
        ("/prometheus", False),
    ]


def test_the_web_ui_and_api_bound_connections_and_the_time_to_send_a_request():
    spec = mon.container_spec(params(), "gatehouse/prometheus:0.1.0", "m1")
    assert "--web.max-connections=64" in spec["command"]
    assert "--web.read-timeout=10s" in spec["command"]
    tuned = mon.container_spec(
        params(max_connections=8, read_timeout="3s"), "gatehouse/prometheus:0.1.0", "m1"
    )
    assert {"--web.max-connections=8", "--web.read-timeout=3s"} <= set(tuned["command"])


def test_the_database_nodes_are_scraped_over_https_with_the_ca_only_when_it_is_given():
    targets = {kind: [] for kind in mon.TARGET_KINDS} | {
        "postgresql": ["10.0.0.61:8008"],
        "cm": ["10.0.0.21:9180"],
    }
    plain = yaml.safe_load(mon.prometheus_yml(params(targets=targets)))
    assert all("scheme" not in j and "tls_config" not in j for j in plain["scrape_configs"])
    tls = yaml.safe_load(mon.prometheus_yml(params(targets=targets, ca_cert="/opt/gatehouse/pki/ca.pem")))
    jobs = {j["job_name"]: j for j in tls["scrape_configs"]}
    assert jobs["gatehouse-postgresql"]["scheme"] == "https"
    assert jobs["gatehouse-postgresql"]["tls_config"] == {"ca_file": "/etc/prometheus/ca.pem"}
    assert "scheme" not in jobs["gatehouse-cm"]  # the Gatehouse services' management ports stay plain HTTP
