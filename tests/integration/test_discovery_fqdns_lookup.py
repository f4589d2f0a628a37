"""gatehouse.access.discovery_fqdns through ansible (query, lookup, errors)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
