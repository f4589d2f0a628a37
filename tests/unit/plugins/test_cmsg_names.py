"""One name per concept: a cmsg option keeps its name in the CM's settings.

``CM_OPTION_KEYS`` (module_utils._deploy.cmsg) is the one place that pairs an option with its
seed-style config key. For each pair, changing the option must change the CM settings field of the
same name, and no other paired field.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, parse_kv
from gatehouse.grant import generate_secret
from gatehouse.sg.settings import SgSettings

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")

# A second value for options that are neither bool nor int.
OTHER_VALUE = {
    "broker_url": "https://broker2.example.test:8443",
    "external_pcoip_ip": ["203.0.113.11"],
    "trusted_proxies": ["10.9.0.0/24"],
    "host_address": ["cmsg1.example.test"],
    "license_server_url": "https://licence.example.test:7070/request",
    "log_level": "debug",
    "site": "site2",
    "site_gateways": {"site2": "203.0.113.20:4172"},
    "workers": 3,
}
# Names that the concepts above had before; none may come back.
RETIRED = ("external_ipv4", "external_ipv6", "external_v4", "external_v6", "external_ips", "gateway_port")


def params(**overrides) -> dict:
    return importlib.import_module("collection_helpers").cmsg_params(
        **{"broker_ca_cert": "/opt/gatehouse/pki/ca.pem", **overrides}
    )


def settings_of(p: dict) -> CmSettings:
    values = cmsg.validate(p, lambda: [])
    text = cmsg.config_properties(p, values).decode()
    secret = {"GATEHOUSE_GRANTSECRET": generate_secret()}
    return CmSettings.from_config(Config(parse_kv(text), secret))


def other(name: str, value: object) -> object:
    if name == "workers":
        return OTHER_VALUE[name]  # not 1: 0 is the CPUs, which may be one
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return OTHER_VALUE[name]


def test_every_paired_key_is_written() -> None:
    written = parse_kv(cmsg.config_properties(params(), cmsg.validate(params(), lambda: [])).decode())
    when_set = {cmsg.CM_OPTION_KEYS[name] for name in cmsg.CM_KEYS_WHEN_SET}
    assert set(cmsg.CM_OPTION_KEYS.values()) - when_set <= set(written)
    assert not when_set & set(written)  # a single-site node's file is that of earlier releases
    p = params(**{name: OTHER_VALUE[name] for name in cmsg.CM_KEYS_WHEN_SET})
    assert when_set <= set(parse_kv(cmsg.config_properties(p, cmsg.validate(p, lambda: [])).decode()))


@pytest.mark.parametrize("option", sorted(cmsg.CM_OPTION_KEYS))
def test_option_reaches_the_settings_field_of_its_own_name(option: str) -> None:
    assert option in cmsg.ARGUMENT_SPEC, f"{option} is not a cmsg option"
    assert option in {f.name for f in fields(CmSettings)}, f"CmSettings has no field {option}"
    before = params()
    after = params(**{option: other(option, before[option])})
    a, b = settings_of(before), settings_of(after)
    changed = {f.name for f in fields(CmSettings) if getattr(a, f.name) != getattr(b, f.name)}
    assert changed & set(cmsg.CM_OPTION_KEYS) == {option}


@pytest.mark.parametrize("tree", ["plugins", "files/services/gatehouse", "roles", "playbooks", "docs"])
def test_retired_names_do_not_come_back(tree: str) -> None:
    found = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / tree).rglob("*"))
        if path.is_file() and path.suffix in (".py", ".yml", ".j2", ".md")
        for name in RETIRED
        if name in path.read_text(encoding="utf-8")
    ]
    assert found == []


# workers: a count no machine here gives as its CPUs (the default, 0, means those).
SG_VALUES = {"forward_to": ["10.20.0.11:4172"], "proxy_protocol_sources": ["10.10.0.11/32"], "workers": 63}


@pytest.mark.parametrize("option", sorted(cmsg.SG_OPTION_KEYS))
def test_sg_option_reaches_the_sg_settings_field_of_its_own_name(option: str) -> None:
    assert option in cmsg.ARGUMENT_SPEC, f"{option} is not a cmsg option"
    assert option in {f.name for f in fields(SgSettings)}, f"SgSettings has no field {option}"
    p = params(**{option: SG_VALUES[option]})
    text = cmsg.security_gateway_conf(p, cmsg.validate(p, lambda: [])).decode()
    env = {} if option == "forward_to" else {"GATEHOUSE_GRANTSECRET": generate_secret()}
    settings = SgSettings.from_config(Config(parse_kv(text), env))
    default = SgSettings.from_config(
        Config(
            parse_kv(cmsg.security_gateway_conf(params()).decode()),
            {"GATEHOUSE_GRANTSECRET": generate_secret()},
        )
    )
    assert getattr(settings, option) != getattr(default, option)
