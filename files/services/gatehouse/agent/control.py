"""The agent's control API on 60443: ``POST /pcoip-agent/xml`` launch-session.

The stand-in takes the real PCoIP agent's launch-session element for element
(:data:`gatehouse.protocol.LAUNCH_ELEMENTS`) and answers every refusal the way a real agent does: a
``<launch-session-resp>`` with a ``FAILED_...`` result-id and a ``<fail-reason>``, no session-info.
So a CM that drifts from the real format fails against the stand-in as it would against a desktop.

Only a connection manager may launch a session: with ``ClientTlsVerify`` (the default) the peer
must present a certificate verified against ``ClientCaCert`` with role ``cm``; anyone else gets
HTTP 403 and no session-tag is issued. The logon password is never logged or kept.

``join-session`` (collaboration, same peer check) issues a collaborator's session-tag for a session
whose owner channel is up, or answers FAILED_NO_SUCH_SESSION; it carries no credentials.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from aiohttp import web

from gatehouse import protocol, tls
from gatehouse.agent.endpoint import Endpoint
from gatehouse.agent.settings import AgentSettings
from gatehouse.logs import SessionLogger
from gatehouse.web import peer_ssl_object

log = logging.getLogger("gatehouse.agent")
ENVELOPE = "pcoip-agent"


@dataclass
class LaunchStats:
    refused_peers: int = 0  # launch-session from a peer without a cm certificate


SETTINGS_KEY = web.AppKey("settings", AgentSettings)
ENDPOINT_KEY = web.AppKey("endpoint", Endpoint)
STATS_KEY = web.AppKey("launch_stats", LaunchStats)


def _xml(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, headers={"Content-Type": protocol.CONTENT_TYPE})


def _error(result_id: str, message: str, status: int = 200) -> web.Response:
    return _xml(protocol.render(ENVELOPE, protocol.LaunchSessionResp(result_id, message)), status)


def _log_id(value: str) -> str:
    """The CM's session-log-id (the 36-character session id) when it is one, else a new id."""
    try:
        return str(uuid.UUID(value)) if len(value) == 36 else str(uuid.uuid4())
    except ValueError:
        return str(uuid.uuid4())


async def launch(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    endpoint = request.app[ENDPOINT_KEY]
    if settings.client_tls_verify and "cm" not in tls.peer_roles(peer_ssl_object(request)):
        request.app[STATS_KEY].refused_peers += 1
        log.warning(
            "launch-session refused: the peer presented no connection manager certificate",
            extra={"peer": request.remote},
        )
        return _error(protocol.E_USER_AUTH, "a Gatehouse connection manager certificate is required", 403)
    body = await request.content.read(protocol.MAX_BODY + 1)
    try:
        message = protocol.parse(body, ENVELOPE)
    except protocol.ProtocolError as exc:
        log.info("bad request: %s", exc.message)
        return _error(exc.result_id, str(exc))
    if isinstance(message, protocol.JoinSession):
        return _join(settings, endpoint, message)
    if not isinstance(message, protocol.LaunchSession):
        return _error(protocol.E_UNKNOWN, f"the agent does not handle <{message.tag}>")
    # One id follows the session through CM, SG and agent logs.
    session_id = _log_id(message.session_log_id)
    slog = SessionLogger(log, session_id)
    endpoint.tags.prune()  # expired, unused tags no longer hold capacity
    if endpoint.active + len(endpoint.tags) >= settings.capacity:
        slog.warning("launch refused: at capacity", extra={"capacity": settings.capacity})
        return _error(protocol.LAUNCH_FAILED, "the agent is at capacity")
    info = _session_info(settings, session_id, endpoint.tags.issue(session_id, message.client_ip))
    slog.info(
        "session launched",
        extra={
            "client": message.client_ip,
            "client_name": message.client_name[:64],
            "user": message.username,
            "credentials": bool(message.password),
        },
    )
    return _xml(protocol.render(ENVELOPE, protocol.LaunchSessionResp(protocol.LAUNCH_OK, "", info)))


def _session_info(settings: AgentSettings, session_id: str, tag: str) -> protocol.SessionInfo:
    """Where the client connects with ``tag`` for ``session_id`` (this agent's session endpoint)."""
    return protocol.SessionInfo(
        ip_address=settings.advertise_address,
        port=settings.session_port,
        session_id=session_id,
        session_tag=tag,
        sni=settings.hostname,
    )


def _join(settings: AgentSettings, endpoint: Endpoint, message: protocol.JoinSession) -> web.Response:
    """A collaborator's session-tag for the running session ``message.session_id``."""

    def refuse(result_id: str, reason: str) -> web.Response:
        body = protocol.JoinSessionResp(result_id, reason)
        return _xml(protocol.render(ENVELOPE, body))

    session_id = message.session_id[:64]
    slog = SessionLogger(log, session_id)
    if not endpoint.running(session_id):
        slog.info("join refused: the session is not running", extra={"client": message.client_ip[:64]})
        return refuse(protocol.NO_SUCH_SESSION, "the session is not running on this desktop")
    endpoint.tags.prune()
    if endpoint.active + len(endpoint.tags) >= settings.capacity:
        slog.warning("join refused: at capacity", extra={"capacity": settings.capacity})
        return refuse(protocol.LAUNCH_FAILED, "the agent is at capacity")
    info = _session_info(
        settings, session_id, endpoint.tags.issue(session_id, message.client_ip, collaborator=True)
    )
    slog.info(
        "collaborator admitted",
        extra={
            "client": message.client_ip[:64],
            "client_name": message.client_name[:64],
            "user": message.username[:128],
            "collaborator_session_id": _log_id(message.session_log_id),
        },
    )
    return _xml(protocol.render(ENVELOPE, protocol.JoinSessionResp(protocol.LAUNCH_OK, "", info)))


async def not_allowed(_request: web.Request) -> web.Response:
    return _error(protocol.E_MALFORMED, "use POST", status=405)


def make_app(
    settings: AgentSettings, endpoint: Endpoint, stats: LaunchStats | None = None
) -> web.Application:
    app = web.Application(client_max_size=protocol.MAX_BODY + 1)
    app[SETTINGS_KEY] = settings
    app[ENDPOINT_KEY] = endpoint
    app[STATS_KEY] = stats or LaunchStats()
    app.router.add_post(protocol.PATH_AGENT, launch)
    app.router.add_get(protocol.PATH_AGENT, not_allowed)
    return app
