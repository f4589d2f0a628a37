"""Tenants (docs/tenants.md): the tenants file, its settings on CM and SG, and per-tenant grants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, ConfigError
from gatehouse.grant import GrantError, GrantSealer, decode_secret, generate_secret
from gatehouse.sg.settings import SgSettings
from gatehouse.tenants import ServerNames, Tenants, TenantsError, parse

SECRET = generate_secret()
A = {"name": "a", "host_names": ["Desktops.A.example."], "broker_url": "https://broker-a:8443"}
B = {
    "name": "b",
    "host_names": ["b.example", "vdi.b.example"],
    "broker_url": "https://broker-b:443/custom",
    "broker_ca_cert": "/certs/b-ca.pem",
    "agent_networks": ["10.2.0.0/16", "fd00:b::/64"],
}


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def cm(values: dict[str, str]) -> CmSettings:
    return CmSettings.from_config(Config({"SecurityGatewayEnabled": "false", **values}, {}))


def test_without_tenants_file_the_cm_is_as_before() -> None:
    s = cm({"BrokerUrl": "https://broker:8443"})
    assert (s.tenants_file, s.tenants) == ("", Tenants())
    assert not s.tenants
    with pytest.raises(ConfigError, match="BrokerUrl is required"):
        cm({})


def test_cm_reads_the_tenants_file(tmp_path: Path) -> None:
    s = cm({"TenantsFile": write(tmp_path, [A, B])})
    assert s.broker_url == ""  # not needed: every client belongs to a tenant
    a, b = s.tenants.tenants
    assert a.host_names == ("desktops.a.example",)
    assert a.broker_url == "https://broker-a:8443/pcoip-broker/xml"
    assert b.broker_url == "https://broker-b:443/custom"
    assert b.broker_ca_cert == "/certs/b-ca.pem"
    assert s.tenants.by_host("DESKTOPS.a.example.") is a
    assert s.tenants.by_host("vdi.b.example") is b
    assert s.tenants.by_host("c.example") is None and s.tenants.by_host(None) is None
    assert b.owns_agent("10.2.3.4") and b.owns_agent("fd00:b::5") and not b.owns_agent("10.3.0.1")
    assert a.owns_agent("192.0.2.1")  # no agent_networks: the tenant's broker decides


def test_sg_needs_no_broker_url(tmp_path: Path) -> None:
    path = write(tmp_path, [{"name": "a", "host_names": ["a.example"]}])
    s = SgSettings.from_config(
        Config({"TenantsFile": path, "AgentTlsVerify": "false"}, {"GATEHOUSE_GRANTSECRET": SECRET})
    )
    assert s.tenants.by_host("a.example") is not None
    with pytest.raises(ConfigError, match="broker_url"):
        cm({"TenantsFile": path})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a"}, "JSON list"),
        ([{**A, "name": "A_1"}], "name must be"),
        ([A, {**B, "name": "a"}], "listed twice"),
        ([A, {**B, "host_names": ["desktops.a.example"]}], "already tenant a's"),
        ([{**A, "host_names": []}], "non-empty list"),
        ([{**A, "host_names": ["localhost"]}], "not a fully qualified host name"),
        ([{**A, "agent_networks": ["10.0.0.0/33"]}], "not a CIDR"),
        ([{**A, "broker": "x"}], "unknown key"),
    ],
)
def test_bad_tenants_are_refused(data: object, message: str) -> None:
    with pytest.raises(TenantsError, match=message):
        parse(data, need_broker=True)


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TenantsFile: cannot read"):
        cm({"TenantsFile": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("[", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        cm({"TenantsFile": str(bad)})
    with pytest.raises(ConfigError, match="tenant a: broker_url must be an https"):
        cm({"TenantsFile": write(tmp_path, [{**A, "broker_url": "http://broker-a"}])})


def test_a_forwarder_takes_no_tenants(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="forwarder"):
        SgSettings.from_config(
            Config({"ForwardTo": "10.0.0.1:4172", "TenantsFile": write(tmp_path, [A])}, {})
        )


# ---------------------------------------------------------------- grants


def test_a_tenants_grant_opens_only_under_its_tenant() -> None:
    secret = decode_secret(SECRET)
    a, b, none = GrantSealer(secret, tenant="a"), GrantSealer(secret, tenant="b"), GrantSealer(secret)
    token = a.mint("s" * 36, "10.1.0.5", 4172, "tag", "192.0.2.7")
    assert token.startswith("g1t.a.")
    assert a.open(token, "192.0.2.7").tenant == "a"
    for other in (b, none):
        with pytest.raises(GrantError, match="wrong-tenant"):
            other.open(token, "192.0.2.7")
    with pytest.raises(GrantError, match="wrong-tenant"):
        a.open(none.mint("s" * 36, "10.1.0.5", 4172, "tag", "192.0.2.7"), "192.0.2.7")
    # Relabelled with b's name, a's grant fails authentication under b's key.
    with pytest.raises(GrantError, match="forged"):
        b.open("g1t.b." + token[len("g1t.a.") :], "192.0.2.7")


def test_tenantless_grants_keep_their_format() -> None:
    sealer = GrantSealer(decode_secret(SECRET))
    token = sealer.mint("s" * 36, "10.1.0.5", 4172, "tag", "192.0.2.7")
    assert token.startswith("g1.") and sealer.open(token, "192.0.2.7").tenant == ""


def test_a_tenants_own_certificate_needs_both_files_and_must_load(tmp_path: Path) -> None:
    with pytest.raises(TenantsError, match="ssl_cert and ssl_key go together"):
        parse([{**A, "ssl_cert": "/certs/a.pem"}], need_broker=True)
    missing = parse(
        [{**A, "ssl_cert": str(tmp_path / "a.pem"), "ssl_key": str(tmp_path / "a.key")}], need_broker=True
    )
    with pytest.raises(TenantsError, match="tenant a: ssl_cert"):
        ServerNames("cm").contexts_for(missing)
    assert ServerNames("cm").contexts_for(parse([A], need_broker=True)) == {}
