"""Management Console DNS-based discovery order (module_utils._ops.discovery)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
discovery = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._ops.discovery"
)

SEED_DOMAIN = "sales.europe.companyname.com"
SEED_HOSTNAME = "hostmachine1.sales.europe.companyname.com"
# Attempts #1-#7 of the example in the Management Console manual.
SEED_ATTEMPTS = [
    "pcoip_mc1.sales.europe.companyname.com",
    "pcoip_mc1.europe.companyname.com",
    "pcoip_mc1.companyname.com",
    "pcoip_mc1.hostmachine1.sales.europe.companyname.com",
    "pcoip_mc1.sales.europe.companyname.com",
    "pcoip_mc1.europe.companyname.com",
    "pcoip_mc1.companyname.com",
]


def test_seed_example_exact_order() -> None:
    assert discovery.discovery_fqdns("pcoip_mc1", SEED_DOMAIN, SEED_HOSTNAME) == SEED_ATTEMPTS


def test_last_attempt_of_each_series_has_a_single_dot() -> None:
    attempts = discovery.discovery_fqdns("mc", "a.b.c.d.e", "h.x.y")
    assert attempts == ["mc.a.b.c.d.e", "mc.b.c.d.e", "mc.c.d.e", "mc.d.e", "mc.h.x.y", "mc.x.y"]
    domain_series, host_series = attempts[:4], attempts[4:]
    for series in (domain_series, host_series):
        assert series[-1].removeprefix("mc.").count(".") == 1


def test_empty_domain_gives_only_hostname_variations() -> None:
    assert discovery.discovery_fqdns("pcoip_mc1", "", SEED_HOSTNAME) == SEED_ATTEMPTS[3:]
    assert discovery.discovery_fqdns("pcoip_mc1", None, SEED_HOSTNAME) == SEED_ATTEMPTS[3:]


def test_empty_hostname_gives_only_domain_variations() -> None:
    assert discovery.discovery_fqdns("pcoip_mc1", SEED_DOMAIN, "  ") == SEED_ATTEMPTS[:3]


def test_trailing_dot_case_and_blanks_normalised() -> None:
    got = discovery.discovery_fqdns(
        " PCoIP_MC1 ", "Sales.Europe.CompanyName.com.", SEED_HOSTNAME.upper() + "."
    )
    assert got == SEED_ATTEMPTS


def test_single_label_names_give_no_attempt() -> None:
    assert discovery.discovery_fqdns("mc", "corp", "host1.corp.example") == [
        "mc.host1.corp.example",
        "mc.corp.example",
    ]
    with pytest.raises(discovery.DiscoveryError, match="no name to try"):
        discovery.discovery_fqdns("mc", "corp", "host1")


@pytest.mark.parametrize(
    ("prefix", "domain", "hostname", "message"),
    [
        ("", SEED_DOMAIN, SEED_HOSTNAME, "prefix must not be empty"),
        ("  ", SEED_DOMAIN, SEED_HOSTNAME, "prefix must not be empty"),
        ("pcoip mc", SEED_DOMAIN, "", "invalid label"),
        ("-mc", SEED_DOMAIN, "", "invalid label"),
        ("mc", "sales..example.com", "", "empty label"),
        ("mc", ".example.com", "", "empty label"),
        ("mc", "exa$mple.com", "", "invalid label"),
        ("mc", "a" * 64 + ".com", "", "invalid label"),
        ("mc", "", "", "both empty"),
        ("mc", ".".join(["abcdefghi"] * 26), "", "longer than 253"),
    ],
)
def test_bad_input_refused(prefix: str, domain: str, hostname: str, message: str) -> None:
    with pytest.raises(discovery.DiscoveryError, match=message):
        discovery.discovery_fqdns(prefix, domain, hostname)


def test_non_string_refused() -> None:
    with pytest.raises(discovery.DiscoveryError, match="must be a string"):
        discovery.discovery_fqdns("mc", 42, "")


def test_attempts_carry_number_dhcp_option_and_the_seeds_delays() -> None:
    attempts = discovery.discovery_attempts("pcoip_mc1", SEED_DOMAIN, SEED_HOSTNAME)
    assert [a["fqdn"] for a in attempts] == SEED_ATTEMPTS
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4, 5, 6, 7]
    assert [a["dhcp_option"] for a in attempts] == [15, 15, 15, 12, 12, 12, 12]
    # "<device delays for 5 minutes>" between attempt #3 and #4.
    assert [a["delay"] for a in attempts] == [0, 0, 0, 300, 0, 0, 0]
    assert {a["prefix"] for a in attempts} == {"pcoip_mc1"}


def test_a_lone_host_name_series_starts_without_delay() -> None:
    attempts = discovery.discovery_attempts("mc", "", "h1.site.example")
    assert [(a["attempt"], a["dhcp_option"], a["delay"]) for a in attempts] == [(1, 12, 0), (2, 12, 0)]


def test_resolve_answers_addresses_or_nothing() -> None:
    def getaddrinfo(host: str, *_args: object) -> list[tuple]:
        if host == "gone.example":
            raise OSError(-2, "Name or service not known")
        return [
            (2, 1, 6, "", ("10.0.0.9", 0)),
            (10, 1, 6, "", ("2001:db8::9", 0, 0, 0)),
            (2, 1, 6, "", ("10.0.0.9", 0)),
        ]

    assert discovery.resolve("mc.example", getaddrinfo) == ["10.0.0.9", "2001:db8::9"]
    assert discovery.resolve("gone.example", getaddrinfo) == []
