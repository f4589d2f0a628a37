"""The client address the CM binds grants to: X-Forwarded-For only from the HALB's networks."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp.test_utils import make_mocked_request

from gatehouse.web import client_ip

HALB = (ipaddress.ip_network("10.101.0.0/24"),)


def request(peer: str, xff: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    return make_mocked_request("POST", "/pcoip-broker/xml", headers=headers).clone(remote=peer)


def test_peer_address_without_trusted_proxies() -> None:
    assert client_ip(request("198.51.100.7", "203.0.113.9")) == "198.51.100.7"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_ip(request("198.51.100.7", "203.0.113.9"), HALB) == "198.51.100.7"


def test_forwarded_for_from_the_halb_gives_the_client() -> None:
    assert client_ip(request("10.101.0.5", "203.0.113.9"), HALB) == "203.0.113.9"


def test_forged_leftmost_hops_are_skipped() -> None:
    # The client prepended a fake hop; the HALB appended the real client address.
    assert client_ip(request("10.101.0.5", "192.0.2.66, 203.0.113.9"), HALB) == "203.0.113.9"
    # Our own proxies on the right are skipped.
    assert client_ip(request("10.101.0.5", "203.0.113.9, 10.101.0.6"), HALB) == "203.0.113.9"


@pytest.mark.parametrize("xff", ["", "not-an-ip"])
def test_missing_or_bad_forwarded_for_falls_back_to_the_peer(xff: str) -> None:
    assert client_ip(request("10.101.0.5", xff), HALB) == "10.101.0.5"
