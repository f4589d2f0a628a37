"""The CM's HTTPS client for the upstream broker and the agents.

One connection pool serves every client session: the broker's per-client session cookie is kept in
the CM's :class:`~gatehouse.cm.sessions.Session` and sent as an explicit ``Cookie`` header, so
4,000 clients do not mean 4,000 connectors. Peers with RSA keys under 2048 bits are refused right
after the TLS handshake, before a request (and a password) is sent on the connection. The CM
presents its own ``cm`` role certificate (IdentityCert/IdentityKey) to both.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from gatehouse import __version__, tls
from gatehouse import protocol as p
from gatehouse.cm import agent as agent_call
from gatehouse.cm.sessions import Session
from gatehouse.cm.settings import CmSettings

BROKER = "broker"
AGENT = "agent"
_MAX_GOOD_PEERS = 4096
# TLS contexts made for desktops with their own CA or a pinned certificate, kept for reuse (their
# pooled connections are keyed by context); past this many the cache starts over.
_MAX_AGENT_CONTEXTS = 1024
# Kept-alive connections per broker/agent. A burst of clients then waits briefly for a pooled
# connection instead of opening (and TLS-handshaking) one connection per client.
UPSTREAM_CONNECTIONS = 256
# A pooled connection idle longer than this is not reused. It stays well under the broker's and
# agents' KeepAliveTimeout (15 s by default): reusing a connection the server is closing at that
# very moment loses the request (the POST cannot be safely retried).
UPSTREAM_IDLE = 5.0


class UpstreamError(Exception):
    """The broker or an agent failed or timed out; ``text`` is the seed's message for clients."""

    def __init__(self, upstream: str, kind: str, detail: str, result_id: str = "") -> None:
        super().__init__(detail)
        self.upstream = upstream
        # An agent's refusal: its result-id (join-session's NO_SUCH_SESSION tells "session ended").
        self.result_id = result_id
        # "timeout", "error", or for agents "invalid" (an answer that cannot become a grant) and
        # "unverified" (credentials withheld from an agent whose certificate is not verified).
        self.kind = kind
        self.detail = detail

    @property
    def text(self) -> str:
        what = "Timeout" if self.kind == "timeout" else "Error"
        return f"{what} occurred while communicating with {self.upstream}"


class KeyCheckingConnector(aiohttp.TCPConnector):
    """A connector that refuses TLS peers whose certificate key is too weak (checked once per cert).

    ``pins`` maps a client context to the SHA-256 digest its peer's certificate must have: checked
    on every new connection made with that context, right after the handshake and before a
    request (and a password) is written.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._good_peers: set[bytes] = set()
        self.pins: dict[ssl.SSLContext, bytes] = {}

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        transport = proto.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True) or b""
            pin = self.pins.get(req.ssl) if isinstance(req.ssl, ssl.SSLContext) else None
            if pin is not None and hashlib.sha256(der).digest() != pin:
                proto.close()
                raise tls.CertificateError(
                    f"certificate of {req.url.host}:{req.url.port} does not match the desktop's pinned SHA-256"
                )
            if der not in self._good_peers:
                try:
                    tls.check_peer(ssl_object, f"{req.url.host}:{req.url.port}")
                except tls.CertificateError:
                    proto.close()
                    raise
                if len(self._good_peers) >= _MAX_GOOD_PEERS:
                    self._good_peers.clear()
                self._good_peers.add(der)
        return proto


def agent_url(ip_address: str, port: int) -> str:
    host = f"[{ip_address}]" if ":" in ip_address else ip_address
    return f"https://{host}:{port}{p.PATH_AGENT}"


class Upstream:
    """Broker and agent calls with the seed's error texts; create inside the running loop."""

    def __init__(self, settings: CmSettings) -> None:
        self.settings = settings
        # The CM's `cm` role certificate goes to both: the broker serves its XML API and the agents
        # their launch-session only to a verified CM.
        self.identity = {"cert": settings.identity_cert or None, "key": settings.identity_key or None}
        self.broker_ssl = tls.client_context(
            settings.broker_ca_cert or None, settings.broker_tls_verify, **self.identity
        )
        self.agent_ssl = tls.client_context(
            settings.agent_ca_cert or None, settings.agent_tls_verify, **self.identity
        )
        self._agent_contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        # Tenants' brokers with their own CA bundle (by path), made on first use.
        self._broker_contexts: dict[str, ssl.SSLContext] = {}
        self.connector = connector = KeyCheckingConnector(
            limit=1024, limit_per_host=UPSTREAM_CONNECTIONS, ttl_dns_cache=60, keepalive_timeout=UPSTREAM_IDLE
        )
        # No cookie jar: each client's broker cookies travel in its own Session.
        self.http = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"Gatehouse-CM/{__version__}"},
        )

    async def close(self) -> None:
        await self.http.close()

    def broker_of(self, session: Session) -> tuple[str, ssl.SSLContext]:
        """The broker endpoint and TLS context of the session: its tenant's broker, or BrokerUrl.

        A tenant's broker is verified with the tenant's broker_ca_cert, else with BrokerCaCert.
        """
        tenant = session.tenant
        if tenant is None:
            return self.settings.broker_url, self.broker_ssl
        if not tenant.broker_ca_cert:
            return tenant.broker_url, self.broker_ssl
        ctx = self._broker_contexts.get(tenant.broker_ca_cert)
        if ctx is None:
            try:
                ctx = tls.client_context(
                    tenant.broker_ca_cert, self.settings.broker_tls_verify, **self.identity
                )
            except tls.CertificateError as exc:
                raise UpstreamError(BROKER, "error", f"tenant {tenant.name}: broker_ca_cert: {exc}") from None
            self._broker_contexts[tenant.broker_ca_cert] = ctx
        return tenant.broker_url, ctx

    def forget_broker_contexts(self) -> None:
        """Drop the tenants' broker contexts (after a tenants reload: a CA file may have changed)."""
        self._broker_contexts.clear()

    async def broker(self, session: Session, message: p.Message) -> p.Message:
        """Send one message on the client's broker session; returns the reply (maybe an ErrorResp).

        With tenants, the session's tenant's broker and no other: a client of tenant A is never
        sent to tenant B's broker, whatever it asks.
        """
        headers = {"Content-Type": p.CONTENT_TYPE}
        if session.broker_cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in session.broker_cookies.items())
        url, ssl_context = self.broker_of(session)
        body = await self._post(
            BROKER,
            url,
            p.render("pcoip-broker", message),
            headers,
            ssl_context,
            self.settings.broker_timeout,
            session,
        )
        return self._parse(BROKER, body, "pcoip-broker")

    def agent_context(self, agent: p.AgentInfo) -> tuple[ssl.SSLContext, bool]:
        """The TLS context for this desktop's agent, and whether it verifies the agent's certificate.

        A pinned SHA-256 (``agent_cert_sha256``) wins, then the desktop's own CA (``agent_ca_pem``,
        with the host name checked), then the deployment CA (verified unless AgentTlsVerify=false).
        """
        if agent.agent_cert_sha256:
            key = ("sha256", agent.agent_cert_sha256.replace(":", "").lower())
        elif agent.agent_ca_pem:
            key = ("ca", hashlib.sha256(agent.agent_ca_pem.encode()).hexdigest())
        else:
            return self.agent_ssl, self.settings.agent_tls_verify
        ctx = self._agent_contexts.get(key)
        if ctx is None:
            if len(self._agent_contexts) >= _MAX_AGENT_CONTEXTS:
                self._agent_contexts.clear()
                self.connector.pins.clear()
            try:
                if key[0] == "sha256":
                    digest = bytes.fromhex(key[1])
                    if len(digest) != hashlib.sha256().digest_size:
                        raise ValueError("not a SHA-256 digest")
                    ctx = tls.client_context(None, False, **self.identity)
                    self.connector.pins[ctx] = digest
                else:
                    ctx = tls.client_context(None, True, ca_pem=agent.agent_ca_pem, **self.identity)
            except (ValueError, tls.CertificateError) as exc:
                raise UpstreamError(
                    AGENT, "error", f"the desktop's agent certificate settings: {exc}"
                ) from None
            self._agent_contexts[key] = ctx
        return ctx, True

    async def launch(self, session: Session, agent: p.AgentInfo) -> p.SessionInfo:
        """The real agent's launch-session for this client; returns where and how the client connects.

        The user's password goes only to an agent whose certificate is verified, only when the
        desktop needs it (logon ``windows-password``), and the session's copy is dropped by this
        call whatever its outcome.
        """
        ssl_context, verified = self.agent_context(agent)
        password = ""
        if agent.logon == p.LOGON_WINDOWS_PASSWORD:
            if not verified:
                session.forget_password()
                raise UpstreamError(
                    AGENT,
                    "unverified",
                    "credentials withheld: the agent's certificate is not verified (AgentTlsVerify=false "
                    "and the desktop has no agent_ca_pem or agent_cert_sha256)",
                )
            held = session.take_password()
            if held is None:
                raise UpstreamError(
                    AGENT,
                    "error",
                    "the user's password is no longer held (used by an earlier launch); log in again",
                )
            password = held
        else:
            session.forget_password()
        body = p.render(
            "pcoip-agent",
            agent_call.launch_request(session, agent, password, self.settings.license_server_url),
        )
        del password
        raw = await self._post_agent(agent, body, ssl_context)
        del body
        return self._session_info(raw, p.LaunchSessionResp, "launch-session")

    async def join(self, session: Session, agent: p.AgentInfo, agent_session_id: str) -> p.SessionInfo:
        """The agent's join-session for a collaborator: a new session-tag for the running session
        ``agent_session_id``. No credentials go: the collaborator joins the owner's logged-on
        desktop. The agent is verified as for launch (the owner's AgentInfo, pins and CA included)."""
        ssl_context, _verified = self.agent_context(agent)
        body = p.render(
            "pcoip-agent",
            p.JoinSession(
                session_id=agent_session_id,
                session_log_id=session.session_id,
                client_ip=session.client_ip,
                client_name=session.client_name,
                username=session.username,
                domain=session.domain,
            ),
        )
        raw = await self._post_agent(agent, body, ssl_context)
        info = self._session_info(raw, p.JoinSessionResp, "join-session")
        if info.session_id != agent_session_id:
            raise UpstreamError(AGENT, "invalid", "agent answered join-session for another session")
        return info

    async def _post_agent(self, agent: p.AgentInfo, body: bytes, ssl_context: ssl.SSLContext) -> bytes:
        """One request of the agent envelope to ``agent``, within AgentTimeout."""
        return await self._post(
            AGENT,
            agent_url(agent.ip_address, agent.agent_port),
            body,
            {"Content-Type": p.CONTENT_TYPE},
            ssl_context,
            self.settings.agent_timeout,
            None,
        )

    def _session_info(self, raw: bytes, expected: type[p.LaunchSessionResp], request: str) -> p.SessionInfo:
        """The checked session-info of a launch-session-resp or join-session-resp."""
        reply = self._parse(AGENT, raw, "pcoip-agent")
        if isinstance(reply, p.ErrorResp):
            raise UpstreamError(AGENT, "error", f"agent answered error-resp {reply.result_id}")
        if reply.tag != expected.tag:
            raise UpstreamError(AGENT, "invalid", f"agent answered <{reply.tag}> to {request}")
        assert isinstance(reply, p.LaunchSessionResp)  # JoinSessionResp is one too
        if reply.result_id != p.LAUNCH_OK:
            reason = agent_call.printable(reply.fail_reason)  # it goes to the log
            raise UpstreamError(
                AGENT,
                "error",
                f"agent refused {request}: {reply.result_id[:64]} {reason}",
                reply.result_id[:64],
            )
        if reply.session_info is None:
            raise UpstreamError(AGENT, "invalid", "agent answered SUCCESSFUL without session-info")
        try:
            agent_call.check_session_info(reply.session_info)
        except agent_call.InvalidAnswer as exc:
            raise UpstreamError(AGENT, "invalid", f"invalid answer: {exc}") from None
        return reply.session_info

    async def _post(
        self,
        upstream: str,
        url: str,
        data: bytes,
        headers: dict[str, str],
        ssl_context: ssl.SSLContext,
        limit: float,
        session: Session | None,
    ) -> bytes:
        try:
            async with asyncio.timeout(limit):
                async with self.http.post(url, data=data, headers=headers, ssl=ssl_context) as resp:
                    if session is not None:
                        _keep_cookies(session, resp)
                    body = await _read_capped(resp, upstream)
                    if resp.status >= 400 and not body.lstrip().startswith(b"<"):
                        raise UpstreamError(upstream, "error", f"HTTP {resp.status}")
                    return body
        except UpstreamError:
            raise
        except TimeoutError:
            raise UpstreamError(upstream, "timeout", f"no answer within {limit:g} s") from None
        except tls.CertificateError as exc:
            raise UpstreamError(upstream, "error", str(exc)) from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise UpstreamError(upstream, "error", describe(exc)) from None

    @staticmethod
    def _parse(upstream: str, body: bytes, envelope: str) -> p.Message:
        try:
            return p.parse(body, envelope)
        except p.ProtocolError as exc:
            kind = "invalid" if upstream == AGENT else "error"
            raise UpstreamError(upstream, kind, f"unreadable answer: {exc.message}") from None


def describe(exc: BaseException) -> str:
    """A short, log-friendly reason (aiohttp's own texts include object reprs)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"certificate of {exc.host}:{exc.port} refused: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"TLS handshake with {exc.host}:{exc.port} failed: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error)
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    return f"{type(exc).__name__}: {exc}"


def _keep_cookies(session: Session, resp: aiohttp.ClientResponse) -> None:
    for name, morsel in resp.cookies.items():
        if morsel["max-age"] == "0" or not morsel.value:
            session.broker_cookies.pop(name, None)
        else:
            session.broker_cookies[name] = morsel.value


async def _read_capped(resp: aiohttp.ClientResponse, upstream: str) -> bytes:
    if resp.content_length is not None and resp.content_length > p.MAX_BODY:
        raise UpstreamError(upstream, "error", "answer over the size cap")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > p.MAX_BODY:
            raise UpstreamError(upstream, "error", "answer over the size cap")
        chunks.append(chunk)
    return b"".join(chunks)
