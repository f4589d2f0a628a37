"""The CM's client-facing HTTP server: the pcoip-client protocol, sessions, limits and upstream calls.

Failures of the broker or an agent reach the client with the seed's texts ("Error occurred while
communicating with broker", "Timeout occurred while communicating with agent", ...): in an
``<allocate-resource-resp>`` with ALLOC_FAILED_OTHER for allocate-resource, otherwise in an
``<error-resp>`` with FAILED_INTERNAL_ERROR. The session keeps its state, so the client can retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.cm import agent as agent_call
from gatehouse.cm.invitations import InvitationBook, InvitationRefused, owner_of_code, owner_refusal
from gatehouse.cm.metrics import CmMetrics
from gatehouse.cm.peers import (
    PATH_FORWARD,
    PATH_REDEEM,
    Call,
    Peers,
    Redeemed,
    WorkerLate,
    redeemed_json,
    refused_json,
)
from gatehouse.cm.sessions import (
    EstablishmentLimiter,
    Session,
    SessionsFull,
    SessionTable,
    State,
    check_transition,
    owner_of_cookie,
)
from gatehouse.cm.settings import CmSettings, read_tenants
from gatehouse.cm.target import NoSiteGateway, build_target, gateway_name, site_gateway
from gatehouse.cm.upstream import Upstream, UpstreamError
from gatehouse.config import ConfigError
from gatehouse.grant import GrantSealer
from gatehouse.logs import SessionLogger
from gatehouse.shared import WorkerSlots, WorkerSourceSlots
from gatehouse.sites import Gateway
from gatehouse.tenants import SNI_ATTRIBUTE, ServerNames, Tenant, Tenants, TenantsError, normal_host
from gatehouse.web import Network, add_health, client_ip
from gatehouse.workers import WorkerPlace

log = logging.getLogger("gatehouse.cm")
ENVELOPE = "pcoip-client"
COOKIE = "JSESSIONID"
LOG_ID_HEADER = "Client-Log-Id"
AUTH_FAILED_TEXT = "Unknown username or password"
COLLAB_DISABLED_TEXT = "collaboration is disabled on this connection manager (EnableCollaboration=false)"
CM_KEY = web.AppKey("cm", "ConnectionManager")
# The SG health poll: every half second, each answer within half a second, so a dead SG takes the
# CM out of the HALB's rotation within about a second (the HALB then needs its own fall count).
SG_POLL_INTERVAL = 0.5
SG_POLL_TIMEOUT = 0.5


class Misdirected(Exception):
    """With tenants: the request's host name (SNI, Host) names no tenant, or another tenant's session.

    Answered with HTTP 421 and an ``<error-resp>`` (FAILED_MALFORMED_REQUEST) naming the problem;
    the session of another tenant is neither used nor touched.
    """


def same_broker(old: Tenant, new: Tenant) -> bool:
    """Whether a tenant's sessions survive a reload: the same broker, CA and agent networks."""
    return (old.broker_url, old.broker_ca_cert, old.agent_networks) == (
        new.broker_url,
        new.broker_ca_cert,
        new.agent_networks,
    )


def peer_timeout(settings: CmSettings) -> float:
    """The longest a session's worker may take over a forwarded request: an allocate-resource
    calls the broker, the agent and the broker again."""
    return 2 * settings.broker_timeout + settings.agent_timeout + 5.0


def request_host(request: web.Request) -> str:
    """The Host header's name, without the port, as tenants compare it."""
    host = request.headers.get("Host", "")
    if host.startswith("["):
        return normal_host(host[1 : host.find("]")] if "]" in host else host[1:])
    return normal_host(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)


def call_of(request: web.Request, trusted: Sequence[Network]) -> Call:
    """What the CM needs of a request that arrived on its own listener."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return Call(
        ip=client_ip(request, trusted),
        cookie=request.cookies.get(COOKIE),
        log_id=request.headers.get(LOG_ID_HEADER, "")[:128],
        host=request_host(request),
        sni=getattr(ssl_object, SNI_ATTRIBUTE, None) or "",
        # The connection object identifies the TLS connection (see SessionTable.find).
        connection=request.transport,
    )


class Busy(Exception):
    """A limit (MaxClients, MaxConcurrentEstablishments) is reached; answered with FAILED_SERVER_BUSY."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit

    @classmethod
    def full(cls, exc: SessionsFull) -> Busy:
        """The answer to a full session table."""
        return cls(exc.limit, f"too many client sessions ({exc}); try again later")


@dataclass
class Outcome:
    """What one request produced: the message, the HTTP status and the cookie to set or clear."""

    message: p.Message
    status: int = 200
    session: Session | None = None
    set_cookie: str | None = None
    clear_cookie: bool = False
    quiet: bool = False  # probes are logged at debug only
    details: dict[str, object] | None = None  # added to the request's one log line

    @property
    def result(self) -> str:
        return getattr(self.message, "result_id", "") or "OK"


class ConnectionManager:
    def __init__(
        self,
        settings: CmSettings,
        server_names: ServerNames | None = None,
        place: WorkerPlace | None = None,
    ) -> None:
        """``place``: as worker ``place.index`` of a supervisor (None: on its own). A worker's
        sessions and invitations carry its index, MaxClients, MaxConcurrentEstablishments and
        MaxPreAuthSessionsPerSource are counted across the workers, its pool of unauthenticated
        sessions is its share of MaxPreAuthSessions, and requests of another worker's sessions go there (peers.py)."""
        self.settings = settings
        # The TLS server name callback of the client-facing context (tenants' own certificates).
        self.server_names = server_names
        self.peers: Peers | None = None
        client_slots = establishing = pre_auth_sources = None
        max_pre_auth = settings.max_pre_auth_sessions
        if place is not None:
            # Each worker evicts from its own pool, so MaxPreAuthSessions is shared out among them
            # (an attacker who fills one worker's share is evicted there, not on the others).
            max_pre_auth = max(1, max_pre_auth // place.count)
            self.peers = Peers(place.peers, place.index, peer_timeout(settings))
            client_slots = WorkerSlots(place.shared, "clients", place.index)
            establishing = WorkerSlots(place.shared, "establishing", place.index)
            pre_auth_sources = WorkerSourceSlots(place.shared, "pre_auth", place.index)
        self.table = SessionTable(
            settings.max_clients,
            settings.idle_timeout,
            pre_auth_timeout=settings.pre_auth_timeout,
            max_pre_auth=max_pre_auth,
            max_pre_auth_per_source=settings.max_pre_auth_sessions_per_source,
            max_lifetime=settings.session_max_lifetime,
            exempt=settings.trusted_proxies,
            slots=client_slots,
            sources=pre_auth_sources,
            tag=f".{place.index}" if place is not None else "",
        )
        self.limiter = EstablishmentLimiter(settings.max_concurrent_establishments, establishing)
        secret = settings.grant_secret
        self.sealer = GrantSealer(secret, settings.site) if secret else None
        # One key per other site's gateways (docs/multisite.md); the settings require the secret.
        self.site_sealers = {site: GrantSealer(secret, site) for site, _gw in settings.site_gateways}
        # Tenants (docs/tenants.md): replaced as a whole by reload_tenants(); each has its own
        # grant key, derived from the shared secret (and this CM's site).
        self.tenants: Tenants = settings.tenants
        self.tenant_sealers: dict[str, GrantSealer] = {}
        self._set_tenants(settings.tenants)
        self.invitations = InvitationBook(
            settings.invitation_ttl,
            settings.max_invitations_per_session,
            tag=f"-{place.index}" if place is not None else "",
        )
        self.gateway_sni = gateway_name(settings.host_address, settings.ssl_cert)
        self.hostname = next(iter(settings.host_address), "") or socket.gethostname()
        # Unknown until the first poll when an SG health URL is set; no URL: nothing to follow.
        self.sg_up = not settings.security_gateway_health_url
        self.metrics = CmMetrics(
            lambda: self.table.authenticated_count,
            lambda: self.limiter.in_flight,
            pre_auth=lambda: self.table.pre_auth_count,
            evictions=lambda: self.table.evictions,
            sg_up=lambda: 1.0 if self.sg_up else 0.0,
            invitations=self.invitations.outstanding,
        )
        self.upstream: Upstream | None = None
        # The domains each broker (by tenant name, "" without tenants) last offered, for probes.
        self.domains: dict[str, list[str]] = {}
        self.ready = False
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._sg_poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ tenants

    def _set_tenants(self, tenants: Tenants) -> None:
        if self.settings.grant_secret:
            self.tenant_sealers = {
                t.name: self.tenant_sealers.get(t.name)
                or GrantSealer(self.settings.grant_secret, self.settings.site, tenant=t.name)
                for t in tenants.tenants
            }
        self.tenants = tenants

    def reload_tenants(self) -> bool:
        """Read TenantsFile again (SIGHUP): added tenants are served, removed ones' sessions end.

        A tenant whose broker_url, broker CA or agent networks changed also has its sessions ended
        (they belong to the old broker); the other tenants' sessions are untouched. A file that
        cannot be used changes nothing (logged). Returns whether the new file was taken up.
        """
        if not self.settings.tenants_file:
            log.warning("SIGHUP: no TenantsFile is configured; nothing to reload")
            return False
        try:
            new = read_tenants(self.settings.tenants_file)
        except ConfigError as exc:
            log.error("tenants not reloaded, the current ones stay: %s", exc)
            return False
        contexts = None
        if self.server_names is not None:
            try:
                contexts = self.server_names.contexts_for(new)
            except TenantsError as exc:
                log.error("tenants not reloaded, the current ones stay: TenantsFile: %s", exc)
                return False
        old = {t.name: t for t in self.tenants.tenants}
        kept = {t.name for t in new.tenants if t.name in old and same_broker(old[t.name], t)}
        ended = 0
        for session in self.table.sessions():
            if session.tenant is not None and session.tenant.name not in kept:
                if self.table.remove(session):
                    ended += 1
                    SessionLogger(log, session.session_id).info(
                        "session ended: its tenant was removed or changed",
                        extra={"tenant": session.tenant.name},
                    )
                    self._broker_bye(session)
        for name in set(self.domains) - kept:
            self.domains.pop(name, None)
        self._set_tenants(new)
        if self.server_names is not None and contexts is not None:
            self.server_names.use(contexts)
        if self.upstream is not None:
            self.upstream.forget_broker_contexts()
        log.info(
            "tenants reloaded",
            extra={
                "tenants": ",".join(t.name for t in new.tenants),
                "added": ",".join(sorted({t.name for t in new.tenants} - set(old))),
                "removed": ",".join(sorted(set(old) - {t.name for t in new.tenants})),
                "sessions_ended": ended,
            },
        )
        return True

    def tenant_of(self, call: Call) -> Tenant | None:
        """The request's tenant (None without tenants); raises Misdirected.

        The TLS server name (SNI) and the Host header must both be host names of one tenant: a
        client that reaches a tenant's name by TLS and asks for another's in HTTP is refused.
        """
        if not self.settings.tenants_file:
            return None
        sni = call.sni
        if not sni:
            raise Misdirected(
                "this connection manager serves tenants: connect with a tenant's host name (TLS SNI)"
            )
        tenant = self.tenants.by_host(sni)
        if tenant is None:
            raise Misdirected(f"unknown host name {normal_host(sni)[:253]!r}: no tenant is served under it")
        if self.tenants.by_host(call.host) != tenant:
            raise Misdirected("the Host header and the TLS server name (SNI) name different tenants")
        return tenant

    def healthy(self) -> bool:
        """/health: serving, and the co-located SG (when followed) answers its own /health."""
        return self.ready and self.sg_up

    # ------------------------------------------------------------ application

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._https_only], client_max_size=p.MAX_BODY)
        app[CM_KEY] = self
        app.router.add_route("*", p.PATH_BROKER, self.handle_xml, expect_handler=expect_continue)
        # /metrics is on the management listener only (see __main__); /health stays here for the HALB.
        add_health(app, self.healthy)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.upstream = Upstream(self.settings)
        self._sweeper = asyncio.create_task(self._sweep())
        if self.settings.security_gateway_health_url:
            self._sg_poller = asyncio.create_task(self._poll_sg())
        self.ready = True

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.ready = False

    async def _on_cleanup(self, _app: web.Application) -> None:
        for task in (self._sweeper, self._sg_poller):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # End the broker sessions of the clients still here, so the broker does not wait for
        # its idle timeout (best effort, bounded in time).
        for session in self.table.sessions():
            self.table.remove(session)
            self._broker_bye(session)
        if self._background:
            await asyncio.wait(self._background, timeout=min(self.settings.broker_timeout, 5.0))
        if self.upstream:
            await self.upstream.close()
        if self.peers is not None:
            await self.peers.close()

    def add_peer_routes(self, admin: web.Application) -> None:
        """The calls of this CM's other workers (on this worker's Unix socket, see peers.py)."""
        admin.router.add_post(PATH_FORWARD, self.handle_forwarded)
        admin.router.add_post(PATH_REDEEM, self.handle_peer_redeem)

    @web.middleware
    async def _https_only(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Requests on the plain RedirectPort are sent to the TLS port."""
        if request.secure:
            return await handler(request)
        host = self._redirect_host(request.url.host)
        if ":" in host:
            host = f"[{host}]"
        port = request.url.port
        # Behind the seed's port forwards (80→8080, 443→8443) the client used the default ports.
        netloc = host if port in (None, 80) else f"{host}:{self.settings.listen_port}"
        location = f"https://{netloc}{request.rel_url}"
        status = 301 if request.method in ("GET", "HEAD") else 308
        return web.Response(status=status, headers={"Location": location})

    def _redirect_host(self, asked: str | None) -> str:
        """The host of a redirect: one of the CM's own names, never one a client chose.

        The Host header is the client's to set; echoing it would make the redirect port an open
        redirect. It is kept only when it names the CM (HostAddress or a specific ListenAddress).
        """
        own = [h for h in self.settings.host_address if h]
        own.extend(self.tenants.host_names)
        listen = self.settings.listen_address
        if listen and listen not in ("0.0.0.0", "::"):
            own.append(listen)
        if asked:
            for name in own:
                if name.lower() == asked.lower():
                    return name
        return own[0] if own else self.hostname

    async def _sweep(self) -> None:
        interval = max(1.0, min(30.0, self.settings.idle_timeout / 4, self.settings.pre_auth_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self._reap()
            for session in self.table.expire():
                SessionLogger(log, session.session_id).info("session expired, forgotten")
                self._broker_bye(session)

    def _reap(self) -> None:
        """End the broker sessions of the sessions the table evicted or found expired."""
        for session in self.table.take_evicted():
            what = (
                "authenticated session expired" if session.authenticated else "unauthenticated session ended"
            )
            SessionLogger(log, session.session_id).debug(what, extra={"client_ip": session.client_ip})
            self._broker_bye(session)

    async def _poll_sg(self) -> None:
        """Follow the SG's /health: while it fails, the CM's own /health answers 503."""
        url = self.settings.security_gateway_health_url
        ssl_ctx = None
        if url.startswith("https:"):
            ssl_ctx = tls.client_context(
                self.settings.agent_ca_cert or None,
                self.settings.agent_tls_verify,
                cert=self.settings.identity_cert or None,
                key=self.settings.identity_key or None,
            )
        timeout = aiohttp.ClientTimeout(total=SG_POLL_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as http:
            while True:
                try:
                    async with http.get(url, ssl=ssl_ctx) as resp:
                        up = resp.status == 200
                except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError):
                    up = False
                if up != self.sg_up:
                    self.sg_up = up
                    change = (
                        "security gateway is up" if up else "security gateway is down: /health answers 503"
                    )
                    (log.info if up else log.warning)(change, extra={"url": url})
                await asyncio.sleep(SG_POLL_INTERVAL)

    def _broker_bye(self, session: Session) -> None:
        """Close the client's broker session in the background (best effort)."""
        if self.upstream is None or not session.broker_cookies:
            return
        upstream = self.upstream

        async def bye() -> None:
            try:
                await upstream.broker(session, p.Bye())
            except UpstreamError as exc:
                SessionLogger(log, session.session_id).debug(
                    "broker bye failed", extra={"reason": exc.detail}
                )

        task = asyncio.create_task(bye())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ HTTP

    async def handle_xml(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        call = call_of(request, self.settings.trusted_proxies)
        if request.method != "POST":
            return await self._send(
                request,
                Outcome(p.ErrorResp(p.E_MALFORMED, f"use POST on {p.PATH_BROKER}"), 405),
                call.ip,
                "invalid",
                started,
            )
        try:
            body = await read_body(request)
        except p.ProtocolError as exc:
            outcome = Outcome(p.ErrorResp(exc.result_id, exc.message), 413)
            return await self._send(request, outcome, call.ip, "invalid", started, close=True)
        owner = owner_of_cookie(call.cookie)
        if self.peers is not None and self.peers.other(owner):
            try:
                answer = await self.peers.forward(owner, call, body)
            except WorkerLate:
                return await self._send(request, self._worker_late(), call.ip, "forwarded", started)
            if answer is not None:
                self.metrics.forwarded.labels("answered").inc()
                return await answer.send(request)
            # That worker has ended, and its sessions with it: answered here, as without a session.
            self.metrics.forwarded.labels("gone").inc()
            call = dataclasses.replace(call, cookie=None)
        return await self._answer(request, call, body, started)

    def _worker_late(self) -> Outcome:
        """The answer when another worker, which holds what a request needs, passed the deadline
        of peers.Peers (it runs, but is stalled or overloaded)."""
        self.metrics.forwarded.labels("timeout").inc()
        return Outcome(p.ErrorResp(p.E_INTERNAL, "the session's worker did not answer in time"), 503)

    async def handle_forwarded(self, request: web.Request) -> web.StreamResponse:
        """A request another worker received for a session of this one (peers.py)."""
        return await self._answer(
            request, Call.from_headers(request.headers), await request.read(), time.monotonic()
        )

    async def _answer(
        self, request: web.Request, call: Call, body: bytes, started: float
    ) -> web.StreamResponse:
        ip = call.ip
        try:
            message = p.parse(body, ENVELOPE)
        except p.ProtocolError as exc:
            outcome = Outcome(p.ErrorResp(exc.result_id, exc.message), 400)
            return await self._send(request, outcome, ip, "invalid", started)
        try:
            outcome = await self.dispatch(call, message)
        except p.ProtocolError as exc:
            outcome = Outcome(p.ErrorResp(exc.result_id, exc.message), 200)
        except Busy as exc:
            self.metrics.busy.labels(exc.limit).inc()
            outcome = Outcome(p.ErrorResp(p.E_BUSY, str(exc)), 503)
        except WorkerLate:  # another worker's invitation book did not answer
            outcome = self._worker_late()
        except Misdirected as exc:
            outcome = Outcome(p.ErrorResp(p.E_MALFORMED, str(exc)), 421, details={"refused": "tenant"})
        except UpstreamError as exc:
            outcome = Outcome(p.ErrorResp(p.E_INTERNAL, exc.text), 200)
        except Exception:
            log.exception("request failed", extra={"client_ip": ip, "request": message.tag})
            outcome = Outcome(p.ErrorResp(p.E_INTERNAL, "internal error"), 500)
        finally:
            self._reap()
        return await self._send(request, outcome, ip, message.tag, started)

    async def _send(
        self,
        request: web.Request,
        outcome: Outcome,
        ip: str,
        tag: str,
        started: float,
        close: bool = False,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=outcome.status, headers={"Content-Type": p.CONTENT_TYPE, "Cache-Control": "no-store"}
        )
        resp.enable_chunked_encoding()
        if outcome.set_cookie:
            resp.set_cookie(
                COOKIE, outcome.set_cookie, secure=True, httponly=True, path="/", samesite="Strict"
            )
        elif outcome.clear_cookie:
            resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        if close:
            resp.force_close()
        result = outcome.result
        self.metrics.requests.labels(tag, result).inc()
        extra = {
            "client_ip": ip,
            "request": tag,
            "result": result,
            "ms": round((time.monotonic() - started) * 1000, 1),
        }
        if outcome.session is not None:
            extra["session_id"] = outcome.session.session_id
            if outcome.session.tenant is not None:
                extra["tenant"] = outcome.session.tenant.name
        if isinstance(outcome.message, p.ErrorResp):
            extra["reason"] = outcome.message.result_str
        if outcome.details:
            extra.update(outcome.details)
        log.log(logging.DEBUG if outcome.quiet else logging.INFO, "%s answered", tag, extra=extra)
        await resp.prepare(request)
        await resp.write(p.render(ENVELOPE, outcome.message))
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------ protocol

    async def dispatch(self, call: Call, message: p.Message) -> Outcome:
        ip, log_id, connection = call.ip, call.log_id, call.connection
        tenant = self.tenant_of(call)
        session = self.table.find(call.cookie, log_id, ip, connection=connection)
        if session is not None and session.tenant_name != (tenant.name if tenant is not None else ""):
            # Another tenant's cookie (or log id): refused, and that session is left as it was.
            raise Misdirected("this session belongs to another host name; send <hello> on this one")
        if session is not None:
            session.touch()
        if isinstance(message, p.Hello):
            return await self.hello(message, session, ip, log_id, tenant, call.host)
        if isinstance(message, p.Bye):
            return self.bye(session)
        try:
            check_transition(session.state if session else None, message.tag)
        except p.ProtocolError as exc:
            return Outcome(p.ErrorResp(exc.result_id, exc.message), session=session)
        assert session is not None  # check_transition refuses everything else without a session
        try:
            async with session.lock:
                # Checked again: another request of this session may have moved it on meanwhile.
                check_transition(session.state, message.tag)
                if isinstance(message, p.Authenticate):
                    return await self.authenticate(message, session, connection)
                if isinstance(message, p.GetResourceList):
                    return await self.resource_list(message, session)
                if isinstance(message, p.AllocateResource):
                    return await self.allocate(message, session)
                if isinstance(message, p.CreateInvitation):
                    return self.create_invitation(session)
                if isinstance(message, p.RedeemInvitation):
                    return await self.redeem_invitation(message, session)
        except UpstreamError as exc:
            self._upstream_failed(session, exc)
            return Outcome(p.ErrorResp(p.E_INTERNAL, exc.text), session=session)
        except p.ProtocolError as exc:
            return Outcome(p.ErrorResp(exc.result_id, exc.message), session=session)
        except Busy as exc:
            self.metrics.busy.labels(exc.limit).inc()
            return Outcome(p.ErrorResp(p.E_BUSY, str(exc)), 503, session=session)
        raise p.ProtocolError(p.E_UNKNOWN, f"<{message.tag}> is not a request a client can send")

    def _sealer(self, session: Session) -> GrantSealer | None:
        """The grant sealer of the session's tenant (its own derived key), or the CM's."""
        if session.tenant is None:
            return self.sealer
        return self.tenant_sealers.get(session.tenant.name)

    def _check_tenant_agent(self, session: Session, address: str) -> None:
        """A tenant's desktop must be within its agent_networks (when it has any)."""
        tenant = session.tenant
        if tenant is not None and not tenant.owns_agent(address):
            raise UpstreamError(
                "broker",
                "error",
                f"the broker of tenant {tenant.name} allocated {address}, outside its agent_networks",
            )

    def _upstream_failed(self, session: Session, exc: UpstreamError) -> None:
        self.metrics.upstream_failures.labels(exc.upstream, exc.kind).inc()
        extra = {"upstream": exc.upstream, "reason": exc.detail, "client_ip": session.client_ip}
        if session.tenant is not None:
            extra["tenant"] = session.tenant.name
        SessionLogger(log, session.session_id).warning(exc.text, extra=extra)

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise p.ProtocolError(p.E_INTERNAL, "the connection manager is starting")
        return self.upstream

    async def hello(
        self,
        message: p.Hello,
        old: Session | None,
        ip: str,
        log_id: str,
        tenant: Tenant | None = None,
        host_name: str = "",
    ) -> Outcome:
        key = tenant.name if tenant is not None else ""
        if message.is_query:
            # A probe (QueryBrokerClient): answered from what the CM knows; no session, no cookie.
            domains = list(self.domains.get(key, []))
            return Outcome(p.HelloResp(hostname=self.hostname, domains=domains), quiet=True)
        if old is not None:
            # A new hello restarts the client's flow: the old session and its broker session end.
            self.table.remove(old)
            SessionLogger(log, old.session_id).info("session restarted by a new hello")
            self._broker_bye(old)
        try:
            session = self.table.create(ip, log_id)
        except SessionsFull as exc:
            raise Busy.full(exc) from None
        session.tenant = tenant
        session.host_name = host_name if tenant is not None else ""
        session.client_name = agent_call.client_name(message.client_info.hostname)
        session.client_mac = agent_call.client_mac(message.client_info.mac_address)
        upstream_hello = p.Hello(
            client_info=message.client_info,
            caps=message.caps,
            pcm_info=p.PcmInfo(session.session_id, ip),
        )
        try:
            reply = await self._upstream().broker(session, upstream_hello)
        except UpstreamError as exc:
            self.table.remove(session)
            self._upstream_failed(session, exc)
            return Outcome(p.ErrorResp(p.E_INTERNAL, exc.text), session=session)
        if not isinstance(reply, p.HelloResp):
            self.table.remove(session)
            return Outcome(self._unexpected(session, reply, "hello"), session=session)
        self.domains[key] = reply.domains
        resp = p.HelloResp(
            hostname=self.hostname, methods=reply.methods or [p.AUTH_PASSWORD], domains=reply.domains
        )
        details = {"product": message.client_info.product_name[:64]}
        return Outcome(resp, session=session, set_cookie=session.cookie, details=details)

    def bye(self, session: Session | None) -> Outcome:
        if session is None:
            return Outcome(p.ByeResp(), clear_cookie=True)
        self.table.remove(session)
        self._broker_bye(session)
        return Outcome(p.ByeResp(), session=session, clear_cookie=True)

    def _unexpected(self, session: Session, reply: p.Message, step: str) -> p.ErrorResp:
        """A broker error-resp is passed on; any other odd answer is a broker communication error."""
        if isinstance(reply, p.ErrorResp):
            return p.ErrorResp(reply.result_id, reply.result_str)
        exc = UpstreamError("broker", "error", f"broker answered <{reply.tag}> to {step}")
        self._upstream_failed(session, exc)
        return p.ErrorResp(p.E_INTERNAL, exc.text)

    async def authenticate(
        self, message: p.Authenticate, session: Session, connection: object | None = None
    ) -> Outcome:
        # MaxClients counts authenticated sessions: checked before the password goes anywhere.
        try:
            self.table.check_room()
        except SessionsFull as exc:
            raise Busy.full(exc) from None
        request = p.Authenticate(
            message.username, message.password, message.domain, message.method, message.passcode
        )
        reply = await self._upstream().broker(session, request)
        if not isinstance(reply, p.AuthenticateResp):
            # The broker starts the steps over after an error: a password held from one goes.
            session.forget_password()
            return Outcome(self._unexpected(session, reply, "authenticate"), session=session)
        who: dict[str, object] = {
            "username": message.username[:128],
            "domain": message.domain[:64],
            "method": message.method,
        }
        if reply.result_id == p.AUTH_INCOMPLETE:
            # A step passed, another is due: the session stays unauthenticated. The password is
            # held once its step passed (the desktop logon needs it after the last step).
            if message.method == p.METHOD_PASSWORD:
                session.keep_password(message.password)
            following = [m for m in reply.next_methods if m in p.AUTH_METHODS][:1]
            if not following:
                session.forget_password()
                exc = UpstreamError(
                    "broker", "error", "broker answered an incomplete step without a next method"
                )
                self._upstream_failed(session, exc)
                return Outcome(p.ErrorResp(p.E_INTERNAL, exc.text), session=session)
            prompt = agent_call.printable(reply.result_str, 256)
            return Outcome(
                p.AuthenticateResp(p.AUTH_INCOMPLETE, prompt, following), session=session, details=who
            )
        if reply.result_id == p.AUTH_OK:
            try:
                # A new cookie at login: a cookie known before authentication is worth nothing after.
                cookie = self.table.authenticated(session, connection)
            except SessionsFull as exc:
                raise Busy.full(exc) from None
            if cookie is None:  # evicted or expired while the broker checked the password
                self._broker_bye(session)
                return Outcome(
                    p.ErrorResp(p.E_OUT_OF_STATE, "the session ended; send <hello> again"),
                    session=session,
                    clear_cookie=True,
                )
            session.username = message.username
            session.domain = message.domain
            # Held for the desktop's Windows logon: see Upstream.launch for who may receive it. A
            # passcode as the last step keeps the password its earlier step left.
            if message.method == p.METHOD_PASSWORD:
                session.keep_password(message.password)
            return Outcome(
                p.AuthenticateResp(p.AUTH_OK, reply.result_str),
                session=session,
                set_cookie=cookie,
                details=who,
            )
        # Unknown user and wrong password get one answer, whatever the broker said; the broker
        # starts the steps over, so a password held from an earlier step goes.
        session.forget_password()
        failed = Outcome(p.AuthenticateResp(p.AUTH_FAILED, AUTH_FAILED_TEXT), session=session, details=who)
        session.auth_failures += 1
        if session.auth_failures >= self.settings.max_auth_attempts:
            # Guessing costs a new hello (and a new pre-authentication slot) every few attempts.
            if self.table.remove(session):
                self._broker_bye(session)
            self.metrics.auth_attempts_exceeded.inc()
            failed.clear_cookie = True
            failed.details = {**who, "ended": "MaxAuthAttempts reached"}
        return failed

    async def resource_list(self, message: p.GetResourceList, session: Session) -> Outcome:
        reply = await self._upstream().broker(session, message)
        if not isinstance(reply, p.GetResourceListResp):
            return Outcome(self._unexpected(session, reply, "get-resource-list"), session=session)
        if reply.result_id == p.LIST_OK:
            session.state = State.LISTED
        return Outcome(reply, session=session)

    def _site_route(self, agent: p.AgentInfo) -> tuple[Gateway, GrantSealer] | None:
        """Another site's gateway and that site's sealer for ``agent``'s desktop, or None when this
        CM's own way serves it (docs/multisite.md); raises NoSiteGateway for an unknown site."""
        gateway = site_gateway(self.settings, agent.site)
        return (gateway, self.site_sealers[agent.site]) if gateway else None

    async def allocate(self, message: p.AllocateResource, session: Session) -> Outcome:
        if not self.limiter.try_acquire():
            raise Busy(
                "max_establishments",
                f"{self.limiter.limit} session establishments are in progress; try again later",
            )
        previous = session.state
        session.state = State.ALLOCATING
        details: dict[str, object] = {"resource_id": message.resource_id[:64]}
        try:
            request = p.AllocateResource(message.resource_id, message.resource_type, message.protocol)
            reply = await self._upstream().broker(session, request)
            if not isinstance(reply, p.AllocateResourceResp):
                return Outcome(self._unexpected(session, reply, "allocate-resource"), session=session)
            if reply.result_id != p.ALLOC_OK:
                return Outcome(
                    p.AllocateResourceResp(reply.result_id, reply.result_str, message.resource_id),
                    session=session,
                    details=details,
                )
            if reply.agent is None:
                raise UpstreamError("broker", "error", "broker allocated no agent")
            self._check_tenant_agent(session, reply.agent.ip_address)
            try:
                remote = self._site_route(reply.agent)
            except NoSiteGateway as exc:
                details.update(site=exc.site, refused=str(exc))
                return Outcome(
                    p.AllocateResourceResp(
                        p.ALLOC_FAILED, "the desktop's site cannot be reached from here", message.resource_id
                    ),
                    session=session,
                    details=details,
                )
            info = await self._upstream().launch(session, reply.agent)
            self._check_tenant_agent(session, info.ip_address)
            target = build_target(
                self.settings,
                self._sealer(session),
                session.session_id,
                session.client_ip,
                reply.agent,
                info,
                session.host_name or self.gateway_sni,
                remote,
            )
            session.state = State.ALLOCATED
            session.agent = reply.agent
            session.agent_session_id = info.session_id
            details.update(
                agent=reply.agent.ip_address,
                agent_hostname=reply.agent.hostname,
                target=f"{target.ip_address}:{target.port}",
                gateway=self.settings.enable_security_gateway or remote is not None,
                site=reply.agent.site,
            )
            return Outcome(
                p.AllocateResourceResp(p.ALLOC_OK, "", message.resource_id, message.protocol, target=target),
                session=session,
                details=details,
            )
        except UpstreamError as exc:
            self._upstream_failed(session, exc)
            return Outcome(
                p.AllocateResourceResp(p.ALLOC_FAILED, exc.text, message.resource_id),
                session=session,
                details=details,
            )
        finally:
            self.limiter.release()
            if session.state is State.ALLOCATING:
                session.state = previous

    # ------------------------------------------------------------ collaboration

    def create_invitation(self, session: Session) -> Outcome:
        """The owner of an allocated desktop session gets a single-use code for one collaborator."""
        if not self.settings.enable_collaboration:
            self.metrics.invitations_refused.labels("disabled").inc()
            return Outcome(p.CreateInvitationResp(p.COLLAB_DISABLED, COLLAB_DISABLED_TEXT), session=session)
        if session.joined or session.agent is None:
            raise p.ProtocolError(
                p.E_OUT_OF_STATE, "only the owner of a desktop session invites collaborators"
            )
        try:
            code = self.invitations.create(session, session.agent, session.agent_session_id)
        except InvitationRefused as exc:
            self.metrics.invitations_refused.labels(exc.reason).inc()
            return Outcome(p.CreateInvitationResp(exc.result_id, str(exc)), session=session)
        self.metrics.invitations_created.inc()
        ttl = int(self.settings.invitation_ttl)
        return Outcome(
            p.CreateInvitationResp(p.INVITE_OK, "", code, ttl, self.hostname),
            session=session,
            details={"agent": session.agent.ip_address, "expires_in": ttl},
        )

    async def redeem_invitation(self, message: p.RedeemInvitation, session: Session) -> Outcome:
        """An authenticated collaborator joins the owner's desktop session with the owner's code.

        The code is consumed first (a failed join still used it); the owner's CM session must be
        alive and still on the invited agent session, and the agent must still run it. The grant
        is for the owner's agent session and this client's own address.
        """
        if not self.settings.enable_collaboration:
            self.metrics.invitations_refused.labels("disabled").inc()
            return Outcome(p.RedeemInvitationResp(p.COLLAB_DISABLED, COLLAB_DISABLED_TEXT), session=session)
        # A busy CM refuses before the code is looked at, so the code is not spent on a refusal.
        if not self.limiter.try_acquire():
            raise Busy(
                "max_establishments",
                f"{self.limiter.limit} session establishments are in progress; try again later",
            )
        previous = session.state
        try:
            try:
                code = message.invitation_code
                owner_worker = owner_of_code(code)
                if self.peers is not None and self.peers.other(owner_worker):
                    invitation = await self.peers.redeem(owner_worker, code, session.tenant_name)
                else:
                    invitation = self.take_invitation(code, session.tenant_name)
            except InvitationRefused as exc:
                return self._refuse_invitation(session, exc)
            session.state = State.ALLOCATING
            details: dict[str, object] = {
                "owner_session_id": invitation.owner_session_id,
                "agent": invitation.agent.ip_address,
            }
            try:
                info = await self._upstream().join(session, invitation.agent, invitation.agent_session_id)
                self._check_tenant_agent(session, info.ip_address)
                target = build_target(
                    self.settings,
                    self._sealer(session),
                    session.session_id,
                    session.client_ip,
                    invitation.agent,
                    info,
                    session.host_name or self.gateway_sni,
                    # The owner's route: its allocation here found the desktop's site gateway.
                    self._site_route(invitation.agent),
                )
            except UpstreamError as exc:
                self._upstream_failed(session, exc)
                if exc.result_id == p.NO_SUCH_SESSION:
                    ended = "the owner's desktop session has ended"
                    refused = InvitationRefused("ended", p.JOIN_ENDED, ended)
                else:
                    refused = InvitationRefused("agent", p.JOIN_FAILED, exc.text)
                return self._refuse_invitation(session, refused, details)
        finally:
            self.limiter.release()
            if session.state is State.ALLOCATING:
                session.state = previous
        session.state = State.ALLOCATED
        session.agent = invitation.agent
        session.agent_session_id = invitation.agent_session_id
        session.joined = invitation.owner_session_id
        self.metrics.invitations_redeemed.inc()
        SessionLogger(log, invitation.owner_session_id).info(
            "collaborator joined", extra={"collaborator_session_id": session.session_id}
        )
        details["target"] = f"{target.ip_address}:{target.port}"
        return Outcome(p.RedeemInvitationResp(p.JOIN_OK, "", target), session=session, details=details)

    def take_invitation(self, code: str, tenant_name: str) -> Redeemed:
        """Invitation ``code`` of this worker's book, consumed; raises InvitationRefused."""
        invitation = self.invitations.redeem(code)
        if invitation.owner.tenant_name != tenant_name:
            # Another tenant's code is no code here (and gives away nothing about it).
            raise InvitationRefused("unknown", p.JOIN_UNKNOWN, "no such invitation")
        refusal = owner_refusal(invitation, self.table.alive(invitation.owner))
        if refusal is not None:
            raise refusal
        return Redeemed(invitation.agent, invitation.agent_session_id, invitation.owner.session_id)

    async def handle_peer_redeem(self, request: web.Request) -> web.Response:
        """Another worker's collaborator redeems a code of this worker's book (peers.py)."""
        asked = await request.json()
        try:
            text = redeemed_json(self.take_invitation(str(asked["code"]), str(asked["tenant"])))
        except InvitationRefused as exc:
            text = refused_json(exc)
        return web.Response(text=text, content_type="application/json")

    def _refuse_invitation(
        self, session: Session, exc: InvitationRefused, details: dict[str, object] | None = None
    ) -> Outcome:
        """The refusal on the wire; unknown codes count toward MaxInvitationAttempts, which ends the
        session (guessing costs a new hello and login every few attempts, as MaxAuthAttempts does)."""
        self.metrics.invitations_refused.labels(exc.reason).inc()
        outcome = Outcome(
            p.RedeemInvitationResp(exc.result_id, str(exc)),
            session=session,
            details={**(details or {}), "refused": exc.reason},
        )
        if exc.reason == "unknown":
            session.invitation_failures += 1
            if session.invitation_failures >= self.settings.max_invitation_attempts:
                if self.table.remove(session):
                    self._broker_bye(session)
                self.metrics.invitation_attempts_exceeded.inc()
                outcome.clear_cookie = True
                outcome.details = {**(outcome.details or {}), "ended": "MaxInvitationAttempts reached"}
        return outcome


async def expect_continue(request: web.Request) -> None:
    """``Expect: 100-continue``: no "100 Continue" for a body over the cap, which is refused unread."""
    if request.content_length is not None and request.content_length > p.MAX_BODY:
        return None
    return await _default_expect_handler(request)


async def read_body(request: web.Request) -> bytes:
    """The request body, refused past the cap: on Content-Length before reading, else while reading."""
    if request.content_length is not None and request.content_length > p.MAX_BODY:
        raise p.ProtocolError(p.E_TOO_LARGE, f"request body over {p.MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > p.MAX_BODY:
            raise p.ProtocolError(p.E_TOO_LARGE, f"request body over {p.MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
