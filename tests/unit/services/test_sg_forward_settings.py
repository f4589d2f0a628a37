"""SecurityGateway.conf of a forwarder (ForwardTo) and of an inner SG (ProxyProtocolSources)."""

from __future__ import annotations

import ipaddress

import pytest

from gatehouse.config import Config, ConfigError
from gatehouse.grant import generate_secret
from gatehouse.sg.forward import Inners
from gatehouse.sg.settings import SgSettings


def test_a_forwarder_needs_no_secret_key_or_agent_ca() -> None:
    s = SgSettings.from_config(
        Config({"ForwardTo": "10.20.0.5:4172, [2001:db8::7]:4172, inner.example:4173"}, {})
    )
    assert s.forwarding
    assert s.forward_to == (("10.20.0.5", 4172), ("2001:db8::7", 4172), ("inner.example", 4173))
    assert s.grant_secret == b""
    assert s.proxy_protocol_sources == ()


def test_a_forwarder_refuses_a_grant_secret() -> None:
    env = {"GATEHOUSE_GRANTSECRET": generate_secret()}
    with pytest.raises(ConfigError, match="a forwarder holds no grant secret"):
        SgSettings.from_config(Config({"ForwardTo": "10.20.0.5:4172"}, env))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.20.0.5", "not host:port"),
        ("10.20.0.5:0", "not host:port"),
        ("10.20.0.5:70000", "not host:port"),
        ("2001:db8::7:4172", "not host:port"),
        (":4172", "not host:port"),
        ("10.20.0.5:4172,10.20.0.5:4172", "listed twice"),
    ],
)
def test_bad_forward_to_entries_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SgSettings.from_config(Config({"ForwardTo": value}, {}))


def test_a_gateway_is_unchanged_by_default() -> None:
    s = SgSettings.from_config(
        Config({"AgentCaCert": "/ca.pem"}, {"GATEHOUSE_GRANTSECRET": generate_secret()})
    )
    assert not s.forwarding and s.forward_to == () and s.proxy_protocol_sources == ()
    assert not s.proxy_source("10.10.0.5")


def test_proxy_protocol_sources_of_an_inner_gateway() -> None:
    values = {"AgentCaCert": "/ca.pem", "ProxyProtocolSources": "10.10.0.0/24, 2001:db8:10::5"}
    s = SgSettings.from_config(Config(values, {"GATEHOUSE_GRANTSECRET": generate_secret()}))
    assert s.proxy_protocol_sources == (
        ipaddress.ip_network("10.10.0.0/24"),
        ipaddress.ip_network("2001:db8:10::5/128"),
    )
    assert s.proxy_source("10.10.0.5") and s.proxy_source("::ffff:10.10.0.9")
    assert s.proxy_source("2001:db8:10::5")
    assert not s.proxy_source("10.10.1.5") and not s.proxy_source("203.0.113.7") and not s.proxy_source("x")
    with pytest.raises(ConfigError, match="ProxyProtocolSources"):
        SgSettings.from_config(
            Config(
                {**values, "ProxyProtocolSources": "not-a-net"}, {"GATEHOUSE_GRANTSECRET": generate_secret()}
            )
        )


def test_inner_gateways_rotate_fail_over_and_stick_to_a_client() -> None:
    now = [100.0]
    a, b, c = ("10.20.0.1", 4172), ("10.20.0.2", 4172), ("10.20.0.3", 4172)
    inners = Inners((a, b, c), clock=lambda: now[0])
    assert inners.order("198.51.100.1") == [a, b, c]
    assert inners.order("198.51.100.2") == [b, c, a]
    inners.failed(c)
    assert inners.order("198.51.100.3") == [a, b, c]  # c is tried last while it is down
    assert inners.order("198.51.100.4") == [a, b, c]
    now[0] += 11  # FORWARD_RETRY_AFTER passed
    assert inners.order("198.51.100.5") == [b, c, a]
    inners.attach("198.51.100.1", c, ("10.20.0.3", 4172))
    inners.attach("198.51.100.1", c, ("10.20.0.3", 4172))
    assert inners.order("198.51.100.1")[0] == c  # sticky while a connection is open
    assert inners.address_of("198.51.100.1") == ("10.20.0.3", 4172)
    assert inners.detach("198.51.100.1") is False
    assert inners.detach("198.51.100.1") is True
    assert inners.address_of("198.51.100.1") is None
