"""Options, rendering and container specs of the database module (plugins/module_utils/_deploy/database.py)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
db = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.database")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")

MEMBERS = [
    {"name": "db1", "address": "10.0.0.31"},
    {"name": "db2", "address": "10.0.0.32"},
    {"name": "db3", "address": "10.0.0.33"},
]
PASSWORDS = {
    "superuser_password": "superuser-secret-1",
    "replication_password": "replication-secret-2",
    "broker_password": "broker-secret-3",
}


def params(**overrides) -> dict:
    values = {name: spec.get("default") for name, spec in db.ARGUMENT_SPEC.items()}
    values.update(name="db1", address="10.0.0.31", members=MEMBERS, **PASSWORDS)
    values.update(overrides)
    return values


def errors_of(**overrides) -> list[str]:
    with pytest.raises(dep.ValidationError) as info:
        db.validate(params(**overrides))
    return info.value.errors


def test_defaults_are_valid():
    db.validate(params())


def test_patroni_timing_rule_is_enforced():
    (error,) = errors_of(ttl=9)
    assert "loop_wait + 2 * retry_timeout (10) must not exceed ttl (9)" in error
    db.validate(params(ttl=30, loop_wait=10, retry_timeout=10))


def test_members_must_name_this_node_with_its_address_and_be_odd():
    assert any("must list this node" in e for e in errors_of(name="db4"))
    assert any("gives db1 the address 10.0.0.31" in e for e in errors_of(address="10.0.0.99"))
    assert any("odd number" in e for e in errors_of(members=MEMBERS[:2]))
    assert any("twice" in e for e in errors_of(members=[*MEMBERS, dict(MEMBERS[0])]))


def test_patroni_node_needs_passwords_but_a_witness_does_not():
    errors = errors_of(superuser_password=None, broker_password="short")
    assert any("superuser_password is required" in e for e in errors)
    assert any("broker_password must be one line of at least 12" in e for e in errors)
    db.validate(
        params(patroni=False, superuser_password=None, replication_password=None, broker_password=None)
    )


def test_absent_needs_only_the_name():
    db.validate(params(state="absent", address=None, members=None, superuser_password=None))


def test_sql_names_and_reserved_roles():
    assert any("broker_role" in e for e in errors_of(broker_role="postgres"))
    assert any("broker_database" in e for e in errors_of(broker_database="Bad-Name"))


def test_etcd_configuration_names_every_member_over_tls():
    config = yaml.safe_load(db.etcd_yml(params()))
    assert config["initial-cluster"] == (
        "db1=https://10.0.0.31:2380,db2=https://10.0.0.32:2380,db3=https://10.0.0.33:2380"
    )
    assert config["advertise-client-urls"] == "https://10.0.0.31:2379"
    for key in ("client-transport-security", "peer-transport-security"):
        assert config[key]["client-cert-auth"] is True
        assert config[key]["trusted-ca-file"] == "/etc/gatehouse-tls/ca.pem"
    assert config["enable-grpc-gateway"] is True


def test_patroni_configuration_has_no_password_and_the_failover_settings():
    text = db.patroni_yml(params()).decode()
    for secret in PASSWORDS.values():
        assert secret not in text
    config = yaml.safe_load(text)
    dcs = config["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (10, 2, 4)
    assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is False
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert config["etcd3"]["hosts"] == ["10.0.0.31:2379", "10.0.0.32:2379", "10.0.0.33:2379"]
    assert config["etcd3"]["protocol"] == "https"
    auth = config["postgresql"]["authentication"]
    assert auth["replication"]["sslmode"] == "verify-full"
    assert "password" not in auth["superuser"] and "password" not in auth["replication"]
    assert config["postgresql"]["pg_hba"][-1] == "hostnossl all all all reject"
    assert config["bootstrap"]["post_bootstrap"].endswith("post-bootstrap gatehouse gatehouse")
    assert config["restapi"]["verify_client"] == "optional"


def test_rendering_is_stable():
    assert db.patroni_yml(params()) == db.patroni_yml(params())
    assert db.etcd_yml(params()) == db.etcd_yml(params())


def test_bridge_publishes_the_four_ports_and_a_witness_runs_etcd_only():
    specs = db.container_specs(params(), "gatehouse/database:0.1.0", "db1")
    assert [p["host"] for p in specs["etcd"]["ports"]] == [2379, 2380]
    assert [p["host"] for p in specs["patroni"]["ports"]] == [5432, 8008]
    assert not any(secret in json.dumps(specs) for secret in PASSWORDS.values())
    secrets = [m for m in specs["patroni"]["mounts"] if m["target"] == "/secrets"]
    assert secrets and secrets[0]["read_only"]
    host = db.container_specs(params(network_mode="host"), "gatehouse/database:0.1.0", "db1")
    assert host["etcd"]["ports"] == [] and host["patroni"]["ports"] == []
    witness = db.container_specs(params(patroni=False), "gatehouse/database:0.1.0", "db3")
    assert set(witness) == {"etcd"}


def test_publish_address_publishes_the_four_ports_on_that_address_only():
    specs = db.container_specs(params(publish_address="10.0.0.31"), "gatehouse/database:0.1.0", "db1")
    assert specs["etcd"]["ports"] == [
        {"host": 2379, "container": 2379, "protocol": "tcp", "host_ip": "10.0.0.31"},
        {"host": 2380, "container": 2380, "protocol": "tcp", "host_ip": "10.0.0.31"},
    ]
    assert {(p["host_ip"], p["host"]) for p in specs["patroni"]["ports"]} == {
        ("10.0.0.31", 5432),
        ("10.0.0.31", 8008),
    }
    # Unset: every address, as before (no host_ip); the advertised address is the option address.
    assert not any("host_ip" in p for p in db.container_specs(params(), "img", "db1")["etcd"]["ports"])
    config = yaml.safe_load(db.patroni_yml(params(publish_address="10.0.0.31")))
    assert config["postgresql"]["connect_address"] == "10.0.0.31:5432"
    db.validate(params(publish_address="10.0.0.31"))
    db.validate(params(publish_address="fd00::31"))


def test_publish_address_is_refused_without_bridge_mode_or_when_not_an_ip():
    for mode in ("host", "container:holder"):
        (error,) = errors_of(network_mode=mode, publish_address="10.0.0.31")
        assert "publish_address is only used with network_mode=bridge" in error
        assert f"network_mode={mode}" in error
    (error,) = errors_of(publish_address="db1.example.com")
    assert "must be an IP address" in error


def test_the_port_check_looks_at_the_publish_address_only():
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.2", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not db.port_free(port, "127.0.0.2")
        assert not db.port_free(port)  # every address includes 127.0.0.2
        assert db.port_free(port, "127.0.0.3")  # another address of the host
    assert db.address_local("127.0.0.1")
    assert not db.address_local("192.0.2.77")  # TEST-NET-1, no address of this host
