"""The CM's HTTPS client for the upstream broker and the agents.

One connection pool serves every client session: the broker's per-client session cookie is kept in
the CM's :class:`~gatehouse.cm.sessions.Session` and sent as an explicit ``Cookie`` header, so
4,000 clients do not mean 4,000 connectors. Peers with RSA keys under 2048 bits are refused right
after the TLS handshake, before a request (and a password) is sent on the connection. The CM
presents its own ``cm`` role certificate (IdentityCert/IdentityKey) to both.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.cm.sessions import Session
from gatehouse.cm.settings import CmSettings

BROKER = "broker"
AGENT = "agent"
_MAX_GOOD_PEERS = 4096
# Kept-alive connections per broker/agent. A burst of clients then waits briefly for a pooled
# connection instead of opening (and TLS-handshaking) one connection per client.
UPSTREAM_CONNECTIONS = 256
# A pooled connection idle longer than this is not reused. It stays well under the broker's and
# agents' KeepAliveTimeout (15 s by default): reusing a connection the server is closing at that
# very moment loses the request (the POST cannot be safely retried).
UPSTREAM_IDLE = 5.0


class UpstreamError(Exception):
    """The broker or an agent failed or timed out; ``text`` is the seed's message for clients."""

    def __init__(self, upstream: str, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.upstream = upstream
        self.kind = kind  # "error" or "timeout"
        self.detail = detail

    @property
    def text(self) -> str:
        what = "Timeout" if self.kind == "timeout" else "Error"
        return f"{what} occurred while communicating with {self.upstream}"


class KeyCheckingConnector(aiohttp.TCPConnector):
    """A connector that refuses TLS peers whose certificate key is too weak (checked once per cert)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._good_peers: set[bytes] = set()

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
        identity = {"cert": settings.identity_cert or None, "key": settings.identity_key or None}
        self.broker_ssl = tls.client_context(
            settings.broker_ca_cert or None, settings.broker_tls_verify, **identity
        )
        self.agent_ssl = tls.client_context(
            settings.agent_ca_cert or None, settings.agent_tls_verify, **identity
        )
        connector = KeyCheckingConnector(
            limit=1024, limit_per_host=UPSTREAM_CONNECTIONS, ttl_dns_cache=60, keepalive_timeout=UPSTREAM_IDLE
        )
        # No cookie jar: each client's broker cookies travel in its own Session.
        self.http = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "Gatehouse-CM/0.1"},
        )

    async def close(self) -> None:
        await self.http.close()

    async def broker(self, session: Session, message: p.Message) -> p.Message:
        """Send one message on the client's broker session; returns the reply (maybe an ErrorResp)."""
        headers = {"Content-Type": p.CONTENT_TYPE}
        if session.broker_cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in session.broker_cookies.items())
        body = await self._post(
            BROKER,
            self.settings.broker_url,
            p.render("pcoip-broker", message),
            headers,
            self.broker_ssl,
            self.settings.broker_timeout,
            session,
        )
        return self._parse(BROKER, body, "pcoip-broker")

    async def launch(self, session: Session, agent: p.AgentInfo) -> p.SessionInfo:
        """The agent's launch-session for this client; returns where and how the client connects."""
        request = p.LaunchSession(
            session_id=session.session_id,
            client_ip=session.client_ip,
            username=session.username,
            domain=session.domain,
            license_server_url=self.settings.license_server_url,
        )
        body = await self._post(
            AGENT,
            agent_url(agent.ip_address, agent.agent_port),
            p.render("pcoip-agent", request),
            {"Content-Type": p.CONTENT_TYPE},
            self.agent_ssl,
            self.settings.agent_timeout,
            None,
        )
        reply = self._parse(AGENT, body, "pcoip-agent")
        if isinstance(reply, p.ErrorResp):
            raise UpstreamError(AGENT, "error", f"agent answered error-resp {reply.result_id}")
        if not isinstance(reply, p.LaunchSessionResp):
            raise UpstreamError(AGENT, "error", f"agent answered <{reply.tag}> to launch-session")
        if reply.result_id != p.LAUNCH_OK or reply.session_info is None:
            raise UpstreamError(AGENT, "error", f"agent refused launch-session: {reply.result_id}")
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
            raise UpstreamError(upstream, "error", f"unreadable answer: {exc.message}") from None


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
