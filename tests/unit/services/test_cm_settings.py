"""CM configuration: required keys, the broker URL, external addresses and the grant secret; the
worker tags, the steering function and the shared per-source counts of Workers > 1."""

from __future__ import annotations

import ipaddress
import os
from collections import Counter

import pytest

from gatehouse import protocol as p
from gatehouse.cm.__main__ import worker_for_port
from gatehouse.cm.invitations import InvitationBook, owner_of_code
from gatehouse.cm.sessions import SessionTable, owner_of_cookie
from gatehouse.cm.settings import CmSettings, broker_endpoint, split_external_pcoip_ip
from gatehouse.config import MAX_WORKERS, Config, ConfigError
from gatehouse.grant import generate_secret
from gatehouse.shared import SharedCounters, WorkerSourceSlots


def load(values: dict[str, str], environ: dict[str, str] | None = None) -> CmSettings:
    return CmSettings.from_config(Config(values, environ or {}))


def test_defaults_follow_the_seed_sizing() -> None:
    s = load({"BrokerUrl": "https://broker:8443", "SecurityGatewayEnabled": "false"})
    assert (s.max_concurrent_establishments, s.max_clients) == (40, 400)
    assert (s.listen_port, s.redirect_port, s.pcoip_port) == (8443, 8080, 4172)
    assert s.broker_url == "https://broker:8443/pcoip-broker/xml"
    assert s.broker_tls_verify and s.agent_tls_verify
    assert (s.identity_cert, s.identity_key) == ("", "")


def test_hardening_defaults() -> None:
    s = load({"BrokerUrl": "https://broker:8443", "SecurityGatewayEnabled": "false"})
    assert (s.pre_auth_timeout, s.max_pre_auth_sessions) == (60.0, 400)
    assert s.max_pre_auth_sessions_per_source == 16
    assert (s.session_max_lifetime, s.max_auth_attempts) == (36000.0, 5)
    assert s.security_gateway_health_url == ""
    h = s.http
    assert (h.request_timeout, h.keepalive_timeout) == (10.0, 75.0)
    assert (h.max_connections, h.max_connections_per_source) == (4096, 64)
    assert (h.admin_address, h.admin_port) == ("127.0.0.1", 9180)


def test_hardening_keys_are_read() -> None:
    s = load(
        {
            "BrokerUrl": "https://b",
            "SecurityGatewayEnabled": "false",
            "PreAuthTimeout": "5",
            "MaxPreAuthSessions": "7",
            "MaxPreAuthSessionsPerSource": "2",
            "SessionMaxLifetime": "100",
            "MaxAuthAttempts": "3",
            "SecurityGatewayHealthUrl": "http://127.0.0.1:9172/health",
            "IdentityCert": "/c.pem",
            "IdentityKey": "/c.key",
            "AgentTlsVerify": "false",
            "MaxConnections": "10",
            "AdminPort": "0",
            "TrustedProxies": "10.0.0.0/24",
        }
    )
    assert (s.pre_auth_timeout, s.max_pre_auth_sessions, s.max_pre_auth_sessions_per_source) == (5.0, 7, 2)
    assert (s.session_max_lifetime, s.max_auth_attempts) == (100.0, 3)
    assert s.security_gateway_health_url == "http://127.0.0.1:9172/health"
    assert (s.identity_cert, s.identity_key, s.agent_tls_verify) == ("/c.pem", "/c.key", False)
    assert (s.http.max_connections, s.http.admin_port) == (10, 0)
    assert s.http.trusted_proxies == s.trusted_proxies
    with pytest.raises(ConfigError, match="IdentityKey"):
        load({"BrokerUrl": "https://b", "SecurityGatewayEnabled": "false", "IdentityCert": "/c.pem"})
    with pytest.raises(ConfigError, match="SecurityGatewayHealthUrl"):
        load({"BrokerUrl": "https://b", "SecurityGatewayEnabled": "false", "SecurityGatewayHealthUrl": "x:1"})


def test_gateway_needs_an_external_address_and_a_secret() -> None:
    with pytest.raises(ConfigError, match="ExternalPcoipIp"):
        load({"BrokerUrl": "https://b"})
    with pytest.raises(ConfigError, match="GATEHOUSE_GRANTSECRET"):
        load({"BrokerUrl": "https://b", "ExternalPcoipIp": "203.0.113.1"})
    with pytest.raises(ConfigError, match="base64"):
        load({"BrokerUrl": "https://b", "ExternalPcoipIp": "203.0.113.1"}, {"GATEHOUSE_GRANTSECRET": "%%%"})
    secret = generate_secret()
    s = load({"BrokerUrl": "https://b", "ExternalPcoipIp": "203.0.113.1"}, {"GATEHOUSE_GRANTSECRET": secret})
    assert len(s.grant_secret) == 32
    assert secret not in repr(s)


def test_limits_and_trusted_proxies_are_configurable() -> None:
    s = load(
        {
            "BrokerUrl": "https://b",
            "SecurityGatewayEnabled": "false",
            "MaxConcurrentEstablishments": "2",
            "MaxClients": "1",
            "TrustedProxies": "10.0.0.0/24, fd00::/64",
        },
        {"GATEHOUSE_MAXCLIENTS": "3"},
    )
    assert (s.max_concurrent_establishments, s.max_clients) == (2, 3)
    assert s.trusted_proxies == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))
    with pytest.raises(ConfigError, match="MaxClients"):
        load({"BrokerUrl": "https://b", "SecurityGatewayEnabled": "false", "MaxClients": "0"})


@pytest.mark.parametrize("url", ["http://broker", "broker:443", "https://", "https://b:99999"])
def test_broker_url_must_be_https(url: str) -> None:
    with pytest.raises(ConfigError, match="BrokerUrl"):
        broker_endpoint(url)


def test_broker_url_keeps_an_explicit_path() -> None:
    assert broker_endpoint("https://b:1/custom/xml") == "https://b:1/custom/xml"
    assert broker_endpoint("https://[::1]:8443/") == "https://[::1]:8443/pcoip-broker/xml"


def test_external_ips_hold_at_most_one_per_family() -> None:
    assert split_external_pcoip_ip(["203.0.113.1", "2001:db8::1"]) == ("203.0.113.1", "2001:db8::1")
    assert split_external_pcoip_ip(["2001:db8::1"]) == ("2001:db8::1",)
    assert split_external_pcoip_ip(["2001:db8::1", "203.0.113.1"]) == ("203.0.113.1", "2001:db8::1")
    with pytest.raises(ConfigError, match="more than one IPv4"):
        split_external_pcoip_ip(["203.0.113.1", "203.0.113.2"])
    with pytest.raises(ConfigError, match="not an IP"):
        split_external_pcoip_ip(["gw.example.com"])


def test_workers_default_to_the_cpus_and_are_bounded() -> None:
    base = {"BrokerUrl": "https://broker:8443", "SecurityGatewayEnabled": "false"}
    assert load(base).workers == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert load({**base, "Workers": "3"}).workers == 3
    for bad in ("-1", str(MAX_WORKERS + 1), "two"):
        with pytest.raises(ConfigError, match="Workers"):
            load({**base, "Workers": bad})


def test_the_worker_hang_timeout_is_off_or_a_few_seconds_at_least() -> None:
    base = {"BrokerUrl": "https://broker:8443", "SecurityGatewayEnabled": "false"}
    assert load(base).worker_hang_timeout == 30.0
    assert load({**base, "WorkerHangTimeout": "0"}).worker_hang_timeout == 0.0
    assert load({**base, "WorkerHangTimeout": "4.5"}).worker_hang_timeout == 4.5
    for bad in ("2", "-1", "3601", "nan", "soon"):
        with pytest.raises(ConfigError, match="WorkerHangTimeout"):
            load({**base, "WorkerHangTimeout": bad})


def test_cookies_and_codes_name_their_worker() -> None:
    table = SessionTable(10, 60.0, tag=".1")
    session = table.create("192.0.2.1")
    assert owner_of_cookie(session.cookie) == 1
    cookie = table.authenticated(session)
    assert cookie is not None and owner_of_cookie(cookie) == 1
    assert owner_of_cookie(SessionTable(10, 60.0).create("192.0.2.1").cookie) is None  # one process
    for forged in ("", "abc", "abc.", "abc.x", "abc.123", "abc.-1"):
        assert owner_of_cookie(forged) is None, forged
    book = InvitationBook(60.0, 5, tag="-1")
    code = book.create(session, p.AgentInfo("192.0.2.9"), "agent-session")
    assert owner_of_code(code) == 1
    # The tag keeps the code within the wire's rule for codes.
    wire = p.parse(p.render("pcoip-client", p.RedeemInvitation(code)), "pcoip-client")
    assert isinstance(wire, p.RedeemInvitation) and wire.invitation_code == code
    assert owner_of_code(InvitationBook(60.0, 5).create(session, p.AgentInfo("192.0.2.9"), "s")) is None


def test_the_workers_share_the_ports_linux_gives_connect() -> None:
    """Linux hands out even ephemeral ports to connect(): the steering folds the port's bits, so
    a HALB's or docker-proxy's connections still spread over every worker."""
    for workers in (2, 3, 4):
        counts = Counter(worker_for_port(port, workers) for port in range(32768, 61000, 2))
        assert set(counts) == set(range(workers))
        assert max(counts.values()) < 1.2 * min(counts.values()), counts


def test_a_per_source_cap_holds_across_workers_and_frees_with_a_dead_worker() -> None:
    """The shared source tables the CM's workers keep MaxConnectionsPerSource and
    MaxPreAuthSessionsPerSource in (gatehouse.shared)."""
    shared = SharedCounters("test", 2, ("connections",), sources=(("per-source", 256),))
    try:
        w0, w1 = (WorkerSourceSlots(shared, "per-source", worker) for worker in (0, 1))
        assert [w0.take("192.0.2.1", 3), w1.take("192.0.2.1", 3), w1.take("192.0.2.1", 3)] == [True] * 3
        assert not w0.take("192.0.2.1", 3) and not w1.take("192.0.2.1", 3)  # the sum is the cap
        assert w0.take("192.0.2.2", 3)  # another source has its own
        w0.give("192.0.2.1")
        assert w1.take("192.0.2.1", 3) and not w0.take("192.0.2.1", 3)
        shared.reset_worker(1)  # worker 1 died: its three of 192.0.2.1 went with it
        assert [w0.take("192.0.2.1", 3) for _n in range(4)] == [True, True, True, False]
    finally:
        shared.close()
    # A table whose every entry is taken refuses a new source rather than count it nowhere.
    full = SharedCounters("test", 1, (), sources=(("per-source", 4),))
    try:
        one = WorkerSourceSlots(full, "per-source", 0)
        assert all(one.take(f"192.0.2.{n}", 1) for n in range(4))
        assert not one.take("192.0.2.99", 1)
        one.give("192.0.2.0")
        assert one.take("192.0.2.99", 1)
    finally:
        full.close()
