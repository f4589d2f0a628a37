"""SecurityGateway.conf and agent.properties validation."""

from __future__ import annotations

import pytest

from gatehouse.agent.settings import AgentSettings
from gatehouse.config import Config, ConfigError
from gatehouse.grant import generate_secret
from gatehouse.sg.settings import SgSettings


def test_sg_defaults_follow_the_architecture() -> None:
    secret = generate_secret()
    s = SgSettings.from_config(
        Config({"AgentCaCert": "/certs/agent-ca.pem"}, {"GATEHOUSE_GRANTSECRET": secret})
    )
    assert (s.listen_address, s.port, s.agent_udp_source_port, s.max_connections) == (
        "0.0.0.0",
        4172,
        55000,
        5000,
    )
    assert s.agent_udp_ports == range(55000, 60000)  # one per session: 55000-59999
    assert (s.max_connections_per_source, s.request_timeout) == (32, 10.0)
    assert (s.agent_ca_cert, s.agent_tls_verify) == ("/certs/agent-ca.pem", True)
    assert (s.admin_address, s.admin_port, s.log_level) == ("127.0.0.1", 9172, "info")
    assert (s.ssl_cert, s.ssl_key) == ("/certs/cert.pem", "/certs/key.pem")
    assert secret not in repr(s)


def test_sg_agent_udp_port_range_fits_below_65536() -> None:
    env = {"GATEHOUSE_GRANTSECRET": generate_secret()}
    base = {"AgentTlsVerify": "false"}
    s = SgSettings.from_config(Config({**base, "AgentUdpSourcePort": "64000"}, env))
    assert s.agent_udp_ports == range(64000, 65536)
    s = SgSettings.from_config(Config({**base, "MaxConnections": "10", "AgentUdpPortCount": "3"}, env))
    assert s.agent_udp_ports == range(55000, 55003)
    with pytest.raises(ConfigError, match="AgentUdpPortCount"):
        SgSettings.from_config(
            Config({**base, "AgentUdpSourcePort": "65000", "AgentUdpPortCount": "600"}, env)
        )


def test_sg_agent_tls_verify_needs_the_ca() -> None:
    env = {"GATEHOUSE_GRANTSECRET": generate_secret()}
    with pytest.raises(ConfigError, match="AgentTlsVerify=true needs AgentCaCert"):
        SgSettings.from_config(Config({}, env))
    s = SgSettings.from_config(Config({"AgentTlsVerify": "false"}, env))
    assert (s.agent_tls_verify, s.agent_ca_cert) == (False, "")


def test_sg_env_overrides() -> None:
    env = {"GATEHOUSE_GRANTSECRET": generate_secret(), "GATEHOUSE_MAXCONNECTIONS": "2"}
    values = {"MaxConnections": "100", "AgentCaCert": "/ca.pem"}
    assert SgSettings.from_config(Config(values, env)).max_connections == 2


@pytest.mark.parametrize(
    ("values", "env", "message"),
    [
        ({}, {}, "GrantSecret is required"),
        ({}, {"GATEHOUSE_GRANTSECRET": "not base64!"}, "GATEHOUSE_GRANTSECRET in cmsg.env"),
        ({}, {"GATEHOUSE_GRANTSECRET": "c2hvcnQ="}, "32 bytes"),
        ({"MaxConnections": "0"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "MaxConnections"),
        ({"Port": "70000"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "Port"),
        ({"LogLevel": "loud"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "LogLevel"),
        (
            {"MaxConnectionsPerSource": "0"},
            {"GATEHOUSE_GRANTSECRET": generate_secret()},
            "MaxConnectionsPerSource",
        ),
        ({"RequestTimeout": "0"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "RequestTimeout"),
        ({"AgentTlsVerify": "maybe"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "AgentTlsVerify"),
    ],
)
def test_sg_refuses_bad_settings(values: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SgSettings.from_config(Config({"AgentCaCert": "/ca.pem", **values}, env))


BASE = {
    "SslCert": "/c.pem",
    "SslKey": "/k.pem",
    "ClientCaCert": "/ca.pem",
    "Hostname": "desk",
    "AdvertiseAddress": "10.0.0.5",
}


def test_agent_report_url_and_defaults() -> None:
    s = AgentSettings.from_config(Config({**BASE, "BrokerUrl": "https://broker:8443/pcoip-broker/xml"}, {}))
    assert s.report_url == "https://broker:8443/api/v1/agents/report"
    assert (s.control_port, s.session_port, s.report_interval, s.session_tag_ttl) == (60443, 4172, 10.0, 60.0)
    assert s.broker_tls_verify is True
    # Load reports are authenticated by the agent's own certificate, by default its SslCert.
    assert (s.identity_cert, s.identity_key) == ("/c.pem", "/k.pem")
    assert (s.client_ca_cert, s.client_tls_verify) == ("/ca.pem", True)
    assert not hasattr(s, "agent_token")


def test_agent_identity_and_client_verification_keys() -> None:
    s = AgentSettings.from_config(Config({**BASE, "IdentityCert": "/id.pem", "IdentityKey": "/id.key"}, {}))
    assert (s.identity_cert, s.identity_key) == ("/id.pem", "/id.key")
    combined = AgentSettings.from_config(Config({**BASE, "IdentityCert": "/both.pem"}, {}))
    assert (combined.identity_cert, combined.identity_key) == ("/both.pem", "/both.pem")
    lab = AgentSettings.from_config(Config({**BASE, "ClientCaCert": "", "ClientTlsVerify": "false"}, {}))
    assert lab.client_tls_verify is False


def test_agent_without_broker_sends_no_reports() -> None:
    assert AgentSettings.from_config(Config(BASE, {})).report_url == ""


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"BrokerUrl": "broker:8443"}, "BrokerUrl"),
        ({"ClientCaCert": ""}, "ClientCaCert is required while ClientTlsVerify is true"),
        ({"Capacity": "0"}, "Capacity"),
        ({"SslCert": ""}, "SslCert"),
    ],
)
def test_agent_refuses_bad_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentSettings.from_config(Config({**BASE, **values}, {}))
