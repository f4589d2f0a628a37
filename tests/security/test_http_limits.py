"""Slowloris against the broker's and an agent's HTTPS ports: the real processes, the shared limits.

The CM, the broker and the agent share one mechanism (``gatehouse.web``: RequestTimeout from
accept, MaxConnectionsPerSource at accept); tests/security/test_cm.py attacks the CM, this module
the other two, with a legitimate session (TCP and UDP echo, through the attacked desktop) during
and after. Attack traffic comes from 127.0.0.6x/7x, the stack's own traffic from 127.0.0.1-3.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pki as pkimod
import pytest
import slowhttp
import stack as hardened

from gatehouse import protocol as p
from gatehouse.config import parse_kv

REQUEST_TIMEOUT = 2
PER_SOURCE = 24
LIMITS: dict[str, object] = {"RequestTimeout": REQUEST_TIMEOUT, "MaxConnectionsPerSource": PER_SOURCE}


@pytest.fixture(scope="module")
def st(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    s = hardened.build(pki, Path(tmp_path_factory.mktemp("http-limits")), broker=LIMITS, agent=LIMITS)
    yield s
    s.stop()


def target(st: hardened.Stack, name: str) -> tuple[str, int, str, str]:
    """(host, port, request path, management URL) of the broker or desk-a's agent."""
    cfg = parse_kv(st.procs[name].config_path.read_text())
    if name == "broker":
        url = urlsplit(st.broker_url)
        return url.hostname or "", url.port or 0, p.PATH_BROKER, f"http://127.0.0.1:{cfg['AdminPort']}"
    address, control, _session_port = st.agents[name]
    return address, control, p.PATH_AGENT, f"http://{address}:{cfg['AdminPort']}"


async def session_ok(st: hardened.Stack) -> None:
    # desk-a: the session's launch goes to the attacked agent.
    hardened.assert_session_ok(await st.session(resource="desk-a", tcp_bytes=8192))


@pytest.mark.parametrize(("name", "base"), [("broker", 60), ("desk-a", 70)])
async def test_slowloris_is_cut_by_the_deadline_and_capped_per_source(
    st: hardened.Stack, name: str, base: int
) -> None:
    host, port, path, admin = target(st, name)
    ctx = st.client_ctx()
    before = await slowhttp.scrape(admin)
    started = time.monotonic()
    held: list[slowhttp.Conn] = []
    for i, mode in enumerate(slowhttp.MODES):
        for j in range(2):
            source = f"127.0.0.{base + i * 2 + j}"
            held += await asyncio.gather(
                *(slowhttp.open_slow(host, port, ctx, source, mode, path) for _n in range(PER_SOURCE))
            )
    # One more address asks for more than its share: the first PER_SOURCE are held, the rest reset.
    extra = [await slowhttp.try_open(host, port, f"127.0.0.{base + 6}") for _n in range(PER_SOURCE + 8)]
    capped = [c for c in extra[:PER_SOURCE] if c is not None]
    assert len(capped) == PER_SOURCE
    over = [c[0] for c in extra[PER_SOURCE:] if c is not None]
    assert all(await asyncio.gather(*(slowhttp.closed_within(r, 1.0) for r in over)))

    await session_ok(st)  # during: 7 x PER_SOURCE hostile connections are open

    closed = await asyncio.gather(
        *(slowhttp.closed_within(r, REQUEST_TIMEOUT + 3) for r, _w in held + capped)
    )
    elapsed = time.monotonic() - started
    assert all(closed), f"{closed.count(False)} slow connections to the {name} still open"
    assert elapsed < REQUEST_TIMEOUT + 8
    slowhttp.close_all([*held, *extra])
    await session_ok(st)  # after
    after = await slowhttp.scrape(admin)
    assert slowhttp.timeouts(after) - slowhttp.timeouts(before) >= len(held) + len(capped)
    per_source = "max_connections_per_source"
    assert slowhttp.refused(after, per_source) - slowhttp.refused(before, per_source) >= 8
    st.assert_no_secrets_logged()
