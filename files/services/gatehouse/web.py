"""Pieces every HTTP service shares: health and metrics routes, client address, TLS serving, SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
from collections.abc import Callable, Iterable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("gatehouse.web")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency; keep the stdlib loop as fallback
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def add_health_and_metrics(
    app: web.Application, registry: CollectorRegistry, ready: Callable[[], bool]
) -> None:
    async def health(_request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "starting"}, status=503)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app[REGISTRY_KEY] = registry
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


def client_ip(request: web.Request, trusted: Sequence[Network] = ()) -> str:
    """The client's address; X-Forwarded-For counts only when the peer is a trusted proxy (the HALB)."""
    peer = request.remote or ""
    if not trusted or not peer:
        return peer
    try:
        peer_addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(peer_addr in net for net in trusted):
        return peer
    # Walk X-Forwarded-For from the right, skipping our own proxies, like HAProxy-aware backends do.
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not any(addr in net for net in trusted):
            return str(addr)
    return hops[0] if hops else peer


async def run_sites(
    app: web.Application,
    sites: Iterable[tuple[str, int, ssl.SSLContext | None]],
    *,
    shutdown_timeout: float = 10.0,
    started: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` on each (host, port, ssl) until SIGTERM/SIGINT, then stop accepting and drain."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout, handle_signals=False)
    await runner.setup()
    for host, port, ctx in sites:
        # Thousands of clients can arrive at once (a HALB failover): a short accept queue resets them.
        site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=4096, reuse_address=True)
        await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if started:
        started()
    await stop.wait()
    log.info("stopping: no new connections, draining requests in flight")
    await runner.cleanup()
