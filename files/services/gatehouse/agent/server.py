"""Run the agent: control API (TLS), session endpoint (TLS tcp + udp), load reports, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gatehouse.agent.control import LaunchStats, make_app
from gatehouse.agent.endpoint import Endpoint
from gatehouse.agent.reporter import Reporter
from gatehouse.agent.settings import AgentSettings
from gatehouse.agent.tags import TagStore
from gatehouse.web import add_health, management_app, raise_nofile_limit, run_sites

log = logging.getLogger("gatehouse.agent")


class _Collector(Collector):
    def __init__(
        self, endpoint: Endpoint, reporter: Reporter | None, capacity: int, launches: LaunchStats
    ) -> None:
        self.endpoint = endpoint
        self.reporter = reporter
        self.capacity = capacity
        self.launches = launches

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        e = self.endpoint
        yield GaugeMetricFamily("gatehouse_agent_sessions_active", "Session channels up", value=e.active)
        yield GaugeMetricFamily("gatehouse_agent_capacity", "Capacity setting", value=self.capacity)
        yield GaugeMetricFamily(
            "gatehouse_agent_tags_pending", "Issued, unused session-tags", value=len(e.tags)
        )
        yield CounterMetricFamily(
            "gatehouse_agent_channels_refused", "Refused session channels", value=e.refused
        )
        yield CounterMetricFamily(
            "gatehouse_agent_launch_refused_peers",
            "launch-session requests refused: the peer had no connection manager certificate",
            value=self.launches.refused_peers,
        )
        udp = CounterMetricFamily("gatehouse_agent_udp_datagrams", "UDP datagrams", labels=["outcome"])
        udp.add_metric(["echoed"], e.udp_echoed)
        udp.add_metric(["dropped"], e.udp_dropped)
        yield udp
        if self.reporter:
            reports = CounterMetricFamily("gatehouse_agent_load_reports", "Load reports", labels=["outcome"])
            reports.add_metric(["sent"], self.reporter.sent)
            reports.add_metric(["failed"], self.reporter.failed)
            yield reports


async def serve(settings: AgentSettings, control_ctx: ssl.SSLContext, session_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    nofile = raise_nofile_limit()
    endpoint = Endpoint(TagStore(settings.session_tag_ttl))
    reporter = Reporter(settings, lambda: endpoint.active) if settings.report_url else None
    registry = CollectorRegistry()
    launches = LaunchStats()
    registry.register(_Collector(endpoint, reporter, settings.capacity, launches))
    app = make_app(settings, endpoint, launches)
    ready = False
    # /health on the control port (deploy checks); /metrics only on AdminAddress:AdminPort.
    add_health(app, lambda: ready)

    session_server = await loop.create_server(
        endpoint.protocol,
        settings.listen_address,
        settings.session_port,
        ssl=session_ctx,
        ssl_handshake_timeout=10.0,
        ssl_shutdown_timeout=5.0,
        backlog=1024,
        reuse_address=True,
    )
    await endpoint.start_udp(settings.listen_address, settings.session_port)
    report_task = loop.create_task(reporter.run()) if reporter else None

    def started() -> None:
        nonlocal ready
        ready = True
        log.info(
            "listening",
            extra={
                "control": f"{settings.listen_address}:{settings.control_port}",
                "session": f"{settings.listen_address}:{settings.session_port}",
                "advertise": settings.advertise_address,
                "hostname": settings.hostname,
                "capacity": settings.capacity,
                "admin": f"{settings.http.admin_address}:{settings.http.admin_port}",
                "client_tls_verify": settings.client_tls_verify,
                "nofile": nofile,
            },
        )

    try:
        await run_sites(
            app,
            [(settings.listen_address, settings.control_port, control_ctx)],
            shutdown_timeout=5.0,
            limits=settings.http,
            admin=management_app(registry, lambda: ready),
            started=started,
        )
    finally:
        ready = False
        session_server.close()
        endpoint.close_all()
        for _tick in range(50):  # let the channels send their TLS close_notify
            if not endpoint.channels:
                break
            await asyncio.sleep(0.1)
        if report_task:
            report_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await report_task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session_server.wait_closed(), 5.0)
        log.info("stopped")
