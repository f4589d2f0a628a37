"""Primary and secondary connection URLs per user population (module_utils._ops.connection_urls and
the gatehouse.access.connection_urls lookup)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
urls = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._ops.connection_urls"
)
lookup = importlib.import_module("ansible_collections.gatehouse.access.plugins.lookup.connection_urls")
import yaml  # noqa: E402
from ansible import constants as C  # noqa: E402
from ansible.errors import AnsibleError  # noqa: E402

LOAD_NAME = "gatehouse.access.connection_urls"
# As the plugin loader does when it loads the lookup: its options come from DOCUMENTATION.
C.config.initialize_plugin_configuration_definitions(
    "lookup", LOAD_NAME, yaml.safe_load(lookup.DOCUMENTATION)["options"]
)

# The seed's multi-site scenario: two sites, each with two CMs behind a HALB virtual server.
SITES = {
    "site1": {"vip": "vip.site1.example.com", "cms": ["cm1.site1.example.com", "cm2.site1.example.com"]},
    "site2": {"vip": "203.0.113.20", "cms": ["10.2.0.11", "10.2.0.12"]},
}
POPULATIONS = {
    "lan-site1": ["site1:cms", "site2"],
    "lan-site2": ["site2:cms", "site1"],
    "wan": ["site1", "site2"],
}


def urls_of(population: str, populations: dict | None = None, sites: dict | None = None) -> list[str]:
    found = urls.connection_list(
        population, POPULATIONS if populations is None else populations, sites or SITES
    )
    return [c["url"] for c in found]


def test_the_seeds_three_populations() -> None:
    # LAN users of site 1: the local primary and secondary gateways, then site 2's HALB virtual server.
    assert urls_of("lan-site1") == [
        "https://cm1.site1.example.com",
        "https://cm2.site1.example.com",
        "https://203.0.113.20",
    ]
    assert urls_of("lan-site2") == ["https://10.2.0.11", "https://10.2.0.12", "https://vip.site1.example.com"]
    # WAN users: site 1's HALB virtual server first, then site 2's.
    assert urls_of("wan") == ["https://vip.site1.example.com", "https://203.0.113.20"]


def test_details_name_the_site_and_kind() -> None:
    found = urls.connection_list("lan-site1", POPULATIONS, SITES)
    assert [(c["site"], c["kind"]) for c in found] == [("site1", "cm"), ("site1", "cm"), ("site2", "vip")]


def test_ports_ipv6_and_literal_urls_are_normalised() -> None:
    sites = {
        "dr": {"vip": "2001:db8::10", "port": 8443, "cms": ["[2001:db8::11]"], "cm_port": 443},
        "hq": {"vip": "VIP.HQ.Example.com."},
    }
    populations = {
        "p": ["hq", "dr", "dr:cms", "https://Extra.Example.com:443/", "https://[2001:db8::99]:9443"]
    }
    assert urls_of("p", populations, sites) == [
        "https://vip.hq.example.com",
        "https://[2001:db8::10]:8443",
        "https://[2001:db8::11]",
        "https://extra.example.com",
        "https://[2001:db8::99]:9443",
    ]


def test_a_url_is_listed_once_at_its_first_place() -> None:
    sites = {"s1": {"vip": "10.0.0.1", "cms": ["10.0.0.1", "10.0.0.2"]}}
    assert urls_of("p", {"p": ["s1", "s1:cms", "s1", "https://10.0.0.2"]}, sites) == [
        "https://10.0.0.1",
        "https://10.0.0.2",
    ]


@pytest.mark.parametrize(
    ("population", "populations", "sites", "message"),
    [
        (
            "nobody",
            POPULATIONS,
            SITES,
            "unknown population 'nobody' \\(defined: lan-site1, lan-site2, wan\\)",
        ),
        ("p", {"p": []}, SITES, "must be a non-empty list"),
        ("p", {"p": "site1"}, SITES, "must be a non-empty list"),
        ("p", {"p": ["site9"]}, SITES, "'site9' names no site"),
        ("p", {"p": ["site1:nodes"]}, SITES, "only 'cms'"),
        ("p", {"p": [""]}, SITES, "non-empty string"),
        ("p", {"p": ["https://cm.example.com/path"]}, SITES, "no path"),
        ("p", {"p": ["https://cm.example.com:x"]}, SITES, "not https://host"),
        ("p", {"p": ["s1"]}, {"s1": {"cms": ["10.0.0.1"]}}, "site s1 has no vip"),
        ("p", {"p": ["s1:cms"]}, {"s1": {"vip": "10.0.0.1"}}, "site s1 has no cms"),
        ("p", {"p": ["s1"]}, {"s1": {}}, "give its HALB address"),
        ("p", {"p": ["s1"]}, {"s1": {"vip": "10.0.0.1", "halb": "x"}}, "unknown keys halb"),
        ("p", {"p": ["s1"]}, {"s1": {"vip": "bad_host"}}, "neither an IP address nor a DNS name"),
        ("p", {"p": ["s1"]}, {"s1": {"vip": "10.0.0.1", "port": 0}}, "port must be an integer"),
        ("p", {"p": ["s1"]}, {"s1": {"vip": "10.0.0.1", "port": True}}, "port must be an integer"),
        ("p", {"p": ["s1"]}, {"s1": {"vip": "10.0.0.1", "cms": "10.0.0.2"}}, "cms must be a list"),
        ("p", {"p": ["S1"]}, {"S1": {"vip": "10.0.0.1"}}, "a site name is 1 to 63 lower-case"),
        ("p", {"p": ["s1"]}, ["s1"], "sites must be a dictionary"),
        ("p", ["p"], SITES, "populations must be a dictionary"),
    ],
)
def test_bad_input_is_refused_with_what_is_wrong(
    population: str, populations: object, sites: object, message: str
) -> None:
    with pytest.raises(urls.ConnectionUrlsError, match=message):
        urls.connection_list(population, populations, sites)


# ---------------------------------------------------------------- the lookup plugin


def run_lookup(terms: list[str], variables: dict | None = None, **kwargs: object) -> list:
    plugin = lookup.LookupModule()
    plugin._load_name = LOAD_NAME
    return plugin.run(terms, variables=variables or {}, **kwargs)


def test_lookup_returns_the_urls_of_each_population_in_turn() -> None:
    found = run_lookup(["wan", "lan-site2"], sites=SITES, populations=POPULATIONS)
    assert found == urls_of("wan") + urls_of("lan-site2")


def test_lookup_reads_the_inventory_variables() -> None:
    variables = {"gatehouse_sites": SITES, "gatehouse_populations": POPULATIONS}
    assert run_lookup(["lan-site1"], variables) == urls_of("lan-site1")


def test_lookup_details() -> None:
    found = run_lookup(["wan"], sites=SITES, populations=POPULATIONS, details=True)
    assert found == [
        {
            "url": "https://vip.site1.example.com",
            "site": "site1",
            "kind": "vip",
            "population": "wan",
            "order": 1,
        },
        {"url": "https://203.0.113.20", "site": "site2", "kind": "vip", "population": "wan", "order": 2},
    ]


def test_lookup_errors_are_ansible_errors() -> None:
    with pytest.raises(AnsibleError, match="connection_urls: unknown population 'lan'"):
        run_lookup(["lan"], sites=SITES, populations=POPULATIONS)
    with pytest.raises(AnsibleError, match="at least one population"):
        run_lookup([], sites=SITES, populations=POPULATIONS)
