"""Options and rendering of the agent module (plugins/module_utils/_deploy/agent.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
agent = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.agent")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
ctr = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._docker.containers")


def entry(name: str, **overrides) -> dict:
    values = {key: spec.get("default") for key, spec in agent.INSTANCE_SPEC.items()}
    values.update(name=name, **overrides)
    return values


def params(*instances: dict, **overrides) -> dict:
    values = {name: spec.get("default") for name, spec in agent.ARGUMENT_SPEC.items()}
    values.update(instances=list(instances) or [entry("desk1")], host_address="10.0.0.31")
    values.update(overrides)
    return values


def test_properties_name_the_mounted_files_and_the_settings():
    p = params(broker_url="https://broker:8443", broker_ca_cert="/etc/ssl/broker-ca.pem")
    text = agent.properties(p, p["instances"][0]).decode()
    assert text == agent.properties(p, p["instances"][0]).decode()
    lines = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines["ControlPort"] == "60443" and lines["SessionPort"] == "4172" and lines["AdminPort"] == "9182"
    assert (lines["SslCert"], lines["SslKey"], lines["ClientCaCert"]) == (
        "/certs/cert.pem",
        "/certs/key.pem",
        "/certs/ca.pem",
    )
    assert lines["BrokerCaCert"] == "/certs/broker-ca.pem" and lines["BrokerUrl"] == "https://broker:8443"
    assert lines["Hostname"] == "desk1" and lines["Capacity"] == "10"
    # Bridge mode: the host's address is the agent's; elsewhere the agent's own unless given.
    assert lines["AdvertiseAddress"] == "10.0.0.31"
    assert "AdvertiseAddress=\n" in agent.properties(dict(p, network_mode="host"), p["instances"][0]).decode()
    given = entry("desk2", advertise_address="192.0.2.7")
    assert "AdvertiseAddress=192.0.2.7\n" in agent.properties(dict(p, network_mode="host"), given).decode()
    assert "BrokerCaCert=/certs/ca.pem\n" in agent.properties(params(), entry("desk1")).decode()


def test_each_container_mounts_its_own_key_only_and_gets_the_agent_hardening():
    p = params(entry("desk1"), entry("desk2", control_port=60444, session_port=4173, admin_port=9183))
    spec = agent.container_spec(p, p["instances"][1], "gatehouse/agent:0.1.0", "host1")
    sources = {m["target"]: m["source"] for m in spec["mounts"]}
    assert sources["/certs/key.pem"] == "/opt/gatehouse/agent/pki/desk2.key"
    assert sources["/certs/cert.pem"] == "/opt/gatehouse/agent/pki/desk2.pem"
    assert "/opt/gatehouse/agent/pki/desk1.key" not in sources.values()
    assert all(m["read_only"] for m in spec["mounts"])
    assert spec["ports"] == [
        {"host": 60444, "container": 60444, "protocol": "tcp"},
        {"host": 4173, "container": 4173, "protocol": "tcp"},
        {"host": 4173, "container": 4173, "protocol": "udp"},
    ]
    assert agent.container_spec(dict(p, network_mode="host"), p["instances"][1], "i", "h")["ports"] == []
    assert ctr.spec_hardening(spec) == ctr.hardening("agent")


@pytest.mark.parametrize(
    ("instances", "overrides", "message"),
    [
        (
            [entry("desk1"), entry("desk1", control_port=1, session_port=2)],
            {},
            "instances names desk1 more than once",
        ),
        ([entry("pki")], {}, "'pki' is not a valid agent name"),
        ([entry("a b")], {}, "'a b' is not a valid agent name"),
        ([entry("desk1"), entry("desk2")], {}, "desk2: control_port 60443 is taken by desk1 (control_port)"),
        (
            [entry("desk1", session_port=60443)],
            {},
            "desk1: session_port 60443 is taken by desk1 (control_port)",
        ),
        (
            [entry("desk1", control_port=70000)],
            {},
            "instances desk1: control_port must be between 1 and 65535",
        ),
        ([entry("desk1", capacity=0)], {}, "desk1: capacity must be at least 1"),
        ([entry("desk1", hostname="two words")], {}, "desk1: hostname must be a host name"),
        ([entry("desk1")], {"broker_url": "broker:8443"}, "broker_url must look like https://broker:port"),
        ([entry("desk1")], {"report_interval": 0}, "report_interval must be at least 1 second"),
        ([entry("desk1")], {"network_mode": "nat"}, "network_mode must be bridge, host or container:<name>"),
        (
            [entry("desk1")],
            {"data_dir": "/agent"},
            "data_dir must be an absolute path at least two levels deep",
        ),
        ([], {}, "instances is empty"),
    ],
)
def test_bad_options_are_each_named(instances, overrides, message):
    with pytest.raises(dep.ValidationError) as raised:
        agent.validate(dict(params(), instances=instances, **overrides))
    assert any(message in error for error in raised.value.errors), raised.value.errors


def test_missing_certificates_are_named_with_what_to_do(tmp_path):
    p = params(entry("desk1"), data_dir=str(tmp_path))
    with pytest.raises(dep.ValidationError) as raised:
        agent.read_certificates(p)
    (error,) = raised.value.errors
    assert str(tmp_path / "pki" / "desk1.pem") in error and "node_certificates" in error
    for name in ("desk1.pem", "desk1.key", "ca.pem"):
        (tmp_path / "pki").mkdir(exist_ok=True)
        (tmp_path / "pki" / name).write_text(name)
    assert agent.read_certificates(p)["desk1"]["key"] == b"desk1.key"
