"""The connect-tag grant shared by the CM (mint) and the SG (open, replay cache)."""

from __future__ import annotations

import base64
import time

import pytest

from gatehouse.grant import (
    MAX_TTL,
    PREFIX,
    GrantError,
    GrantSealer,
    ReplayCache,
    decode_secret,
    generate_secret,
)

SID = "0b9c2a52-6a55-4c1f-8d7e-2f4a1c3b5d6e"
TAG = "agent-session-tag-0123456789abcdef"


@pytest.fixture
def sealer() -> GrantSealer:
    return GrantSealer(decode_secret(generate_secret()))


def mint(sealer: GrantSealer, **kw: object) -> str:
    args: dict[str, object] = {
        "session_id": SID,
        "agent_host": "10.0.0.5",
        "agent_port": 4172,
        "session_tag": TAG,
        "client_ip": "203.0.113.7",
    }
    args.update(kw)
    return sealer.mint(**args)  # type: ignore[arg-type]


def test_round_trip_returns_what_was_bound(sealer: GrantSealer) -> None:
    token = mint(sealer, ttl=30, now=1000.0)
    grant = sealer.open(token, "203.0.113.7", now=1001.0)
    assert (grant.session_id, grant.agent_host, grant.agent_port, grant.session_tag, grant.client_ip) == (
        SID,
        "10.0.0.5",
        4172,
        TAG,
        "203.0.113.7",
    )
    assert grant.expires == 1030.0


def test_token_is_url_safe_and_hides_the_session_tag(sealer: GrantSealer) -> None:
    token = mint(sealer)
    assert token.startswith(PREFIX)
    assert TAG not in token and SID not in token
    body = token[len(PREFIX) :]
    assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_every_flipped_byte_is_forged(sealer: GrantSealer) -> None:
    token = mint(sealer)
    body = token[len(PREFIX) :]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        forged = PREFIX + base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        with pytest.raises(GrantError) as err:
            sealer.open(forged, "203.0.113.7")
        assert err.value.reason == "forged"


def test_another_secret_cannot_open_it(sealer: GrantSealer) -> None:
    other = GrantSealer(decode_secret(generate_secret()))
    with pytest.raises(GrantError) as err:
        other.open(mint(sealer), "203.0.113.7")
    assert err.value.reason == "forged"


def test_expired(sealer: GrantSealer) -> None:
    token = mint(sealer, ttl=5, now=time.time() - 10)
    with pytest.raises(GrantError) as err:
        sealer.open(token, "203.0.113.7")
    assert err.value.reason == "expired"
    # Still valid just before its expiry.
    fresh = mint(sealer, ttl=5, now=1000.0)
    assert sealer.open(fresh, "203.0.113.7", now=1004.9).session_id == SID
    with pytest.raises(GrantError):
        sealer.open(fresh, "203.0.113.7", now=1005.1)


def test_wrong_client(sealer: GrantSealer) -> None:
    token = mint(sealer)
    for other in ("203.0.113.8", "::1", "not-an-ip"):
        with pytest.raises(GrantError) as err:
            sealer.open(token, other)
        assert err.value.reason == "wrong-client"


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 0.5, 3600])
def test_lifetime_outside_bounds_is_refused(sealer: GrantSealer, ttl: float) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        mint(sealer, ttl=ttl)


def test_sixty_seconds_is_allowed(sealer: GrantSealer) -> None:
    assert sealer.open(mint(sealer, ttl=MAX_TTL), "203.0.113.7").session_id == SID


@pytest.mark.parametrize(
    "token",
    ["", "g1.", "g2.AAAA", "g1.!!!notbase64!!!", "g1.AAAA", "CONNECT", "g1." + "A" * 2000],
)
def test_malformed(sealer: GrantSealer, token: str) -> None:
    with pytest.raises(GrantError) as err:
        sealer.open(token, "203.0.113.7")
    assert err.value.reason == "malformed"


def test_ipv4_mapped_ipv6_client_is_the_same_client(sealer: GrantSealer) -> None:
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; minted either way, it matches.
    assert sealer.open(mint(sealer), "::ffff:203.0.113.7").session_id == SID
    assert sealer.open(mint(sealer, client_ip="::ffff:203.0.113.7"), "203.0.113.7").session_id == SID
    v6 = mint(sealer, client_ip="2001:db8::1")
    assert sealer.open(v6, "2001:0db8:0:0::1").client_ip == "2001:db8::1"


def test_replay_cache_accepts_once(sealer: GrantSealer) -> None:
    cache = ReplayCache()
    token = mint(sealer)
    assert cache.accept(sealer.open(token, "203.0.113.7"))
    assert not cache.accept(sealer.open(token, "203.0.113.7"))
    # A second grant for the same session is a different grant.
    assert cache.accept(sealer.open(mint(sealer), "203.0.113.7"))


def test_replay_cache_prunes_expired_entries(sealer: GrantSealer) -> None:
    cache = ReplayCache()
    t0 = 1_000_000.0
    for _grant in range(20):
        assert cache.accept(sealer.open(mint(sealer, ttl=10, now=t0), "203.0.113.7", now=t0), now=t0)
    assert len(cache) == 20
    later = t0 + 60
    assert cache.accept(sealer.open(mint(sealer, ttl=10, now=later), "203.0.113.7", now=later), now=later)
    assert len(cache) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"short").decode(), "32 bytes"),
        ("", "32 bytes"),
    ],
)
def test_secret_decoding_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_secret(text)


def test_generated_secret_decodes_to_32_bytes() -> None:
    assert len(decode_secret(generate_secret())) == 32
    assert generate_secret() != generate_secret()
