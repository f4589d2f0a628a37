"""gatehouse.access.discovery_fqdns through ansible (query, lookup, errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_adhoc

SEED_ATTEMPTS = [
    "pcoip_mc1.sales.europe.companyname.com",
    "pcoip_mc1.europe.companyname.com",
    "pcoip_mc1.companyname.com",
    "pcoip_mc1.hostmachine1.sales.europe.companyname.com",
    "pcoip_mc1.sales.europe.companyname.com",
    "pcoip_mc1.europe.companyname.com",
    "pcoip_mc1.companyname.com",
]


def test_query_returns_seed_attempts_in_order() -> None:
    expression = (
        "{{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1', domain='sales.europe.companyname.com', "
        "hostname='hostmachine1.sales.europe.companyname.com') }}"
    )
    run = run_adhoc("ansible.builtin.debug", {"msg": expression})
    assert not run.failed, run.result
    assert run.result["msg"] == SEED_ATTEMPTS


def test_two_prefixes_and_missing_domain() -> None:
    expression = (
        "{{ query('gatehouse.access.discovery_fqdns', 'mc_a', 'mc_b', hostname='h1.site.example.') }}"
    )
    run = run_adhoc("ansible.builtin.debug", {"msg": expression})
    assert run.result["msg"] == [
        "mc_a.h1.site.example",
        "mc_a.site.example",
        "mc_b.h1.site.example",
        "mc_b.site.example",
    ]


def test_bad_label_is_a_clear_error() -> None:
    expression = "{{ query('gatehouse.access.discovery_fqdns', 'pcoip mc', domain='example.com') }}"
    run = run_adhoc("ansible.builtin.debug", {"msg": expression})
    assert run.failed
    assert "discovery_fqdns: prefix 'pcoip mc' has an invalid label" in run.result["msg"]


def test_details_give_each_attempt_its_number_and_delay() -> None:
    expression = (
        "{{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1', domain='sales.europe.companyname.com', "
        "hostname='hostmachine1.sales.europe.companyname.com', details=true) }}"
    )
    run = run_adhoc("ansible.builtin.debug", {"msg": expression})
    assert not run.failed, run.result
    attempts = run.result["msg"]
    assert [a["fqdn"] for a in attempts] == SEED_ATTEMPTS
    assert [(a["attempt"], a["dhcp_option"], a["delay"]) for a in attempts] == [
        (1, 15, 0),
        (2, 15, 0),
        (3, 15, 0),
        (4, 12, 300),
        (5, 12, 0),
        (6, 12, 0),
        (7, 12, 0),
    ]
    assert not any("resolves" in a for a in attempts)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private /etc/hosts needs root (unshare --mount)")
def test_resolve_tells_which_names_resolve(tmp_path: Path) -> None:
    # The controller's real resolver (glibc, /etc/hosts first) answers, in a mount namespace whose
    # /etc/hosts adds two of the names; nothing leaves the machine.
    hosts = tmp_path / "hosts"
    hosts.write_text(
        Path("/etc/hosts").read_text()
        + "\n192.0.2.10 pcoip_mc1.companyname.com\n2001:db8::10 pcoip_mc1.europe.companyname.com\n"
    )
    private_hosts = [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount --bind "$0" /etc/hosts && exec "$@"',
        str(hosts),
    ]
    expression = (
        "{{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1', domain='sales.europe.companyname.com', "
        "hostname='hostmachine1.sales.europe.companyname.com', resolve=true) }}"
    )
    run = run_adhoc("ansible.builtin.debug", {"msg": expression}, prefix=private_hosts)
    assert not run.failed, run.result
    attempts = run.result["msg"]
    assert [a["fqdn"] for a in attempts] == SEED_ATTEMPTS
    hits = [(a["attempt"], a["addresses"]) for a in attempts if a["resolves"]]
    assert hits == [(2, ["2001:db8::10"]), (3, ["192.0.2.10"]), (6, ["2001:db8::10"]), (7, ["192.0.2.10"])]
    assert all(a["addresses"] == [] for a in attempts if not a["resolves"])
