"""Assemble the broker's aiohttp application and run it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gatehouse import protocol, tls
from gatehouse import web as gweb
from gatehouse.broker.admin import PREFIX, AdminApi
from gatehouse.broker.db import Database
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.store import Store
from gatehouse.broker.xmlapi import BrokerEndpoint

log = logging.getLogger("gatehouse.broker")
# Admin bodies and broker XML share the protocol's 64 KiB cap.
CLIENT_MAX_SIZE = protocol.MAX_BODY


def _endpoint_label(path: str) -> str:
    if path == protocol.PATH_BROKER:
        return "broker"
    if path.startswith(PREFIX + "/agents/report"):
        return "agent_report"
    if path.startswith(PREFIX):
        return "admin"
    if path in ("/health", "/metrics"):
        return path[1:]
    return "other"


def build_app(settings: BrokerSettings, db: Database) -> web.Application:
    metrics = BrokerMetrics()
    store = Store(db)
    store.sync_domains(list(settings.domains))
    admin = AdminApi(store, settings, metrics)
    endpoint = BrokerEndpoint(store, settings, metrics)

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(_endpoint_label(request.path), str(status)).inc()

    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[count, admin.middleware])
    app.router.add_post(protocol.PATH_BROKER, endpoint.handle)
    admin.add_routes(app)
    gweb.add_health_and_metrics(app, metrics.registry, db.ready)
    return app


async def serve(settings: BrokerSettings, db: Database) -> None:
    ctx = tls.server_context(settings.ssl_cert, settings.ssl_key, role="broker")
    app = build_app(settings, db)
    await gweb.run_sites(
        app,
        [(settings.listen_address, settings.listen_port, ctx)],
        started=lambda: log.info(
            "broker listening",
            extra={
                "address": settings.listen_address,
                "port": settings.listen_port,
                "database": str(db.path),
            },
        ),
    )
