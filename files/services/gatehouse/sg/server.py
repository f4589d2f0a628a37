"""Run the SG: TLS listener, UDP relay and the plain-HTTP admin site, until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from aiohttp import web
from prometheus_client import CollectorRegistry

from gatehouse import tls
from gatehouse.sg.relay import Gateway
from gatehouse.sg.settings import HANDSHAKE_TIMEOUT, SHUTDOWN_GRACE, SgSettings
from gatehouse.sg.stats import Stats, StatsCollector
from gatehouse.sg.tlsconn import TlsListener
from gatehouse.sg.udp import UdpRelay
from gatehouse.sg.udp_table import UdpTable
from gatehouse.web import add_health_and_metrics

log = logging.getLogger("gatehouse.sg")


async def serve(settings: SgSettings, server_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    table = UdpTable()
    # Agents usually have self-signed certificates: the chain is not verified, the key size is.
    agent_ctx = tls.client_context(verify=False, role="sg")
    gateway = Gateway(settings, agent_ctx, stats, table)
    ready = False

    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, settings.max_connections))
    app = web.Application()
    add_health_and_metrics(app, registry, lambda: ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, settings.admin_address, settings.admin_port, reuse_address=True).start()

    server = TlsListener(
        loop, settings.listen_address, settings.port, server_ctx, gateway.handler, HANDSHAKE_TIMEOUT
    )
    udp = UdpRelay(table, stats)
    await udp.start(settings.listen_address, settings.port, settings.agent_udp_source_port)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = True
    log.info(
        "listening",
        extra={
            "address": f"{settings.listen_address}:{settings.port}",
            "agent_udp_source_port": settings.agent_udp_source_port,
            "max_connections": settings.max_connections,
            "admin": f"{settings.admin_address}:{settings.admin_port}",
        },
    )
    await stop.wait()

    ready = False
    log.info("stopping: no new connections; closing %d sessions", len(gateway.sessions))
    server.close()
    udp.close()
    await gateway.close_all(SHUTDOWN_GRACE)
    await runner.cleanup()
    log.info("stopped")
