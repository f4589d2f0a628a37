"""Run the SG until SIGTERM: TLS listener, UDP relay and the plain-HTTP admin site, or, with
ForwardTo set, the forwarder's TCP listener and UDP flows (forward.py) and the admin site.

With Workers > 1, :func:`serve` runs once in each worker process (workers.py), on the sockets
and shared state the supervisor made, with its admin site on a Unix socket for the supervisor."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from gatehouse import tls
from gatehouse.sg.forward import Forwarder, UdpForwarder
from gatehouse.sg.relay import Gateway
from gatehouse.sg.settings import SHUTDOWN_GRACE, SgSettings
from gatehouse.sg.stats import Stats, StatsCollector
from gatehouse.sg.tlsconn import TlsListener
from gatehouse.sg.udp import UdpRelay
from gatehouse.sg.udp_table import UdpTable
from gatehouse.tenants import ServerNames
from gatehouse.web import add_health_and_metrics

if TYPE_CHECKING:
    from gatehouse.workers import WorkerPlace

log = logging.getLogger("gatehouse.sg")


def agent_context(settings: SgSettings) -> ssl.SSLContext:
    """TLS to the agents: their certificate is verified against AgentCaCert and the agent's address
    (the grant names an IP; it must be among the certificate's IP SANs), unless AgentTlsVerify=false."""
    if settings.agent_tls_verify:
        return tls.client_context(settings.agent_ca_cert, verify=True, role="sg")
    return tls.client_context(verify=False, role="sg")


async def serve(
    settings: SgSettings,
    server_ctx: ssl.SSLContext,
    agent_ctx: ssl.SSLContext,
    server_names: ServerNames | None = None,
    place: WorkerPlace | None = None,
) -> None:
    """The gateway; ``place``: as worker ``place.index`` of a supervisor (None: on its own)."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    proxy_source = settings.proxy_source if settings.proxy_protocol_sources else None
    ports = settings.agent_udp_ports
    pool_start = place.index * len(ports) // place.count if place else 0
    udp = UdpRelay(UdpTable(), stats, ports, proxy_source, pool_start)
    gateway = Gateway(
        settings,
        agent_ctx,
        stats,
        udp,
        server_names,
        place.shared if place else None,
        place.index if place else 0,
    )

    def proxy_refused(reason: str, peer: str) -> None:
        gateway.refusals.refuse(reason, peer, logging.WARNING, "refused: %s from a forwarder", reason)

    ready = False
    if not settings.agent_tls_verify:
        log.warning(
            "AgentTlsVerify=false: agent certificates are not verified; anyone who can answer on an "
            "agent's address receives its session-tag and the user's session"
        )

    registry = CollectorRegistry()
    registry.register(
        StatsCollector(stats, settings.max_connections, lambda: len(gateway.sessions), udp.pool.in_use)
    )
    registry.register(tls.CertificateExpiry.of_files(settings.ssl_cert))
    app = web.Application()
    add_health_and_metrics(app, registry, lambda: ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    if place is None:
        await web.TCPSite(runner, settings.admin_address, settings.admin_port, reuse_address=True).start()
    else:
        await web.UnixSite(runner, place.admin_path).start()

    # Before any session can need it.
    await udp.start(settings.listen_address, settings.port, place.sockets["udp"] if place else None)
    server = TlsListener(
        loop,
        settings.listen_address,
        settings.port,
        server_ctx,
        gateway.handler,
        settings.request_timeout,
        proxy_source=proxy_source,
        proxy_refused=proxy_refused,
        max_pending=settings.max_connections,
        sock=place.sockets["tcp"] if place else None,
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.tenants_file:
        # Tenants are added and removed by rewriting TenantsFile and sending SIGHUP: no restart.
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tenants)
    ready = True
    log.info(
        "listening",
        extra={
            "worker": place.index if place else 0,
            "address": f"{settings.listen_address}:{settings.port}",
            "agent_udp_ports": f"{ports.start}-{ports.stop - 1}",
            "max_connections": settings.max_connections,
            "max_connections_per_source": settings.max_connections_per_source,
            "agent_tls_verify": settings.agent_tls_verify,
            "proxy_protocol_sources": ",".join(str(n) for n in settings.proxy_protocol_sources),
            "tenants": ",".join(t.name for t in settings.tenants.tenants),
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


async def serve_forwarder(settings: SgSettings) -> None:
    """The forwarder: no TLS key, no grant secret, no agent; client ↔ an inner SG (forward.py)."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    forwarder = Forwarder(settings, stats)
    udp = UdpForwarder(settings, stats, lambda: forwarder.inners)
    forwarder.udp = udp
    ready = False

    registry = CollectorRegistry()
    registry.register(
        StatsCollector(stats, settings.max_connections, lambda: forwarder.relaying, lambda: len(udp))
    )
    app = web.Application()
    add_health_and_metrics(app, registry, lambda: ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, settings.admin_address, settings.admin_port, reuse_address=True).start()

    await udp.start(settings.listen_address, settings.port)
    dualstack = settings.listen_address == "::" and socket.has_dualstack_ipv6()
    family = socket.AF_INET6 if ":" in settings.listen_address else socket.AF_INET
    sock = socket.create_server(
        (settings.listen_address, settings.port), family=family, backlog=4096, dualstack_ipv6=dualstack
    )
    server = await loop.create_server(forwarder.protocol, sock=sock)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = True
    log.info(
        "forwarding",
        extra={
            "address": f"{settings.listen_address}:{settings.port}",
            "forward_to": ",".join(f"{h}:{p}" for h, p in settings.forward_to),
            "max_connections": settings.max_connections,
            "max_connections_per_source": settings.max_connections_per_source,
            "proxy_protocol_sources": ",".join(str(n) for n in settings.proxy_protocol_sources),
            "admin": f"{settings.admin_address}:{settings.admin_port}",
        },
    )
    await stop.wait()

    ready = False
    log.info("stopping: no new connections; closing %d connections", len(forwarder.conns))
    server.close()
    udp.close()
    await forwarder.close_all(SHUTDOWN_GRACE)
    await runner.cleanup()
    log.info("stopped")
