"""The CM's upstream client: the seed's error texts and agent URLs."""

from __future__ import annotations

import pytest

from gatehouse.cm.upstream import UpstreamError, agent_url


@pytest.mark.parametrize(
    ("upstream", "kind", "text"),
    [
        ("broker", "error", "Error occurred while communicating with broker"),
        ("broker", "timeout", "Timeout occurred while communicating with broker"),
        ("agent", "error", "Error occurred while communicating with agent"),
        ("agent", "timeout", "Timeout occurred while communicating with agent"),
    ],
)
def test_failures_carry_the_seeds_texts(upstream: str, kind: str, text: str) -> None:
    exc = UpstreamError(upstream, kind, "details for the log only")
    assert exc.text == text
    assert "details" not in exc.text


def test_agent_urls_bracket_ipv6() -> None:
    assert agent_url("10.0.0.5", 60443) == "https://10.0.0.5:60443/pcoip-agent/xml"
    assert agent_url("2001:db8::5", 60443) == "https://[2001:db8::5]:60443/pcoip-agent/xml"
