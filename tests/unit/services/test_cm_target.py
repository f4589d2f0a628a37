"""Targets the CM hands to clients: the SG with a grant (v4/v6) or the agent itself."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gatehouse import protocol as p
from gatehouse.cm.settings import CmSettings
from gatehouse.cm.target import GRANT_TTL, build_target, gateway_name
from gatehouse.grant import GrantError, GrantSealer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pki as test_pki

SECRET = bytes(range(32))
SID = "3f0c54b2-6c1e-4f4e-9a53-0d2f4f1b8a11"
AGENT = p.AgentInfo("10.20.0.5", "desk-5", 60443, 4172)
INFO = p.SessionInfo("10.20.0.5", 4172, SID, "tag-from-agent-0123456789", sni="desk-5.corp")


def settings(**kw: object) -> CmSettings:
    base = CmSettings(
        broker_url="https://broker/pcoip-broker/xml",
        external_pcoip_ip=("203.0.113.10",),
        grant_secret=SECRET,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_gateway_target_points_at_the_sg_with_a_grant_for_this_agent_and_client() -> None:
    sealer = GrantSealer(SECRET)
    target = build_target(settings(), sealer, SID, "198.51.100.7", AGENT, INFO, "cm.example.com")
    assert (target.ip_address, target.port, target.session_id) == ("203.0.113.10", 4172, SID)
    assert target.sni == "cm.example.com" and target.ipv6_address == ""
    assert "tag-from-agent" not in target.connect_tag  # sealed: the client never sees the agent's tag
    grant = GrantSealer(SECRET).open(target.connect_tag, "198.51.100.7")
    assert (grant.session_id, grant.agent_host, grant.agent_port) == (SID, "10.20.0.5", 4172)
    assert grant.session_tag == INFO.session_tag
    assert 0 < grant.expires - time.time() <= GRANT_TTL + 0.001  # expiry is rounded to milliseconds
    with pytest.raises(GrantError):
        GrantSealer(SECRET).open(target.connect_tag, "198.51.100.8")
    with pytest.raises(GrantError):
        GrantSealer(bytes(32)).open(target.connect_tag, "198.51.100.7")


def test_gateway_target_carries_the_ipv6_address_when_configured() -> None:
    cfg = settings(external_pcoip_ip=("203.0.113.10", "2001:db8::10"))
    target = build_target(cfg, GrantSealer(SECRET), SID, "198.51.100.7", AGENT, INFO)
    assert target.ip_address == "203.0.113.10"
    assert target.ipv6_address == "2001:db8::10"
    # v6 only: the v6 address is the address.
    v6only = settings(external_pcoip_ip=("2001:db8::10",))
    target = build_target(v6only, GrantSealer(SECRET), SID, "2001:db8:1::7", AGENT, INFO)
    assert target.ip_address == "2001:db8::10" and target.ipv6_address == "2001:db8::10"
    assert GrantSealer(SECRET).open(target.connect_tag, "2001:db8:1::7").agent_host == "10.20.0.5"


def test_pcoip_port_is_configurable() -> None:
    target = build_target(settings(pcoip_port=14172), GrantSealer(SECRET), SID, "192.0.2.1", AGENT, INFO)
    assert target.port == 14172


def test_direct_target_is_the_agent_with_its_session_tag() -> None:
    cfg = settings(enable_security_gateway=False, grant_secret=b"")
    target = build_target(cfg, None, SID, "198.51.100.7", AGENT, INFO, "cm.example.com")
    assert (target.ip_address, target.port) == ("10.20.0.5", 4172)
    assert target.connect_tag == INFO.session_tag
    assert target.sni == "desk-5.corp" and target.hostname == "desk-5"
    assert target.session_id == SID


def test_gateway_without_a_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="grant secret"):
        build_target(settings(), None, SID, "192.0.2.1", AGENT, INFO)


def test_gateway_name_prefers_the_host_address_fqdn(tmp_path: Path) -> None:
    files = test_pki.TestPKI(tmp_path / "pki").issue("gwname", ["gw.example.com", "10.0.0.1"])
    assert gateway_name(("10.0.0.1", "cm.example.com"), files.cert) == "cm.example.com"
    assert gateway_name(("10.0.0.1",), files.cert) == "gw.example.com"
    assert gateway_name((), tmp_path / "missing.pem") == ""
