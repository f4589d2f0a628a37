"""Assemble the broker's aiohttp application and run it."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from gatehouse import protocol, tls
from gatehouse import web as gweb
from gatehouse.broker.admin import PREFIX, AdminApi
from gatehouse.broker.db import Database
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.passwords import Hasher
from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.store import Store
from gatehouse.broker.xmlapi import BrokerEndpoint

log = logging.getLogger("gatehouse.broker")
METRICS_KEY = web.AppKey("broker_metrics", BrokerMetrics)
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


def server_context(settings: BrokerSettings) -> ssl.SSLContext:
    """The listener's context: asks for (never requires) client certificates from ClientCaCert.

    Optional, because the admin API's callers (the collection's modules) send none; the broker
    protocol and the load reports check the verified roles themselves.
    """
    client_ca = settings.client_ca_cert if settings.client_tls_verify else None
    return tls.server_context(settings.ssl_cert, settings.ssl_key, role="broker", client_ca=client_ca)


def build_app(settings: BrokerSettings, db: Database) -> web.Application:
    metrics = BrokerMetrics()
    store = Store(db)
    store.sync_domains(list(settings.domains))
    hasher = Hasher(settings.password_hash_workers, settings.password_hash_queue)
    admin = AdminApi(store, settings, metrics, hasher)
    endpoint = BrokerEndpoint(store, settings, metrics, hasher)

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
    # /health stays on the public port (the deploy checks use it); /metrics is on AdminPort only.
    gweb.add_health(app, db.ready)
    app[METRICS_KEY] = metrics

    async def close_hasher(_app: web.Application) -> None:
        hasher.close()
        endpoint.close()

    app.on_cleanup.append(close_hasher)
    return app


async def serve(settings: BrokerSettings, db: Database) -> None:
    nofile = gweb.raise_nofile_limit()
    ctx = server_context(settings)
    app = build_app(settings, db)
    app[METRICS_KEY].registry.register(tls.CertificateExpiry.of_files(settings.ssl_cert))
    await gweb.run_sites(
        app,
        [(settings.listen_address, settings.listen_port, ctx)],
        limits=settings.http,
        admin=gweb.management_app(app[METRICS_KEY].registry, db.ready),
        started=lambda: log.info(
            "broker listening",
            extra={
                "address": settings.listen_address,
                "port": settings.listen_port,
                "admin_port": settings.http.admin_port,
                "database": db.name,
                "client_tls_verify": settings.client_tls_verify,
                "password_hash_workers": settings.password_hash_workers,
                "nofile": nofile,
            },
        ),
    )
