"""SecurityGateway.conf and agent.properties validation."""

from __future__ import annotations

import pytest

from gatehouse.agent.settings import AgentSettings
from gatehouse.config import Config, ConfigError
from gatehouse.grant import generate_secret
from gatehouse.sg.settings import SgSettings


def test_sg_defaults_follow_the_architecture() -> None:
    secret = generate_secret()
    s = SgSettings.from_config(Config({}, {"GATEHOUSE_GRANTSECRET": secret}))
    assert (s.listen_address, s.port, s.agent_udp_source_port, s.max_connections) == (
        "0.0.0.0",
        4172,
        55000,
        5000,
    )
    assert (s.admin_address, s.admin_port, s.log_level) == ("0.0.0.0", 9172, "info")
    assert (s.ssl_cert, s.ssl_key) == ("/certs/cert.pem", "/certs/key.pem")
    assert secret not in repr(s)


def test_sg_env_overrides() -> None:
    env = {"GATEHOUSE_GRANTSECRET": generate_secret(), "GATEHOUSE_MAXCONNECTIONS": "2"}
    assert SgSettings.from_config(Config({"MaxConnections": "100"}, env)).max_connections == 2


@pytest.mark.parametrize(
    ("values", "env", "message"),
    [
        ({}, {}, "GrantSecret is required"),
        ({}, {"GATEHOUSE_GRANTSECRET": "not base64!"}, "GATEHOUSE_GRANTSECRET in cmsg.env"),
        ({}, {"GATEHOUSE_GRANTSECRET": "c2hvcnQ="}, "32 bytes"),
        ({"MaxConnections": "0"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "MaxConnections"),
        ({"Port": "70000"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "Port"),
        ({"LogLevel": "loud"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}, "LogLevel"),
    ],
)
def test_sg_refuses_bad_settings(values: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SgSettings.from_config(Config(values, env))


BASE = {"SslCert": "/c.pem", "SslKey": "/k.pem", "Hostname": "desk", "AdvertiseAddress": "10.0.0.5"}


def test_agent_report_url_and_defaults() -> None:
    s = AgentSettings.from_config(
        Config({**BASE, "BrokerUrl": "https://broker:8443/pcoip-broker/xml", "AgentToken": "t" * 20}, {})
    )
    assert s.report_url == "https://broker:8443/api/v1/agents/report"
    assert (s.control_port, s.session_port, s.report_interval, s.session_tag_ttl) == (60443, 4172, 10.0, 60.0)
    assert s.broker_tls_verify is True
    assert "t" * 20 not in repr(s)


def test_agent_without_broker_sends_no_reports() -> None:
    assert AgentSettings.from_config(Config(BASE, {})).report_url == ""


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"BrokerUrl": "broker:8443"}, "BrokerUrl"),
        ({"BrokerUrl": "https://broker"}, "AgentToken is required"),
        ({"Capacity": "0"}, "Capacity"),
        ({"SslCert": ""}, "SslCert"),
    ],
)
def test_agent_refuses_bad_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentSettings.from_config(Config({**BASE, **values}, {}))
