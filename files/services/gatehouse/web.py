"""Pieces every HTTP service shares: health and metrics routes, client address, TLS serving, SIGTERM.

Connection hygiene (:class:`HttpLimits`, enforced by :func:`run_sites` for every aiohttp service):

- a connection must complete its TLS handshake and deliver a whole first request (line, headers and
  body) within ``RequestTimeout`` of being accepted, or it is aborted; later requests on a kept-alive
  connection must start within ``KeepAliveTimeout`` (aiohttp's idle timer, which also closes a
  connection holding a partial header) and deliver their body within ``RequestTimeout``;
- at most ``MaxConnections`` connections are open per process (accepted sockets in their TLS
  handshake included) and at most ``MaxConnectionsPerSource`` per peer address (peers inside
  ``TrustedProxies`` are exempt: the HALB carries many clients); a connection over a cap is closed at
  once, before any TLS work;
- ``/metrics`` is served only on the management listener (``AdminAddress``:``AdminPort``, plain HTTP,
  loopback by default) with its own connection budget, so a flood of the public port cannot hide the
  service's own numbers; ``/health`` is on both.

aiohttp (3.14) offers ``keepalive_timeout`` but no deadline for headers or bodies, and asyncio's
``ssl_handshake_timeout`` only covers the handshake. So the server accepts sockets itself
(:class:`_GuardedServer`: the caps apply before any TLS work), hands each admitted socket to the
event loop's own TLS layer, and a thin protocol wrapper (:class:`_Guard`) keeps the deadline; a
socket is counted from accept to close, whatever stage it dies in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import resource
import signal
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gatehouse.shared import LocalSlots, LocalSourceSlots, Slots, SourceSlots

log = logging.getLogger("gatehouse.web")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A worker's own listening sockets, by the (host, port) of their site.
Listeners = dict[tuple[str, int], list[socket.socket]]
REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)
# The deadline middleware waits for bodies up to this size without consuming them: aiohttp's read
# buffer holds that much before it stops reading (every service's body cap is 64 KiB).
BODY_WAIT_LIMIT = 64 * 1024
# Seconds past the request deadline after which the event loop itself gives up a TLS handshake.
HANDSHAKE_BACKSTOP = 1.0


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency; keep the stdlib loop as fallback
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every service calls this at start).

    The default soft limit (often 1024) is far below the connection caps; running out of
    descriptors makes accept() fail for everyone. Returns the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # pragma: no cover - e.g. a hard limit the kernel refuses
        log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
        return soft
    return target


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """Connection and request limits of one aiohttp service (config keys in ``from_config``).

    ``admin_port`` 0 means no management listener.
    """

    request_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    max_connections: int = 1024
    max_connections_per_source: int = 64
    trusted_proxies: tuple[Network, ...] = ()
    admin_address: str = "127.0.0.1"
    admin_port: int = 0

    @classmethod
    def from_config(cls, cfg: Any, **defaults: Any) -> HttpLimits:
        """Read the keys; ``defaults`` (field names) give the service's own defaults.

        ``trusted_proxies`` may be passed instead of read (a service that already parsed
        ``TrustedProxies``); otherwise the key is read here.
        """
        d = {**{f: getattr(cls, f) for f in cls.__dataclass_fields__ if f != "trusted_proxies"}, **defaults}
        trusted = defaults.get("trusted_proxies")
        if trusted is None:
            trusted = tuple(cfg.networks("TrustedProxies"))
        return cls(
            request_timeout=cfg.float("RequestTimeout", d["request_timeout"], minimum=0.1),
            keepalive_timeout=cfg.float("KeepAliveTimeout", d["keepalive_timeout"], minimum=0.1),
            max_connections=cfg.int("MaxConnections", d["max_connections"], minimum=1),
            max_connections_per_source=cfg.int(
                "MaxConnectionsPerSource", d["max_connections_per_source"], minimum=1
            ),
            trusted_proxies=tuple(trusted),
            admin_address=cfg.str("AdminAddress", d["admin_address"]),
            admin_port=cfg.int("AdminPort", d["admin_port"], minimum=0, maximum=65535),
        )


def add_health(app: web.Application, ready: Callable[[], bool]) -> None:
    """``GET /health``: 200 when ``ready()``, else 503 (the HALB and deploy checks use it)."""

    async def health(_request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "starting"}, status=503)

    app.router.add_get("/health", health)


def add_health_and_metrics(
    app: web.Application, registry: CollectorRegistry, ready: Callable[[], bool]
) -> None:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app[REGISTRY_KEY] = registry
    add_health(app, ready)
    app.router.add_get("/metrics", metrics)


def management_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> web.Application:
    """The management listener's app: ``/health`` and ``/metrics`` (pass it to ``run_sites(admin=)``)."""
    app = web.Application(client_max_size=1024)
    add_health_and_metrics(app, registry, ready)
    return app


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


def peer_ssl_object(request: web.Request) -> ssl.SSLObject | None:
    """The request's TLS connection, for ``tls.peer_roles``/``tls.peer_addresses`` (None without TLS)."""
    transport = request.transport
    return transport.get_extra_info("ssl_object") if transport else None


def norm_ip(ip: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 (dual-stack sockets) becomes plain IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


def source_key(address: str) -> str:
    """What a per-source limit counts: the IPv4 address, or the /64 of an IPv6 address (one host
    usually holds a whole /64); an IPv4-mapped address counts as its IPv4; anything that is not an
    address counts as itself, bounded."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def in_networks(addr: str, nets: Sequence[Network]) -> bool:
    """True when ``addr`` is an IP address inside one of ``nets`` (False for anything else)."""
    if not nets or not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in nets)


class ConnectionLimiter:
    """Counts the open connections of one server (all its sites) and enforces the caps.

    Invariant: a slot of ``slots`` (and, unless exempt, one of its source in ``sources``) is taken
    at accept and given back exactly once, at close, whatever stage (TLS handshake, request,
    idle) the connection reached. With the shared counters of a service's workers
    (gatehouse.shared) both caps hold across the workers; ``open`` is this process's.
    """

    def __init__(
        self,
        limits: HttpLimits,
        name: str = "public",
        slots: Slots | None = None,
        sources: SourceSlots | None = None,
    ) -> None:
        self.limits = limits
        self.name = name
        self.slots: Slots = slots if slots is not None else LocalSlots()
        self.sources: SourceSlots = sources if sources is not None else LocalSourceSlots()
        self.open = 0
        self.refused = {"max_connections": 0, "max_connections_per_source": 0}
        self.timed_out = 0

    def _exempt(self, source: str) -> bool:
        return in_networks(source, self.limits.trusted_proxies)

    def admit(self, source: str) -> bool:
        """Take a slot for a connection from ``source``; False (and counted) when a cap is reached."""
        if not self.slots.take(self.limits.max_connections):
            self.refused["max_connections"] += 1
            return False
        if not self._exempt(source) and not self.sources.take(source, self.limits.max_connections_per_source):
            self.slots.give()
            self.refused["max_connections_per_source"] += 1
            return False
        self.open += 1
        return True

    def release(self, source: str) -> None:
        self.open -= 1
        self.slots.give()
        if not self._exempt(source):
            self.sources.give(source)


class _LimiterCollector(Collector):
    def __init__(self, limiters: Sequence[ConnectionLimiter]) -> None:
        self.limiters = limiters

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        open_ = GaugeMetricFamily(
            "gatehouse_http_connections_open", "Open HTTP connections", labels=["listener"]
        )
        refused = CounterMetricFamily(
            "gatehouse_http_connections_refused",
            "Connections closed at accept by a connection cap",
            labels=["listener", "limit"],
        )
        timed_out = CounterMetricFamily(
            "gatehouse_http_request_timeouts",
            "Connections aborted for not delivering a request within RequestTimeout",
            labels=["listener"],
        )
        for lim in self.limiters:
            open_.add_metric([lim.name], lim.open)
            for limit, count in lim.refused.items():
                refused.add_metric([lim.name, limit], count)
            timed_out.add_metric([lim.name], lim.timed_out)
        yield open_
        yield refused
        yield timed_out


class _Guard(asyncio.Protocol):
    """Owns one accepted connection for aiohttp's request handler: the slot and the request deadline.

    The slot was taken at accept (:class:`_GuardedServer`); a timer aborts the connection at
    accept time + ``RequestTimeout`` until its first request has started (the body deadline is
    then enforced by :func:`_body_deadline`). The aiohttp handler (``inner``) is created when the
    (TLS) transport is up and sees every callback through the guard, so the slot is given back
    exactly once, in ``connection_lost`` or :meth:`gone` when the handshake never completed.
    """

    def __init__(self, limiter: ConnectionLimiter, factory: Callable[[], Any], source: str) -> None:
        self.limiter = limiter
        self.factory = factory
        self.source = source
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.BaseTransport | None = None
        self.inner: Any = None
        self.admitted = True
        self.deadline = self.loop.time() + limiter.limits.request_timeout
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(self.deadline, self._expire)
        self.starting: asyncio.Task[Any] | None = None  # the handshake, until connection_made
        self.first_request = True
        self.idle = False  # between a response and the next request's first byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.starting = None
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self.timer = None
        self.limiter.timed_out += 1
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        elif self.starting is not None:
            self.starting.cancel()  # still in the TLS handshake: the loop closes the socket

    def request_started(self) -> float:
        """A request's headers are in: stop the request timer; the body's deadline is returned."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.idle = False
        if self.first_request:
            self.first_request = False
            return self.deadline
        # A later request that arrived while the previous one was in flight (pipelined) got no
        # deadline at its first byte (see data_received): it gets one now.
        now = self.loop.time()
        return self.deadline if self.deadline > now else now + self.limiter.limits.request_timeout

    def request_done(self) -> None:
        """The response is out: the connection is idle (aiohttp's KeepAliveTimeout runs) until the
        next request's first byte, which starts a new RequestTimeout."""
        self.idle = True

    def gone(self) -> None:
        """Give the slot back (idempotent)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted:
            self.admitted = False
            self.limiter.release(self.source)

    # asyncio.Protocol, forwarded to aiohttp's handler.
    def data_received(self, data: bytes) -> None:
        if self.idle and self.timer is None:
            # The first byte of a kept-alive connection's next request: it gets RequestTimeout to
            # arrive whole, however long the connection was idle before.
            self.idle = False
            self.deadline = self.loop.time() + self.limiter.limits.request_timeout
            self.timer = self.loop.call_at(self.deadline, self._expire)
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()  # type: ignore[no-any-return]
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        inner = self.inner
        self.gone()
        if inner is not None:
            inner.connection_lost(exc)


class _GuardedServer:
    """Accepts on the site's sockets itself, so the caps apply before any TLS work is done.

    An admitted socket is handed to ``loop.connect_accepted_socket`` with the site's TLS context:
    the TLS layer is the event loop's own (uvloop's native one), with the handshake bounded by
    what is left of ``RequestTimeout``. A socket over a cap is reset at once.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        limiter: ConnectionLimiter,
        factory: Callable[[], Any],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.sockets = sockets
        self.limiter = limiter
        self.factory = factory
        self.ssl_context = ssl_context
        self.loop = asyncio.get_running_loop()
        self.tasks = [self.loop.create_task(self._accept(sock)) for sock in sockets]
        self.starting: set[asyncio.Task[Any]] = set()

    async def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = await self.loop.sock_accept(sock)
            except OSError as exc:
                # EMFILE and friends: the process is out of descriptors; back off instead of spinning.
                log.warning("accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            source = str(addr[0]) if addr else ""
            if not self.limiter.admit(source):
                # RST, not FIN: nothing to drain, and no TIME_WAIT kept for the refused peer.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            guard = _Guard(self.limiter, self.factory, source)
            task = self.loop.create_task(self._start(conn, guard))
            if guard.transport is None:
                guard.starting = task
            self.starting.add(task)
            task.add_done_callback(self.starting.discard)

    async def _start(self, conn: socket.socket, guard: _Guard) -> None:
        try:
            if self.ssl_context is None:
                await self.loop.connect_accepted_socket(lambda: guard, conn)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: guard,
                    conn,
                    ssl=self.ssl_context,
                    # A backstop only: the guard's timer ends a slow handshake at the deadline
                    # (and counts it); at the same deadline the two would race.
                    ssl_handshake_timeout=max(0.1, guard.deadline - self.loop.time()) + HANDSHAKE_BACKSTOP,
                )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError, EOFError):
            # Failed, timed out or aborted in the handshake: routine for a public port.
            if guard.transport is None:
                conn.close()
                guard.gone()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()


@web.middleware
async def _body_deadline(request: web.Request, handler: Any) -> web.StreamResponse:
    """Middleware: the request body must be complete by the guard's deadline, or the connection dies.

    The guard is the protocol of the request's transport (aiohttp's handler sits behind it). It
    waits for the body without consuming it (handlers read ``request.content`` themselves);
    bodies are small (the apps' ``client_max_size``), well inside aiohttp's read buffer, so the
    wait cannot stall on flow control for a legitimate request.
    """
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, _Guard) or not guard.admitted:
        return await handler(request)  # type: ignore[no-any-return]
    until = guard.request_started()
    declared = request.content_length
    # A body over the read buffer is not waited for: the handler refuses it by its length (413)
    # without reading, and aiohttp's lingering close bounds the rest.
    if (
        (declared is None or declared <= BODY_WAIT_LIMIT)
        and request.can_read_body
        and not request.content.is_eof()
    ):
        try:
            async with asyncio.timeout(max(0.0, until - guard.loop.time())):
                await request.content.wait_eof()
        except TimeoutError:
            guard.limiter.timed_out += 1
            guard.abort()
            raise web.HTTPRequestTimeout() from None
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        guard.request_done()


class _GuardedSite(web.TCPSite):
    __slots__ = ("_limiter", "_sockets")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limiter: ConnectionLimiter,
        sockets: list[socket.socket] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(runner, host, port, **kw)
        self._limiter = limiter
        self._sockets = sockets  # made already (a worker's own of its SO_REUSEPORT group)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        sockets = self._sockets or _listen(self._host, self._port, self._backlog)
        self._server = _GuardedServer(sockets, self._limiter, server, self._ssl_context)  # type: ignore[assignment]
        self._bound_port = sockets[0].getsockname()[1]


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (as ``loop.create_server`` binds)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _start_runner(
    app: web.Application,
    sites: Iterable[tuple[str, int, ssl.SSLContext | None]],
    limits: HttpLimits | None,
    shutdown_timeout: float,
    name: str,
    listeners: Listeners | None = None,
    slots: Slots | None = None,
    sources: SourceSlots | None = None,
) -> tuple[web.AppRunner, ConnectionLimiter | None]:
    kwargs: dict[str, Any] = {}
    limiter = None
    if limits is not None:
        limiter = ConnectionLimiter(limits, name, slots, sources)
        kwargs["keepalive_timeout"] = limits.keepalive_timeout
        app.middlewares.insert(0, _body_deadline)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=shutdown_timeout, handle_signals=False, **kwargs
    )
    await runner.setup()
    for host, port, ctx in sites:
        site: web.TCPSite
        if limiter is not None:
            # Thousands of clients can arrive at once (a HALB failover): a short accept queue resets them.
            site = _GuardedSite(
                runner,
                host,
                port,
                limiter,
                (listeners or {}).get((host, port)),
                ssl_context=ctx,
                backlog=4096,
                reuse_address=True,
            )
        else:
            site = web.TCPSite(runner, host, port, ssl_context=ctx, backlog=4096, reuse_address=True)
        await site.start()
    return runner, limiter


async def run_sites(
    app: web.Application,
    sites: Iterable[tuple[str, int, ssl.SSLContext | None]],
    *,
    shutdown_timeout: float = 10.0,
    started: Callable[[], None] | None = None,
    limits: HttpLimits | None = None,
    admin: web.Application | None = None,
    listeners: Listeners | None = None,
    slots: Slots | None = None,
    sources: SourceSlots | None = None,
    admin_path: str = "",
) -> None:
    """Serve ``app`` on each (host, port, ssl) until SIGTERM/SIGINT, then stop accepting and drain.

    With ``limits`` the connection caps and deadlines apply (see the module docstring); with
    ``admin`` (see :func:`management_app`) and ``limits.admin_port`` the management listener runs
    too, with its own connection budget, and the connection metrics are added to its registry.
    Without ``limits`` the behaviour is the historical one (no caps).

    As a worker of a supervisor (gatehouse.workers): ``listeners`` are its own sockets by (host,
    port), ``slots`` and ``sources`` the MaxConnections and MaxConnectionsPerSource counts of all
    workers, and ``admin`` is served on the
    Unix socket ``admin_path`` (the supervisor serves AdminPort).
    """
    runner, limiter = await _start_runner(
        app, sites, limits, shutdown_timeout, "public", listeners, slots, sources
    )
    runners = [runner]
    if admin is not None and admin_path:
        admin_runner = web.AppRunner(
            admin, access_log=None, shutdown_timeout=shutdown_timeout, handle_signals=False
        )
        await admin_runner.setup()
        await web.UnixSite(admin_runner, admin_path).start()
        runners.append(admin_runner)
        registry = admin.get(REGISTRY_KEY)
        if registry is not None and limiter is not None:
            registry.register(_LimiterCollector([limiter]))
    elif admin is not None and limits is not None and limits.admin_port:
        # Its own small budget: a flood of the public port cannot take the management port's slots.
        admin_limits = dataclasses.replace(
            limits, max_connections=64, max_connections_per_source=64, trusted_proxies=()
        )
        admin_runner, admin_limiter = await _start_runner(
            admin, [(limits.admin_address, limits.admin_port, None)], admin_limits, shutdown_timeout, "admin"
        )
        runners.append(admin_runner)
        registry = admin.get(REGISTRY_KEY)
        if registry is not None:
            registry.register(_LimiterCollector([lim for lim in (limiter, admin_limiter) if lim is not None]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if started:
        started()
    await stop.wait()
    log.info("stopping: no new connections, draining requests in flight")
    for r in runners:
        await r.cleanup()
