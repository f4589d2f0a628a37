"""SG resident memory per relaying session with 5,000 sessions open at once.

An agent stand-in and an SG on loopback; each session is a real one: launch-session on the
agent, a grant for the SG, TLS to the SG, ``CONNECT <grant>``, one echoed message through the
relay, then idle with both TLS connections open. The figure is the SG's RSS growth divided by
the sessions, after a warm-up of 100 sessions (libraries, pools, caches). The reference is
HAProxy relaying the same number of sessions the same way (TLS in, TLS to the agent; the client
sends ``CONNECT <session-tag>`` itself). Both run alike: a container of their image on the host
network. Goal: no more memory per session than HAProxy.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid

import aiohttp

from bench.common import (
    HAPROXY_GLOBAL,
    Bench,
    Figure,
    container_pid,
    free_port,
    haproxy_pem,
    load_average,
    rss_kib,
    wait_port,
)
from gatehouse import protocol
from gatehouse.grant import GrantSealer, decode_secret


async def _launch(http: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    sid = str(uuid.uuid4())
    body = protocol.render("pcoip-agent", protocol.LaunchSession(sid, "127.0.0.1", "bench", "CORP"))
    async with http.post(url, data=body) as resp:
        msg = protocol.parse(await resp.read(), "pcoip-agent")
    assert isinstance(msg, protocol.LaunchSessionResp) and msg.session_info
    return sid, msg.session_info.session_tag


async def open_sessions(
    n: int,
    ctl: int,
    relay_port: int,
    agent_port: int,
    sealer: GrantSealer | None,
    payload: int,
    ctx: ssl.SSLContext,
) -> list[asyncio.StreamWriter]:
    url = f"https://127.0.0.1:{ctl}/pcoip-agent/xml"
    conns: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(50)
    connector = aiohttp.TCPConnector(ssl=ctx, limit=50)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> None:
            async with sem:
                sid, tag = await _launch(http, url)
                if sealer:  # via the SG: a grant; via HAProxy: the agent's session-tag itself
                    tag = sealer.mint(sid, "127.0.0.1", agent_port, tag, "127.0.0.1", ttl=60)
                reader, writer = await asyncio.open_connection("127.0.0.1", relay_port, ssl=ctx)
                writer.write(f"CONNECT {tag}\r\n".encode())
                answer = await reader.readline()
                if answer != b"200 OK\r\n":
                    raise RuntimeError(f"SG answered {answer!r}")
                data = b"p" * payload
                writer.write(data)
                if await reader.readexactly(payload) != data:
                    raise RuntimeError("echo mismatch")
                conns.append(writer)

        await asyncio.gather(*(one() for _ in range(n)))
    return conns


async def _per_session(
    bench: Bench,
    pid: int,
    n: int,
    ctl: int,
    port: int,
    agent_port: int,
    sealer: GrantSealer | None,
    payload: int,
) -> dict[str, float]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(bench.cm_identity.cert, bench.cm_identity.key)
    warm = await open_sessions(100, ctl, port, agent_port, sealer, payload, ctx)
    await asyncio.sleep(1)
    before = rss_kib(pid)
    started = time.monotonic()
    conns = await open_sessions(n, ctl, port, agent_port, sealer, payload, ctx)
    opened_in = time.monotonic() - started
    await asyncio.sleep(2)
    after = rss_kib(pid)
    for writer in warm + conns:
        writer.close()
    await asyncio.sleep(0.5)
    return {
        "per_session_kib": (after - before) / n,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "open_seconds": round(opened_in, 1),
        "sessions_per_second": round(n / opened_in),
    }


async def _measure(bench: Bench, n: int, payload: int) -> Figure:
    _agent, ctl, agent_port = bench.start_agent(Capacity=2 * n + 500)
    sealer = GrantSealer(decode_secret(bench.secret))
    load = {"before": load_average()}
    with bench.sg_container() as (sg_port, sg_pid):
        sg_m = await _per_session(bench, sg_pid, n, ctl, sg_port, agent_port, sealer, payload)
    load["between"] = load_average()
    hp_port = free_port()
    # A relayed session is one connection against maxconn; HAProxy sizes its descriptors to about
    # twice maxconn, which must stay within the container's open-files limit (as the SG's).
    config = HAPROXY_GLOBAL.replace("maxconn 8000", f"maxconn {n + 1000}") + (
        f"frontend relay\n    bind 127.0.0.1:{hp_port} ssl crt /cfg/srv.pem\n"
        f"    default_backend agent\nbackend agent\n"
        f"    server agent 127.0.0.1:{agent_port} ssl verify none maxconn {n + 1000}\n"
    )
    with bench.haproxy(config, {"srv.pem": haproxy_pem(bench.cert)}) as container:
        wait_port(hp_port, container)
        hp_m = await _per_session(bench, container_pid(container), n, ctl, hp_port, agent_port, None, payload)
    load["after"] = load_average()
    return Figure(
        f"SG RSS per relaying session ({n:,} sessions, {payload} B echoed each)",
        "KiB",
        sg_m["per_session_kib"],
        hp_m["per_session_kib"],
        "HAProxy relaying as many sessions the same way",
        "ratio <= 1.0",
        details={"sg": sg_m, "haproxy": hp_m, "sessions": n, "haproxy_sessions": n, "load_average": load},
    ).judge()


def run(bench: Bench) -> list[Figure]:
    n = 1000 if bench.quick else 5000
    return [asyncio.run(_measure(bench, n, 64))]
