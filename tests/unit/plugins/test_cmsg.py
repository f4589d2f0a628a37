"""Validation and rendering of the cmsg module (module_utils._deploy.cmsg, _deploy, _files) without Docker."""

from __future__ import annotations

import importlib
import re
import stat
import sys
from pathlib import Path

import pytest
import yaml

from gatehouse.config import parse_kv

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
files = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.files")
ctr = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._docker.containers")
tls = importlib.import_module("tls_material")


def params(**overrides) -> dict:
    """Module parameters as AnsibleModule would give them (collection_helpers.cmsg_params)."""
    return importlib.import_module("collection_helpers").cmsg_params(**overrides)


def no_networks() -> list[tuple[str, str]]:
    return []


def errors_of(p: dict, used=no_networks) -> list[str]:
    with pytest.raises(dep.ValidationError) as info:
        cmsg.validate(p, used)
    return info.value.errors


def test_valid_options_pass() -> None:
    values = cmsg.validate(params(host_address=["cmsg1.example.test", "10.0.0.5"]), no_networks)
    assert values["external_pcoip_ip"] == ["203.0.113.10"]
    assert values["host_address"] == ["cmsg1.example.test", "10.0.0.5"]


def test_accept_policies_required() -> None:
    errors = errors_of(params(accept_policies=False))
    assert len(errors) == 1 and "accept_policies must be true" in errors[0]


def test_external_ip_required_with_gateway() -> None:
    errors = errors_of(params(external_pcoip_ip=[]))
    assert any(
        "external_pcoip_ip needs the public IPv4 or (with enable_ipv6) IPv6 address" in e for e in errors
    )
    # LAN only: no gateway, no external address needed.
    cmsg.validate(params(external_pcoip_ip=[], enable_security_gateway=False), no_networks)


def test_two_ipv4_external_addresses_refused() -> None:
    errors = errors_of(params(external_pcoip_ip=["203.0.113.10", "203.0.113.11"]))
    assert any("holds 2 IPv4 addresses" in e for e in errors)


def test_ipv6_external_address_needs_enable_ipv6() -> None:
    errors = errors_of(params(external_pcoip_ip=["203.0.113.10", "2001:db8::10"]))
    assert any("set enable_ipv6=true" in e for e in errors)
    values = cmsg.validate(
        params(external_pcoip_ip=["203.0.113.10", "2001:db8::10"], enable_ipv6=True), no_networks
    )
    assert values["external_pcoip_ip"] == ["203.0.113.10", "2001:db8::10"]


def test_pure_ipv6_gateway() -> None:
    """The seed's "pure IPv6": the SG's only external address is IPv6, with enable_ipv6."""
    errors = errors_of(params(external_pcoip_ip=["2001:db8::10"]))
    assert any("set enable_ipv6=true" in e for e in errors)
    p = params(external_pcoip_ip=["2001:db8::10"], enable_ipv6=True)
    values = cmsg.validate(p, no_networks)
    assert values["external_pcoip_ip"] == ["2001:db8::10"]
    cm = parse_kv(cmsg.config_properties(p, values).decode())
    assert (cm["ExternalPcoipIp"], cm["EnableIpv6"]) == ("2001:db8::10", "true")
    # The SG then listens on both families; without IPv6 on IPv4 only.
    assert parse_kv(cmsg.security_gateway_conf(p).decode())["ListenAddress"] == "::"
    assert parse_kv(cmsg.security_gateway_conf(params()).decode())["ListenAddress"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("cidr", "words"),
    [
        ("2001:db8::/64", "not a unique local IPv6 network"),
        ("10.101.0.0/24", "not a unique local IPv6 network"),
        ("fd00:10:101::/120", "too small"),
        ("fd00::/40", "larger than /48"),
        ("fd00:10:101::1/64", "CIDR notation"),
    ],
)
def test_ipv6_docker_network_must_be_unique_local(cidr: str, words: str) -> None:
    errors = errors_of(params(enable_ipv6=True, docker_network_cidr_v6=cidr))
    assert any(words in e for e in errors), errors
    # Without enable_ipv6 the option is not used, so not checked.
    cmsg.validate(params(docker_network_cidr_v6=cidr), no_networks)


def test_ipv6_docker_network_must_not_overlap() -> None:
    def used() -> list[tuple[str, str]]:
        return [("docker network other", "fd00:10:101::/48")]

    errors = errors_of(params(enable_ipv6=True), used)
    assert any("docker_network_cidr_v6 fd00:10:101::/64 overlaps" in e and "other" in e for e in errors)


def test_external_ip_must_be_an_address() -> None:
    assert any("is not an IP address" in e for e in errors_of(params(external_pcoip_ip=["gw.example.test"])))


@pytest.mark.parametrize("cidr", ["8.8.8.0/24", "100.64.0.0/24", "172.32.0.0/24", "fd00::/64"])
def test_public_or_non_ipv4_cidr_refused(cidr: str) -> None:
    errors = errors_of(params(docker_network_cidr=cidr))
    assert any("not inside a private range" in e for e in errors)


def test_malformed_cidr_refused() -> None:
    errors = errors_of(params(docker_network_cidr="10.101.0.1/24"))
    assert any("is not a network in CIDR notation" in e for e in errors)


def test_overlapping_cidr_refused_with_owner_named() -> None:
    def used() -> list[tuple[str, str]]:
        return [("interface eth0", "10.101.0.0/16"), ("docker network bridge", "172.17.0.0/16")]

    errors = errors_of(params(), used)
    assert len(errors) == 1
    assert "overlaps" in errors[0] and "10.101.0.0/16 (interface eth0)" in errors[0]
    assert "172.17.0.0/16" not in errors[0]
    # Another range is fine; outside bridge mode no network is created, so no overlap check.
    cmsg.validate(params(docker_network_cidr="10.102.0.0/24"), used)
    cmsg.validate(params(network_mode="host"), used)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://broker.example.test:8443", "must be an https URL"),
        ("https://broker.example.test", "has no port"),
        ("https://:8443", "has no host"),
        ("https://broker.example.test:8443/other", "unexpected path"),
        ("https://user:pw@broker.example.test:8443", "must not carry credentials"),
        ("https://broker.example.test:99999", "is not a valid URL"),
        ("broker.example.test:8443", "must be an https URL"),
    ],
)
def test_bad_broker_url(url: str, fragment: str) -> None:
    errors = errors_of(params(broker_url=url))
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize(
    "url", ["https://broker:8443", "https://10.0.0.5:443/pcoip-broker/xml", "https://[2001:db8::5]:443"]
)
def test_good_broker_urls(url: str) -> None:
    cmsg.validate(params(broker_url=url), no_networks)


def test_limits() -> None:
    assert any(
        "max_connections must be between 1 and 5000" in e for e in errors_of(params(max_connections=5001))
    )
    assert any("max_clients" in e for e in errors_of(params(max_clients=0)))
    cmsg.validate(
        params(max_connections=1, max_clients=10000, max_concurrent_establishments=200), no_networks
    )


def test_host_address_at_most_one_ip_and_one_fqdn() -> None:
    errors = errors_of(params(host_address=["a.example.test", "b.example.test"]))
    assert any("at most one IP address and one FQDN" in e for e in errors)
    errors = errors_of(params(host_address=["not a name"]))
    assert any("neither an IP address nor a fully qualified domain name" in e for e in errors)


def test_tls_material_required_and_exclusive_rules() -> None:
    errors = errors_of(params(self_signed=False))
    assert any("TLS material is required" in e for e in errors)


def test_every_problem_reported_at_once() -> None:
    errors = errors_of(
        params(
            accept_policies=False,
            broker_url="http://x",
            external_pcoip_ip=[],
            docker_network_cidr="8.8.8.0/24",
        )
    )
    assert len(errors) == 4


def test_agent_verification_needs_the_ca_and_off_is_warned() -> None:
    errors = errors_of(params(agent_ca_cert=None))
    assert len(errors) == 1 and "agent_ca_cert is required with agent_tls_verify=true" in errors[0]
    assert cmsg.validate(params(), no_networks)["warnings"] == []
    warnings = cmsg.validate(params(agent_ca_cert=None, agent_tls_verify=False), no_networks)["warnings"]
    assert len(warnings) == 1 and "agent_tls_verify=false" in warnings[0]
    warnings = cmsg.validate(params(broker_tls_verify=False), no_networks)["warnings"]
    assert len(warnings) == 1 and "broker_tls_verify=false" in warnings[0]


def test_admin_address_must_be_an_address() -> None:
    assert any("admin_address" in e for e in errors_of(params(admin_address="everywhere")))


def test_bridge_mode_keeps_the_admin_listeners_reachable_over_the_docker_network() -> None:
    # The default path: bridge, admin_address 0.0.0.0, the CM polls http://<prefix>-sg:9172/health,
    # a name the Docker network of the pair resolves (both containers are attached to it).
    p = params(name_prefix="gh")
    assert p["network_mode"] == "bridge" and p["admin_address"] == "0.0.0.0"
    specs = cmsg.container_specs(p, cmsg.Names("gh"), {"cm": "cm:1", "sg": "sg:1"}, "node1")
    assert {s["name"]: s["network"] for s in specs} == {"gh-cm": "gh-cmsg", "gh-sg": "gh-cmsg"}
    # The management ports are published on the host's loopback only (upgrade.yml's drain wait).
    admin = {
        s["service"]: [
            port for port in s["ports"] if port["container"] in (cmsg.CM_ADMIN_PORT, cmsg.SG_ADMIN_PORT)
        ]
        for s in specs
    }
    assert admin == {
        "cm": [{"host": 9180, "container": 9180, "protocol": "tcp", "host_ip": "127.0.0.1"}],
        "sg": [{"host": 9172, "container": 9172, "protocol": "tcp", "host_ip": "127.0.0.1"}],
    }
    for name in ("https_port", "http_port", "pcoip_port"):
        assert any(
            f"{name} and sg_admin_host_port are both 9172: with network_mode=bridge every published host port"
            in e
            for e in errors_of(params(**{name: 9172}))
        ), name
    cmsg.validate(params(network_mode="host", https_port=9172), no_networks)  # host mode: no publishing
    sg = parse_kv(cmsg.security_gateway_conf(p).decode())
    assert sg["AdminAddress"] == "0.0.0.0" and sg["AdminPort"] == str(cmsg.SG_ADMIN_PORT)
    # :: is IPv6 only (asyncio sets IPV6_V6ONLY): the IPv4 publishing and the CM's poll would miss it.
    assert any("accepts IPv6 only; keep 0.0.0.0" in e for e in errors_of(params(admin_address="::")))
    # A loopback or host address would leave the CM's /health at 503 (or the listener unbindable).
    for address in ("127.0.0.1", "10.0.0.5"):
        assert any("network_mode=bridge" in e for e in errors_of(params(admin_address=address))), address
    cmsg.validate(
        params(admin_address="127.0.0.1", enable_security_gateway=False, external_pcoip_ip=[]), no_networks
    )
    cmsg.validate(params(admin_address="127.0.0.1", network_mode="host"), no_networks)


def admin_bindings(p: dict) -> dict[str, list[dict]]:
    """The loopback bindings (the management ports) of each container spec of ``p``."""
    specs = cmsg.container_specs(p, cmsg.Names(p["name_prefix"]), {"cm": "cm:1", "sg": "sg:1"}, "node1")
    return {s["service"]: [port for port in s["ports"] if port.get("host_ip")] for s in specs}


def test_admin_host_ports_default_to_the_container_ports() -> None:
    """The defaults give the same container spec (and so the same spec hash) as before the options:
    existing bridge-mode deployments are left alone."""
    assert cmsg.ARGUMENT_SPEC["cm_admin_host_port"] == {"type": "int", "default": 9180}
    assert cmsg.ARGUMENT_SPEC["sg_admin_host_port"] == {"type": "int", "default": 9172}
    p = params()
    assert admin_bindings(p) == {
        "cm": [{"host": 9180, "container": 9180, "protocol": "tcp", "host_ip": "127.0.0.1"}],
        "sg": [{"host": 9172, "container": 9172, "protocol": "tcp", "host_ip": "127.0.0.1"}],
    }
    specs = cmsg.container_specs(p, cmsg.Names("gatehouse"), {"cm": "cm:1", "sg": "sg:1"}, "node1")
    cm_hash = ctr.spec_hash(specs[0], {"image": "sha256:1"})
    same = cmsg.container_specs(
        params(cm_admin_host_port=9180, sg_admin_host_port=9172),
        cmsg.Names("gatehouse"),
        {"cm": "cm:1", "sg": "sg:1"},
        "node1",
    )
    assert ctr.spec_hash(same[0], {"image": "sha256:1"}) == cm_hash
    moved = cmsg.container_specs(
        params(cm_admin_host_port=19180), cmsg.Names("gatehouse"), {"cm": "cm:1", "sg": "sg:1"}, "node1"
    )
    assert ctr.spec_hash(moved[0], {"image": "sha256:1"}) != cm_hash
    assert ctr.spec_hash(moved[1], {"image": "sha256:1"}) == ctr.spec_hash(specs[1], {"image": "sha256:1"})


def test_admin_host_ports_move_only_the_host_side() -> None:
    p = params(name_prefix="second", cm_admin_host_port=19180, sg_admin_host_port=19172)
    values = cmsg.validate(p, no_networks)
    assert admin_bindings(p) == {
        "cm": [{"host": 19180, "container": 9180, "protocol": "tcp", "host_ip": "127.0.0.1"}],
        "sg": [{"host": 19172, "container": 9172, "protocol": "tcp", "host_ip": "127.0.0.1"}],
    }
    # The listeners in the containers and the CM's view of the SG stay on the containers' ports.
    cm = parse_kv(cmsg.config_properties(p, values).decode())
    assert cm["AdminPort"] == "9180" and cm["SecurityGatewayHealthUrl"] == "http://second-sg:9172/health"
    assert parse_kv(cmsg.security_gateway_conf(p).decode())["AdminPort"] == "9172"
    assert values["management_urls"] == {"cm": "http://127.0.0.1:19180", "sg": "http://127.0.0.1:19172"}
    names = cmsg.Names("second")
    specs = cmsg.container_specs(p, names, {"cm": "gatehouse/cm:0.1.0", "sg": "gatehouse/sg:0.1.0"}, "node1")
    doc = yaml.safe_load(dep.render_compose(specs, None))
    assert doc["services"]["cm"]["ports"] == ["443:8443/tcp", "80:8080/tcp", "127.0.0.1:19180:9180/tcp"]
    assert doc["services"]["sg"]["ports"] == ["4172:4172/tcp", "4172:4172/udp", "127.0.0.1:19172:9172/tcp"]


@pytest.mark.parametrize("name", ["cm_admin_host_port", "sg_admin_host_port"])
@pytest.mark.parametrize("value", [0, -1, 65536])
def test_admin_host_ports_must_be_ports(name: str, value: int) -> None:
    errors = errors_of(params(**{name: value}))
    assert f"{name} must be between 1 and 65535, got {value}" in errors, errors
    # Checked in every network mode, like the other port options.
    assert f"{name} must be between 1 and 65535, got {value}" in errors_of(
        params(network_mode="host", **{name: value})
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cm_admin_host_port": 9172}, "cm_admin_host_port and sg_admin_host_port are both 9172"),
        ({"sg_admin_host_port": 9180}, "cm_admin_host_port and sg_admin_host_port are both 9180"),
        ({"cm_admin_host_port": 443}, "https_port and cm_admin_host_port are both 443"),
        ({"sg_admin_host_port": 80}, "http_port and sg_admin_host_port are both 80"),
        ({"sg_admin_host_port": 4172}, "pcoip_port and sg_admin_host_port are both 4172"),
        ({"https_port": 4172}, "https_port and pcoip_port are both 4172"),
        ({"http_port": 443}, "https_port and http_port are both 443"),
    ],
)
def test_published_host_ports_must_differ_in_bridge_mode(overrides: dict, message: str) -> None:
    errors = errors_of(params(**overrides))
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert "with network_mode=bridge every published host port must differ" in errors[0]
    # Nothing is published in the other network modes.
    cmsg.validate(params(network_mode="host", **overrides), no_networks)
    cmsg.validate(params(network_mode="container:node1", **overrides), no_networks)


def test_unpublished_ports_do_not_clash() -> None:
    # Without the gateway its ports are not published; http_port 0 publishes nothing.
    lan = {"enable_security_gateway": False, "external_pcoip_ip": []}
    cmsg.validate(params(sg_admin_host_port=9180, **lan), no_networks)
    cmsg.validate(params(pcoip_port=443, **lan), no_networks)
    p = params(http_port=0, cm_admin_host_port=80)
    cmsg.validate(p, no_networks)
    values = cmsg.validate(params(**lan), no_networks)
    assert values["management_urls"] == {"cm": "http://127.0.0.1:9180", "sg": None}
    # Three options on one port: each later one is named with the first.
    errors = errors_of(params(http_port=443, cm_admin_host_port=443))
    assert [e.split(":")[0] for e in errors] == [
        "https_port and http_port are both 443",
        "https_port and cm_admin_host_port are both 443",
    ]


@pytest.mark.parametrize(
    ("overrides", "urls"),
    [
        ({}, ("http://127.0.0.1:9180", "http://127.0.0.1:9172")),
        ({"cm_admin_host_port": 29180}, ("http://127.0.0.1:29180", "http://127.0.0.1:9172")),
        # Outside bridge mode nothing is published: the listeners' own ports, at admin_address.
        (
            {"network_mode": "host", "cm_admin_host_port": 29180},
            ("http://127.0.0.1:9180", "http://127.0.0.1:9172"),
        ),
        (
            {"network_mode": "host", "admin_address": "10.0.0.5"},
            ("http://10.0.0.5:9180", "http://10.0.0.5:9172"),
        ),
        (
            {"network_mode": "host", "admin_address": "fd00::5"},
            ("http://[fd00::5]:9180", "http://[fd00::5]:9172"),
        ),
        ({"network_mode": "container:node1"}, ("http://127.0.0.1:9180", "http://127.0.0.1:9172")),
        ({"network_mode": "host", "admin_address": "::"}, ("http://[::1]:9180", "http://[::1]:9172")),
    ],
)
def test_management_urls_per_network_mode(overrides: dict, urls: tuple[str, str]) -> None:
    values = cmsg.validate(params(**overrides), no_networks)
    assert values["management_urls"] == {"cm": urls[0], "sg": urls[1]}


def test_role_and_upgrade_pass_the_admin_host_ports() -> None:
    """The cmsg role hands its variables to the module; the upgrade's drain wait reads the same ones."""
    tasks = yaml.safe_load((REPO / "roles" / "cmsg" / "tasks" / "main.yml").read_text())
    (module_task,) = [t for t in tasks if "gatehouse.access.cmsg" in t]
    args = module_task["gatehouse.access.cmsg"]
    assert args["cm_admin_host_port"] == "{{ cmsg_cm_admin_host_port }}"
    assert args["sg_admin_host_port"] == "{{ cmsg_sg_admin_host_port }}"
    # Every module option is a role variable (the shared ones included), and none is left out.
    assert set(args) == set(cmsg.ARGUMENT_SPEC)
    wait = (REPO / "playbooks" / "tasks" / "wait-drained.yml").read_text()
    assert "cmsg_cm_admin_host_port" in wait and "cmsg_sg_admin_host_port" in wait
    assert ":9180/" not in wait and ":9172/" not in wait


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({}, "http://gh-sg:9172/health"),
        ({"network_mode": "host"}, "http://127.0.0.1:9172/health"),
        ({"network_mode": "container:node1"}, "http://127.0.0.1:9172/health"),
        ({"network_mode": "host", "admin_address": "10.0.0.5"}, "http://10.0.0.5:9172/health"),
        ({"network_mode": "host", "admin_address": "fd00::5"}, "http://[fd00::5]:9172/health"),
        # A listener on :: takes IPv6 only (asyncio sets IPV6_V6ONLY): the CM asks ::1.
        ({"network_mode": "host", "admin_address": "::"}, "http://[::1]:9172/health"),
        ({"enable_security_gateway": False, "external_pcoip_ip": []}, ""),
    ],
)
def test_security_gateway_health_url_per_network_mode(overrides: dict, url: str) -> None:
    p = params(name_prefix="gh", **overrides)
    parsed = parse_kv(cmsg.config_properties(p, cmsg.validate(p, no_networks)).decode())
    assert parsed["SecurityGatewayHealthUrl"] == url


def test_internal_tls_keys_rendered() -> None:
    p = params(identity_cert="/pki/cm.pem", identity_key="/pki/cm.key", broker_ca_cert="/pki/ca.pem")
    parsed = parse_kv(cmsg.config_properties(p, cmsg.validate(p, no_networks)).decode())
    assert parsed["IdentityCert"] == "/certs/identity.pem"
    assert parsed["IdentityKey"] == "/certs/identity-key.pem"
    assert parsed["AgentCaCert"] == "/certs/agent-ca.pem"
    assert parsed["BrokerCaCert"] == "/certs/broker-ca.pem"
    assert parsed["AgentTlsVerify"] == "true" and parsed["BrokerTlsVerify"] == "true"
    assert parsed["AdminAddress"] == "0.0.0.0" and parsed["AdminPort"] == "9180"
    sg = parse_kv(cmsg.security_gateway_conf(p).decode())
    assert sg["AgentCaCert"] == "/certs/agent-ca.pem" and sg["AgentTlsVerify"] == "true"
    assert sg["AdminAddress"] == "0.0.0.0" and sg["AdminPort"] == "9172"
    # Without an identity the keys stay empty (the service then presents none).
    p = params(agent_ca_cert=None, agent_tls_verify=False)
    parsed = parse_kv(cmsg.config_properties(p, cmsg.validate(p, no_networks)).decode())
    assert (
        parsed["IdentityCert"] == "" and parsed["AgentCaCert"] == "" and parsed["AgentTlsVerify"] == "false"
    )


def test_identity_files_checked_and_key_hidden(tmp_path: Path) -> None:
    key = tls.rsa_key(3072, slot=0)
    cert_path = tls.write(tmp_path / "cm.pem", tls.pem(tls.certificate(key, "cm.example.test")))
    key_path = tls.write(tmp_path / "cm.key", tls.key_pem(key), 0o600)
    errors: list[str] = []
    planned = cmsg.identity_files(
        params(identity_cert=str(cert_path), identity_key=str(key_path)), str(tmp_path / "certs"), errors, []
    )
    assert errors == []
    assert {Path(p.path).name: p.mode for p in planned} == {"identity.pem": 0o644, "identity-key.pem": 0o600}
    assert next(p for p in planned if p.path.endswith("identity-key.pem")).hidden
    other = tls.write(tmp_path / "other.key", tls.key_pem(tls.rsa_key(3072, slot=1)), 0o600)
    errors = []
    assert (
        cmsg.identity_files(
            params(identity_cert=str(cert_path), identity_key=str(other)), str(tmp_path / "certs"), errors, []
        )
        == []
    )
    assert any(e.startswith("identity_cert:") and "does not match" in e for e in errors), errors
    errors = []
    cmsg.identity_files(
        params(identity_cert=str(tmp_path / "no.pem"), identity_key=str(key_path)), str(tmp_path), errors, []
    )
    assert any("identity_cert" in e and "does not exist" in e for e in errors)
    assert "identity_key" in cmsg.ARGUMENT_SPEC and cmsg.ARGUMENT_SPEC["identity_key"]["no_log"] is True
    assert ("identity_cert", "identity_key") in cmsg.REQUIRED_TOGETHER


def test_network_mode_and_prefix_checked() -> None:
    assert any("network_mode must be" in e for e in errors_of(params(network_mode="container:")))
    assert any("name_prefix" in e for e in errors_of(params(name_prefix="Bad Prefix")))
    cmsg.validate(params(network_mode="container:host1"), no_networks)


# ------------------------------------------------------------------ TLS material


def test_key_certificate_mismatch_refused(tmp_path: Path) -> None:
    cert = tls.certificate(tls.rsa_key(3072, slot=0), "cmsg.example.test")
    cert_path = tls.write(tmp_path / "cert.pem", tls.pem(cert))
    key_path = tls.write(tmp_path / "key.pem", tls.key_pem(tls.rsa_key(3072, slot=1)), 0o600)
    errors: list[str] = []
    planned, _info = dep.tls_files(
        params(self_signed=False, ssl_cert=str(cert_path), ssl_key=str(key_path)),
        str(tmp_path / "certs"),
        "cmsg.example.test",
        [],
        errors,
        [],
    )
    assert planned == []
    assert any("does not match certificate" in e for e in errors)


def test_small_rsa_key_refused(tmp_path: Path) -> None:
    key = tls.rsa_key(1024, slot=0)
    cert_path = tls.write(tmp_path / "cert.pem", tls.pem(tls.certificate(key)))
    key_path = tls.write(tmp_path / "key.pem", tls.key_pem(key), 0o600)
    errors: list[str] = []
    dep.tls_files(
        params(self_signed=False, ssl_cert=str(cert_path), ssl_key=str(key_path)),
        str(tmp_path / "certs"),
        "x.example.test",
        [],
        errors,
        [],
    )
    assert any("1024-bit RSA key" in e for e in errors)


def test_missing_certificate_file_refused(tmp_path: Path) -> None:
    errors: list[str] = []
    dep.tls_files(
        params(self_signed=False, ssl_cert=str(tmp_path / "nope.pem"), ssl_key=str(tmp_path / "nope.key")),
        str(tmp_path / "certs"),
        "x.example.test",
        [],
        errors,
        [],
    )
    assert any("does not exist on the target" in e for e in errors) and len(errors) == 2


def test_provided_material_copied_with_modes(tmp_path: Path) -> None:
    chain = tls.Chain()
    cert_path = tls.write(tmp_path / "cert.pem", tls.pem(chain.leaf))
    ca_path = tls.write(tmp_path / "ca.pem", tls.pem(chain.intermediate, chain.root))
    key_path = tls.write(tmp_path / "key.pem", tls.key_pem(chain.leaf_key), 0o600)
    errors: list[str] = []
    planned, info = dep.tls_files(
        params(self_signed=False, ssl_cert=str(cert_path), ssl_key=str(key_path), ca_cert=str(ca_path)),
        str(tmp_path / "certs"),
        "x.example.test",
        [],
        errors,
        [],
    )
    assert errors == []
    modes = {Path(p.path).name: p.mode for p in planned}
    assert modes == {"cert.pem": 0o644, "key.pem": 0o600, "ca.pem": 0o644}
    key_file = next(p for p in planned if p.path.endswith("key.pem"))
    assert key_file.hidden and b"PRIVATE KEY" not in repr(key_file.diff()).encode()
    assert info["source"] == "provided"


def test_self_signed_generated_once_then_kept(tmp_path: Path) -> None:
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    first, info = dep.tls_files(params(), str(certs_dir), "cmsg1.example.test", ["203.0.113.10"], [], [])
    assert info.get("generated") is True
    for planned in first:
        planned.apply()
    assert stat.S_IMODE((certs_dir / "key.pem").stat().st_mode) == 0o600
    second, info2 = dep.tls_files(params(), str(certs_dir), "other.example.test", [], [], [])
    assert "generated" not in info2
    assert [p.changed for p in second] == [False, False]
    cert = tls.x509.load_pem_x509_certificate((certs_dir / "cert.pem").read_bytes())
    assert cert.public_key().key_size == 3072
    assert "203.0.113.10" in [
        str(v)
        for v in cert.extensions.get_extension_for_class(
            tls.x509.SubjectAlternativeName
        ).value.get_values_for_type(tls.x509.IPAddress)
    ]


# ------------------------------------------------------------------ rendering


def architecture_keys(section: str) -> list[str]:
    """Keys of one configuration table of docs/architecture.md (``A / B`` and ``A, B`` rows name several keys)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    body = text.split(f"### {section}", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    keys: list[str] = []
    for line in body.splitlines():
        match = re.match(r"^\| ([A-Za-z][A-Za-z0-9 /,]*?) \|", line)
        if match and match.group(1) != "key":
            keys.extend(k.strip() for k in re.split(r"[/,]", match.group(1)))
    return keys


def test_config_properties_keys_are_documented() -> None:
    p = params(
        external_pcoip_ip=["203.0.113.10", "2001:db8::10"],
        enable_ipv6=True,
        host_address=["cmsg1.example.test", "10.0.0.5"],
        trusted_proxies=["10.0.9.0/24"],
        license_server_url="https://lic.example.test:7070/request",
        max_clients=800,
    )
    values = cmsg.validate(p, no_networks)
    parsed = parse_kv(cmsg.config_properties(p, values).decode())
    # The services read more keys than the module writes (limits with defaults); each written one is documented.
    assert set(parsed) <= set(architecture_keys("config.properties (CM)")), set(parsed) - set(
        architecture_keys("config.properties (CM)")
    )
    assert parsed["ExternalPcoipIp"] == "203.0.113.10,2001:db8::10"
    assert parsed["HostAddress"] == "cmsg1.example.test,10.0.0.5"
    assert parsed["TrustedProxies"] == "10.0.9.0/24"
    assert parsed["MaxClients"] == "800"
    assert parsed["SecurityGatewayEnabled"] == "true"
    assert parsed["BrokerUrl"] == "https://broker.example.test:8443"
    assert parsed["EnableIpv6"] == "true"


def test_security_gateway_conf_keys_and_max_connections() -> None:
    parsed = parse_kv(cmsg.security_gateway_conf(params(max_connections=1200, log_level="debug")).decode())
    documented = set(architecture_keys("SecurityGateway.conf (SG)"))
    assert set(parsed) <= documented, set(parsed) - documented
    assert parsed["MaxConnections"] == "1200"
    assert parsed["LogLevel"] == "debug"


def test_redirect_disabled_with_http_port_zero() -> None:
    p = params(http_port=0)
    parsed = parse_kv(cmsg.config_properties(p, cmsg.validate(p, no_networks)).decode())
    assert parsed["RedirectPort"] == "0"


def test_compose_file_is_valid_and_matches_the_containers() -> None:
    p = params(data_dir="/opt/gatehouse/cmsg")
    names = cmsg.Names("gatehouse")
    specs = cmsg.container_specs(p, names, {"cm": "gatehouse/cm:0.1.0", "sg": "gatehouse/sg:0.1.0"}, "node1")
    network = {
        "key": "cmdeployment",
        "name": names.network,
        "subnets": ["10.101.0.0/24"],
        "labels": {"a": "b"},
    }
    doc = yaml.safe_load(dep.render_compose(specs, network))
    assert set(doc["services"]) == {"cm", "sg"}
    cm = doc["services"]["cm"]
    assert cm["container_name"] == "gatehouse-cm"
    assert cm["ports"] == ["443:8443/tcp", "80:8080/tcp", "127.0.0.1:9180:9180/tcp"]
    assert cm["volumes"] == ["/opt/gatehouse/cmsg/data:/data:ro", "/opt/gatehouse/cmsg/certs:/certs:ro"]
    assert cm["labels"]["gatehouse.role"] == "cm" and cm["labels"]["gatehouse.host"] == "node1"
    assert doc["services"]["sg"]["ports"] == ["4172:4172/tcp", "4172:4172/udp", "127.0.0.1:9172:9172/tcp"]
    assert doc["networks"]["cmdeployment"]["ipam"]["config"] == [{"subnet": "10.101.0.0/24"}]
    assert "enable_ipv6" not in doc["networks"]["cmdeployment"]
    network["subnets"] = cmsg.bridge_subnets(params(enable_ipv6=True))
    doc = yaml.safe_load(dep.render_compose(specs, network))
    assert doc["networks"]["cmdeployment"]["enable_ipv6"] is True
    assert doc["networks"]["cmdeployment"]["ipam"]["config"] == [
        {"subnet": "10.101.0.0/24"},
        {"subnet": "fd00:10:101::/64"},
    ]


def test_compose_without_gateway_and_in_container_mode() -> None:
    p = params(enable_security_gateway=False, external_pcoip_ip=[], network_mode="container:host1")
    specs = cmsg.container_specs(p, cmsg.Names("gh"), {"cm": "gatehouse/cm:0.1.0"}, "host1")
    doc = yaml.safe_load(dep.render_compose(specs, None))
    assert list(doc["services"]) == ["cm"]
    assert doc["services"]["cm"]["network_mode"] == "container:host1"
    assert "ports" not in doc["services"]["cm"] and "networks" not in doc


def test_grant_secret_kept_and_masked(tmp_path: Path) -> None:
    env = tmp_path / "cmsg.env"
    assert cmsg.existing_secret(str(env)) is None
    secret = "A" * 43 + "="
    env.write_bytes(cmsg.cmsg_env(secret, "info"))
    assert cmsg.existing_secret(str(env)) == secret
    env.write_bytes(b"GATEHOUSE_GRANTSECRET=short\n")
    assert cmsg.existing_secret(str(env)) is None
    planned = files.PlannedFile(
        str(tmp_path / "new.env"),
        cmsg.cmsg_env(secret, "warn"),
        0o600,
        mask=files.mask_env_values({cmsg.SECRET_KEY}),
    )
    diff = planned.diff()
    assert secret not in repr(diff)
    assert "GATEHOUSE_GRANTSECRET=********" in diff["after"] and "GATEHOUSE_LOGLEVEL=warn" in diff["after"]


def test_collection_version_matches_galaxy() -> None:
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    assert ctr.COLLECTION_VERSION == galaxy["version"]
    assert cmsg.ARGUMENT_SPEC["image_tag"]["default"] == galaxy["version"]


def test_spec_hash_changes_with_inputs() -> None:
    spec = {"name": "x", "image": "gatehouse/cm:0.1.0"}
    base = ctr.spec_hash(spec, {"config": "a"})
    assert base == ctr.spec_hash(dict(spec), {"config": "a"})
    assert base != ctr.spec_hash(spec, {"config": "b"})
    assert base != ctr.spec_hash(dict(spec, image="gatehouse/cm:0.2.0"), {"config": "a"})


# ------------------------------------------------------------------ files


def test_planned_file_detects_content_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "f.conf"
    planned = files.PlannedFile(str(path), b"a=1\n", 0o640)
    assert planned.changed and planned.diff()["before"] == ""
    planned.apply()
    assert path.read_bytes() == b"a=1\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not files.PlannedFile(str(path), b"a=1\n", 0o640).changed
    path.chmod(0o644)
    again = files.PlannedFile(str(path), b"a=1\n", 0o640)
    assert again.changed and not again.content_changed
    again.apply()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert list(tmp_path.iterdir()) == [path], "temporary files left behind"


def test_remove_paths_keeps_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.properties").write_text("x")
    (tmp_path / "data" / "notes.txt").write_text("mine")
    removed, left = files.remove_paths(
        [str(tmp_path / "data" / "config.properties")], [str(tmp_path / "data"), str(tmp_path)], False
    )
    assert removed == [str(tmp_path / "data" / "config.properties")]
    assert str(tmp_path / "data" / "notes.txt") in left
    assert (tmp_path / "data" / "notes.txt").exists()


# ------------------------------------------------------------------ broker module (shares _deploy)

broker = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker")


def broker_params(**overrides) -> dict:
    result = {name: spec.get("default") for name, spec in broker.ARGUMENT_SPEC.items()}
    result.update(admin_token="a" * 30, self_signed=True, client_ca_cert="/opt/gatehouse/pki/ca.pem")
    result.update(overrides)
    return result


def test_broker_client_verification_on_by_default_and_needs_the_ca() -> None:
    assert broker.ARGUMENT_SPEC["client_tls_verify"]["default"] is True
    assert "agent_token" not in broker.ARGUMENT_SPEC
    assert broker.validate(broker_params()) == []
    with pytest.raises(dep.ValidationError) as info:
        broker.validate(broker_params(client_ca_cert=None))
    assert any("client_ca_cert is required with client_tls_verify=true" in e for e in info.value.errors)
    warnings = broker.validate(broker_params(client_ca_cert=None, client_tls_verify=False))
    assert len(warnings) == 1 and "client_tls_verify=false" in warnings[0]


def test_broker_properties_and_env() -> None:
    parsed = parse_kv(broker.broker_properties(broker_params()).decode())
    assert parsed["ClientCaCert"] == "/certs/client-ca.pem" and parsed["ClientTlsVerify"] == "true"
    assert "AgentToken" not in parsed
    off = parse_kv(
        broker.broker_properties(broker_params(client_ca_cert=None, client_tls_verify=False)).decode()
    )
    assert off["ClientCaCert"] == "" and off["ClientTlsVerify"] == "false"
    env = broker.broker_env(broker_params()).decode()
    assert "GATEHOUSE_ADMINTOKEN=" in env and "AGENTTOKEN" not in env


# ---------------------------------------------------------------- double-hop DMZ


def test_inner_gateway_lists_its_forwarders_and_others_keep_their_file() -> None:
    plain = cmsg.security_gateway_conf(params(), cmsg.validate(params(), no_networks))
    assert plain == cmsg.security_gateway_conf(params())  # nothing new unless set
    assert b"ProxyProtocolSources" not in plain and b"ForwardTo" not in plain
    p = params(proxy_protocol_sources=["10.10.0.11", "10.10.0.0/28"])
    parsed = parse_kv(cmsg.security_gateway_conf(p, cmsg.validate(p, no_networks)).decode())
    assert parsed["ProxyProtocolSources"] == "10.10.0.11/32,10.10.0.0/28"
    assert "GrantSecret" not in parsed and parsed["AgentCaCert"] == "/certs/agent-ca.pem"
    assert set(parsed) <= set(architecture_keys("SecurityGateway.conf (SG)"))
    errors = errors_of(params(proxy_protocol_sources=["not-a-net"]))
    assert errors == ["proxy_protocol_sources entry 'not-a-net' is not an address or CIDR (like 10.0.0.0/24)"]


def forwarder(**overrides) -> dict:
    """A forwarder as an operator writes it: forward_to, accept_policies and nothing for a CM."""
    base = {
        "forward_to": ["10.20.0.11:4172", "[2001:db8::12]:4172", "Inner3.Corp.Example:4173"],
        "broker_url": None,
        "external_pcoip_ip": [],
        "self_signed": False,
        "agent_ca_cert": None,
    }
    return params(**{**base, **overrides})


def test_a_forwarder_needs_no_broker_tls_material_or_agent_ca() -> None:
    values = cmsg.validate(forwarder(), no_networks)
    assert values["forward_to"] == ["10.20.0.11:4172", "[2001:db8::12]:4172", "inner3.corp.example:4173"]
    assert values["warnings"] == [] and values["management_urls"]["cm"] is None
    parsed = parse_kv(cmsg.security_gateway_conf(forwarder(), values).decode())
    assert parsed["ForwardTo"] == "10.20.0.11:4172,[2001:db8::12]:4172,inner3.corp.example:4173"
    for key in ("SslCert", "SslKey", "AgentCaCert", "AgentTlsVerify", "AgentUdpSourcePort", "GrantSecret"):
        assert key not in parsed
    assert set(parsed) <= set(architecture_keys("SecurityGateway.conf (SG)"))
    assert cmsg.cmsg_env(None, "info") == b"GATEHOUSE_LOGLEVEL=info\n"
    specs = cmsg.container_specs(forwarder(), cmsg.Names("gh"), {"cm": "cm:1", "sg": "sg:1"}, "dmz1")
    assert [s["service"] for s in specs] == ["sg"]
    # Material for a CM or for TLS is named as unused.
    values = cmsg.validate(forwarder(self_signed=True), no_networks)
    assert values["warnings"] and "self_signed is not used" in values["warnings"][0]


def test_a_forwarder_behind_a_vip_listens_on_the_vip_only() -> None:
    """UDP answers leave from the socket's address: on the VIP, not every address of the host (in
    the host's or a container's network namespace, which holds the VIP)."""
    assert (
        parse_kv(cmsg.security_gateway_conf(forwarder(), cmsg.validate(forwarder(), no_networks)).decode())[
            "ListenAddress"
        ]
        == "0.0.0.0"
    )
    for mode in ("host", "container:dmz-sg1"):
        behind_vip = forwarder(listen_address="203.0.113.20", network_mode=mode)
        parsed = parse_kv(
            cmsg.security_gateway_conf(behind_vip, cmsg.validate(behind_vip, no_networks)).decode()
        )
        assert parsed["ListenAddress"] == "203.0.113.20", mode
    assert errors_of(forwarder(listen_address="vip.example", network_mode="host")) == [
        "listen_address 'vip.example' must be an IP address (the forwarders' VIP)"
    ]
    assert errors_of(params(listen_address="203.0.113.20")) == [
        "listen_address is for a forwarding security gateway (forward_to) behind a VIP only"
    ]


def test_a_bridged_forwarder_refuses_listen_address_and_says_why() -> None:
    """In bridge mode the VIP is on the host, not in the container: ListenAddress=<VIP> could not be
    bound. The engine's DNAT of the published ports answers from the VIP anyway, so the module
    refuses the option (in validate, before anything changes) rather than deploy an SG that fails."""
    (error,) = errors_of(forwarder(listen_address="203.0.113.20"))  # network_mode: bridge, the default
    assert error.startswith("listen_address 203.0.113.20 cannot be used with network_mode=bridge")
    for why in (
        "not in the forwarder's container",
        "DNATs the published ports",
        "leave listen_address empty",
    ):
        assert why in error
    # Without it the bridged forwarder listens on every address of its container.
    values = cmsg.validate(forwarder(), no_networks)
    assert values["listen_address"] == ""
    assert parse_kv(cmsg.security_gateway_conf(forwarder(), values).decode())["ListenAddress"] == "0.0.0.0"


def test_a_gateway_still_needs_its_broker() -> None:
    errors = errors_of(params(broker_url=None))
    assert any("broker_url is required with state=present" in e for e in errors)


@pytest.mark.parametrize(
    "entry",
    [
        "10.20.0.11",
        "10.20.0.11:0",
        "10.20.0.11:99999",
        "2001:db8::12:4172",
        "[inner.example]:4172",
        "bad host:1",
    ],
)
def test_bad_forward_to_entries(entry: str) -> None:
    errors = errors_of(forwarder(forward_to=[entry]))
    assert any(f"forward_to entry {entry!r}" in e for e in errors), errors


def test_a_forwarder_is_a_security_gateway() -> None:
    errors = errors_of(forwarder(enable_security_gateway=False))
    assert any("needs enable_security_gateway=true" in e for e in errors)
    errors = errors_of(forwarder(forward_to=["10.20.0.11:4172", "10.20.0.11:4172"]))
    assert errors == ["forward_to lists 10.20.0.11:4172 twice"]
