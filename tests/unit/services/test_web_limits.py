"""HttpLimits as enforced by web.run_sites: caps, request deadline, TLS, keep-alive, management listener."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gatehouse import tls
from gatehouse import web as gweb
from gatehouse.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pki as pkimod


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pkimod.TestPKI:
    return pkimod.TestPKI(tmp_path_factory.mktemp("pki"))


def test_from_config_defaults_and_overrides() -> None:
    limits = gweb.HttpLimits.from_config(Config({}), max_connections=4096, admin_port=9180)
    assert limits.request_timeout == 10.0 and limits.keepalive_timeout == 15.0
    assert limits.max_connections == 4096 and limits.admin_port == 9180
    assert limits.admin_address == "127.0.0.1"
    cfg = Config({"RequestTimeout": "3", "MaxConnectionsPerSource": "7", "TrustedProxies": "10.0.0.0/8"})
    limits = gweb.HttpLimits.from_config(cfg)
    assert limits.request_timeout == 3.0 and limits.max_connections_per_source == 7
    assert [str(n) for n in limits.trusted_proxies] == ["10.0.0.0/8"]


def test_raise_nofile_limit() -> None:
    import resource

    soft = gweb.raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(ctx: ssl.SSLContext | None, limits: gweb.HttpLimits) -> tuple[asyncio.Task[None], int]:
    async def echo(request: web.Request) -> web.Response:
        body = b""
        async for chunk in request.content.iter_any():
            body += chunk
        return web.Response(body=body or b"ok")

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    registry = gweb.CollectorRegistry()
    admin = gweb.management_app(registry, lambda: True)
    port = _free_port()
    task = asyncio.create_task(gweb.run_sites(app, [("127.0.0.1", port, ctx)], limits=limits, admin=admin))
    for _n in range(100):
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.02)
    return task, port


async def _stop(task: asyncio.Task[None]) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closed (or reset) the connection within ``seconds``."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run(kind: str, coro_fn) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(coro_fn())
    else:
        asyncio.run(coro_fn())


def test_deadlines_and_caps(loop_kind: str, pki) -> None:
    files = pki.issue("weblimits")
    server_ctx = tls.server_context(files.cert, files.key, "broker")
    client_ctx = tls.client_context(files.ca, verify=True, role="broker")
    admin_port = _free_port()
    limits = gweb.HttpLimits(
        request_timeout=1.0,
        keepalive_timeout=2.0,
        max_connections=20,
        max_connections_per_source=5,
        admin_port=admin_port,
    )

    async def main() -> None:
        task, port = await _serve(server_ctx, limits)
        url = f"https://127.0.0.1:{port}/echo"
        try:
            # A normal request works, TLS included, and keeps working across keep-alive.
            async with aiohttp.ClientSession() as http:
                for _n in range(2):
                    async with http.post(url, data=b"hello", ssl=client_ctx) as resp:
                        assert resp.status == 200 and await resp.read() == b"hello"
            # Idle TCP (no TLS hello), a partial header and a stalled body are all cut at ~1 s.
            idle = await asyncio.open_connection("127.0.0.1", port)
            partial = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            partial[1].write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            stalled = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            stalled[1].write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            # Per-source cap: 3 held above, 2 more fit, the 6th is closed at once.
            extra = [await asyncio.open_connection("127.0.0.1", port) for _n in range(2)]
            try:
                sixth = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionResetError:
                pass  # reset at accept before connect() returned: refused as well
            else:
                extra.append(sixth)
                assert await _closed_within(sixth[0], 0.5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for reader, _w in (idle, partial, stalled):
                assert await _closed_within(reader, 3.0)
            assert loop.time() - t0 < 2.5
            for _r, w in extra:
                w.close()
            await asyncio.sleep(1.2)
            # Metrics on the management listener only; /health on both.
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                    text = await resp.text()
                assert (
                    'gatehouse_http_connections_refused_total{limit="max_connections_per_source",listener="public"} 1.0'
                    in text
                )
                assert 'gatehouse_http_connections_open{listener="public"} 0.0' in text
                async with http.get(f"http://127.0.0.1:{admin_port}/health") as resp:
                    assert resp.status == 200
                async with http.post(url, data=b"after", ssl=client_ctx) as resp:
                    assert await resp.read() == b"after"
        finally:
            await _stop(task)

    _run(loop_kind, main)


def test_next_request_on_a_kept_alive_connection_has_its_own_deadline(loop_kind: str, pki) -> None:
    """A long idle keep-alive does not stretch the deadline of the next request: a partial second
    header is cut RequestTimeout after its first byte, while an idle connection stays open."""
    files = pki.issue("weblimits-keepalive")
    server_ctx = tls.server_context(files.cert, files.key, "broker")
    client_ctx = tls.client_context(files.ca, verify=True, role="broker")
    limits = gweb.HttpLimits(request_timeout=1.0, keepalive_timeout=30.0, max_connections=20)
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"

    async def main() -> None:
        task, port = await _serve(server_ctx, limits)
        try:
            loop = asyncio.get_running_loop()
            conns = []
            for _n in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
                writer.write(request)
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                assert await reader.readexactly(2) == b"hi"
                conns.append((reader, writer))
            await asyncio.sleep(1.5)  # idle longer than RequestTimeout: both still open
            (slow_r, slow_w), (idle_r, _idle_w) = conns
            slow_w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            t0 = loop.time()
            assert await _closed_within(slow_r, 3.0)
            assert loop.time() - t0 < 2.0
            assert not await _closed_within(idle_r, 0.5)
        finally:
            await _stop(task)

    _run(loop_kind, main)
