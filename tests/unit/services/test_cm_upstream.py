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


async def test_pooled_connections_are_dropped_before_the_upstream_closes_them() -> None:
    # Reusing a connection the broker or agent is closing at that moment loses the POST.
    from gatehouse.agent.settings import HTTP_DEFAULTS as AGENT_HTTP
    from gatehouse.broker.settings import HTTP_DEFAULTS as BROKER_HTTP
    from gatehouse.cm.settings import CmSettings
    from gatehouse.cm.upstream import Upstream
    from gatehouse.web import HttpLimits

    upstream = Upstream(CmSettings(broker_url="https://broker.test/pcoip-broker/xml"))
    try:
        idle = upstream.http.connector._keepalive_timeout  # type: ignore[union-attr]
        for defaults in (BROKER_HTTP, AGENT_HTTP):
            assert idle <= HttpLimits(**defaults).keepalive_timeout / 2
    finally:
        await upstream.close()
