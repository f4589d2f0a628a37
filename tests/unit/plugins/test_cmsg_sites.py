"""The cmsg module's multi-site options: site, site_gateways and grant_secret (docs/multisite.md)."""

from __future__ import annotations

import base64
import importlib
import sys
from pathlib import Path

import pytest

from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, parse_kv
from gatehouse.grant import generate_secret
from gatehouse.sg.settings import SgSettings
from gatehouse.sites import Gateway

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")


def params(**overrides) -> dict:
    return importlib.import_module("collection_helpers").cmsg_params(**overrides)


def rendered(p: dict) -> tuple[dict, dict]:
    values = cmsg.validate(p, lambda: [])
    return (
        parse_kv(cmsg.config_properties(p, values).decode()),
        parse_kv(cmsg.security_gateway_conf(p).decode()),
    )


def test_site_options_reach_the_cm_and_the_sg() -> None:
    p = params(
        site="site1",
        site_gateways={
            "site2": "198.51.100.100",
            "site1": "203.0.113.100:4172",
            "site3": "[2001:db8::3]:14172",
        },
    )
    cm, sg = rendered(p)
    assert cm["Site"] == "site1" and sg["Site"] == "site1"
    assert (
        cm["SiteGateways"] == "site1=203.0.113.100:4172,site2=198.51.100.100:4172,site3=[2001:db8::3]:14172"
    )
    env = {"GATEHOUSE_GRANTSECRET": generate_secret()}
    settings = CmSettings.from_config(Config(cm, env))
    assert settings.site == "site1"
    assert settings.site_gateway("site3") == Gateway("2001:db8::3", 14172)
    sg_settings = SgSettings.from_config(Config({**sg, "AgentCaCert": "/certs/agent-ca.pem"}, env))
    assert sg_settings.site == "site1"


def test_fqdn_gateways_are_lower_cased() -> None:
    cm, _sg = rendered(params(site_gateways={"dr": "SG.DR.Example.com.:4172"}))
    assert cm["SiteGateways"] == "dr=sg.dr.example.com:4172"


def test_without_sites_nothing_new_is_written() -> None:
    cm, sg = rendered(params())
    assert "Site" not in cm and "SiteGateways" not in cm and "Site" not in sg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"site": "Site1"}, "site 'Site1' is not a site name"),
        ({"site_gateways": {"Site2": "198.51.100.1"}}, "site_gateways: 'Site2' is not a site name"),
        ({"site_gateways": {"site2": "not a host"}}, "neither an IP address nor an FQDN"),
        ({"site_gateways": {"site2": "198.51.100.1:0"}}, "needs a port from 1 to 65535"),
        ({"site_gateways": {"site2": "[2001:db8::1]x"}}, "needs a port from 1 to 65535"),
        ({"grant_secret": "c2hvcnQ="}, "grant_secret must be 32 random bytes in base64"),
        ({"grant_secret": "not base64!"}, "grant_secret must be 32 random bytes in base64"),
    ],
)
def test_bad_site_options_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(dep.ValidationError) as info:
        cmsg.validate(params(**overrides), lambda: [])
    assert any(message in e for e in info.value.errors), info.value.errors


def test_the_grant_secret_option_wins_over_the_kept_one(tmp_path: Path) -> None:
    env = tmp_path / "cmsg.env"
    kept = base64.b64encode(b"k" * 32).decode()
    env.write_bytes(cmsg.cmsg_env(kept, "info"))
    shared = base64.b64encode(b"s" * 32).decode()
    cmsg.validate(params(grant_secret=shared), lambda: [])
    assert cmsg.grant_secret_for(params(grant_secret=shared), str(env)) == shared
    assert cmsg.grant_secret_for(params(), str(env)) == kept
    fresh = cmsg.grant_secret_for(params(), str(tmp_path / "missing.env"))
    assert len(base64.b64decode(fresh)) == 32 and fresh not in (kept, shared)


def test_the_grant_secret_is_never_logged() -> None:
    assert cmsg.ARGUMENT_SPEC["grant_secret"].get("no_log") is True
