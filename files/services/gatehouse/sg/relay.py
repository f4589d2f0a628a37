"""The SG's TCP side: check the client's grant, open TLS to the agent, relay both ways.

Each side is a :class:`~gatehouse.sg.tlsconn.TlsConn` with a Protocol-style handler, so that an
idle session costs two TLS connections and two small objects.

Admission: a client connection counts against MaxConnections and MaxConnectionsPerSource from
accept (before its TLS handshake) until its socket is closed; over either limit it is closed at
accept, before any TLS work. The TLS handshake and the CONNECT line must both arrive within
RequestTimeout of accept, so that idle or slow sockets cannot pin slots. Refusals are counted in
full and logged at a bounded rate. Nothing reaches an agent before the grant is authenticated,
unexpired, bound to this client address and seen for the first time, and the agent's
certificate is verified (AgentCaCert, its address) before the agent's session-tag is sent.

Through a forwarder of a double-hop DMZ (ProxyProtocolSources, docs/dmz.md) the client address
is the one its PROXY v2 header names (read by the listener before the TLS handshake): admission,
the per-source count, the grant's client check, the UDP bind and the logs all use it, and the
connection is admitted when the header has arrived (within RequestTimeout of accept).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from gatehouse.config import ConfigError
from gatehouse.grant import Grant, GrantError, GrantSealer, ReplayCache
from gatehouse.linechan import (
    BAD_GATEWAY,
    FORBIDDEN,
    MAX_LINE,
    OK,
    LineError,
    connect_line,
    parse_connect_line,
)
from gatehouse.logs import SessionLogger
from gatehouse.sg.settings import AGENT_TIMEOUT, REFUSAL_LOG_RATE, SHUTDOWN_GRACE, SgSettings, read_tenants
from gatehouse.sg.shared import ReplayTableFull, SharedState
from gatehouse.sg.stats import Refusals, Stats
from gatehouse.sg.tlsconn import TlsConn, open_tls
from gatehouse.sg.udp import UdpRelay
from gatehouse.sg.udp_table import UdpSession
from gatehouse.tenants import SNI_ATTRIBUTE, ServerNames, Tenants, TenantsError
from gatehouse.tls import CertificateError, check_peer
from gatehouse.web import source_key

log = logging.getLogger("gatehouse.sg")

MAX_EARLY_DATA = 64 * 1024  # bytes a client may send before our "200 OK" (kept for the agent)
MAX_AGENT_LINE = 256

_LINE, _CONNECTING, _RELAY, _CLOSED = range(4)


class AgentRefused(Exception):
    """The agent answered something other than ``200 OK`` to our CONNECT line."""


class Gateway:
    """State shared by every session: settings, grant checks, counters, admission, the UDP relay."""

    def __init__(
        self,
        settings: SgSettings,
        agent_ctx: ssl.SSLContext,
        stats: Stats,
        udp: UdpRelay,
        server_names: ServerNames | None = None,
        shared: SharedState | None = None,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        # Workers > 1 (workers.py): MaxConnections and the once-only grants are counted in the
        # state all workers share; this worker is number ``worker``. None: one process, as is.
        self.shared = shared
        self.worker = worker
        self.server_names = server_names  # the client-facing TLS server name callback
        self.agent_ctx = agent_ctx
        self.stats = stats
        self.udp = udp
        # The refusal log's rate (REFUSAL_LOG_RATE a second and reason) is shared out among the
        # workers, so that all of them together log no more than one process would.
        workers = shared.workers if shared is not None else 1
        self.refusals = Refusals(stats, log, rate=max(1, REFUSAL_LOG_RATE // workers))
        self.sealer = GrantSealer(settings.grant_secret, settings.site)
        # With tenants: the tenants and each one's sealer (its own derived key); see open_grant.
        self.tenants: Tenants = settings.tenants
        self.tenant_sealers: dict[str, GrantSealer] = {}
        self.set_tenants(settings.tenants)
        self.replay = ReplayCache()
        self.sessions: set[ClientSide] = set()  # past the TLS handshake
        self.per_source: dict[str, int] = {}  # open connections per source_key()
        self.accepting = True
        self.drained = asyncio.Event()

    def set_tenants(self, tenants: Tenants) -> None:
        """Serve ``tenants`` from now on (sessions already relaying are not affected)."""
        self.tenant_sealers = {
            t.name: self.tenant_sealers.get(t.name)
            or GrantSealer(self.settings.grant_secret, self.settings.site, tenant=t.name)
            for t in tenants.tenants
        }
        self.tenants = tenants

    def reload_tenants(self) -> bool:
        """Read TenantsFile again (SIGHUP); a file that cannot be used changes nothing (logged)."""
        if not self.settings.tenants_file:
            log.warning("SIGHUP: no TenantsFile is configured; nothing to reload")
            return False
        try:
            tenants = read_tenants(self.settings.tenants_file)
            contexts = self.server_names.contexts_for(tenants) if self.server_names else None
        except (ConfigError, TenantsError) as exc:
            log.error("tenants not reloaded, the current ones stay: %s", exc)
            return False
        self.set_tenants(tenants)
        if self.server_names is not None and contexts is not None:
            self.server_names.use(contexts)
        log.info("tenants reloaded", extra={"tenants": ",".join(t.name for t in tenants.tenants)})
        return True

    def open_grant(self, tag: str, client_ip: str, server_name: str | None) -> Grant:
        """The checked grant of a CONNECT line; raises GrantError.

        Without tenants: the SG's own key. With tenants: the TLS server name (SNI) must be a
        tenant's host name (``unknown-tenant``), the grant that tenant's (``wrong-tenant``: a
        grant minted for another tenant, or none), and its agent within the tenant's
        agent_networks (``wrong-tenant-agent``).
        """
        if not self.settings.tenants_file:
            return self.sealer.open(tag, client_ip)
        tenant = self.tenants.by_host(server_name)
        sealer = self.tenant_sealers.get(tenant.name) if tenant is not None else None
        if tenant is None or sealer is None:
            raise GrantError("unknown-tenant")
        grant = sealer.open(tag, client_ip)
        if not tenant.owns_agent(grant.agent_host):
            raise GrantError("wrong-tenant-agent")
        return grant

    def accept_grant(self, grant: Grant) -> bool:
        """Whether ``grant`` is presented for the first time (in any worker); raises GrantError."""
        if self.shared is None:
            return self.replay.accept(grant)
        try:
            return self.shared.accept_grant(grant)
        except ReplayTableFull:
            raise GrantError("replay-cache-full") from None

    def _take_slot(self) -> bool:
        """One connection more against MaxConnections (across workers), if below it."""
        if self.shared is None:
            return self.stats.open < self.settings.max_connections
        return self.shared.take_slot(self.worker, self.settings.max_connections)

    def give_slot(self) -> None:
        if self.shared is not None:
            self.shared.give_slot(self.worker)

    def handler(self, peer: tuple[str, int]) -> ClientSide | None:
        """Admit a connection at accept (counted from here), or None to close it at once."""
        stats = self.stats
        settings = self.settings
        if not self.accepting or not self._take_slot():
            self.refusals.refuse("busy", peer[0], logging.WARNING, "refused: MaxConnections reached")
            return None
        source = source_key(peer[0])
        count = self.per_source.get(source, 0)
        if count >= settings.max_connections_per_source:
            self.give_slot()
            self.refusals.refuse(
                "per-source", peer[0], logging.WARNING, "refused: MaxConnectionsPerSource reached"
            )
            return None
        self.per_source[source] = count + 1
        stats.open += 1
        stats.handshaking += 1
        loop = asyncio.get_running_loop()
        return ClientSide(self, source, loop.time() + settings.request_timeout)

    async def close_all(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Close every session (TLS close_notify to both peers), abort what is left after ``grace``."""
        self.accepting = False
        for session in list(self.sessions):
            session.close(grace)
        if self.sessions:
            try:
                await asyncio.wait_for(self.drained.wait(), grace)
            except TimeoutError:
                pass
        for session in list(self.sessions):
            session.abort()


class ClientSide:
    __slots__ = (
        "agent",
        "buf",
        "conn",
        "deadline",
        "down",
        "gw",
        "slog",
        "source",
        "state",
        "task",
        "timer",
        "udp",
        "up",
    )

    def __init__(self, gw: Gateway, source: str, deadline: float) -> None:
        self.gw = gw
        self.source: str | None = source  # None once the connection is no longer counted
        self.deadline = deadline  # loop time by which the CONNECT line must have arrived
        self.conn: TlsConn | None = None
        self.agent: AgentSide | None = None
        self.state = _LINE
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.slog: SessionLogger | None = None
        self.udp: UdpSession | None = None  # from the relay start until release
        self.up = 0
        self.down = 0

    @property
    def client_ip(self) -> str:
        return self.conn.peer[0] if self.conn else ""

    @property
    def server_name(self) -> str | None:
        """The name the client asked for in its TLS handshake (SNI; see ServerNames), or None."""
        return getattr(self.conn.sock, SNI_ATTRIBUTE, None) if self.conn else None

    # ------------------------------------------------------------ client connection callbacks

    def connection_made(self, conn: TlsConn) -> None:
        self.conn = conn
        gw = self.gw
        gw.stats.handshaking -= 1
        if not gw.accepting:  # SIGTERM arrived during the handshake
            self.state = _CLOSED
            conn.close()
            return
        gw.sessions.add(self)
        # One deadline from accept for the handshake and the line together.
        self.timer = conn.loop.call_at(self.deadline, self._line_timeout)

    def data_received(self, data: memoryview) -> None:
        if self.state == _RELAY:
            agent = self.agent
            assert agent is not None and agent.conn is not None
            self.up += len(data)
            self.gw.stats.bytes_to_agent += len(data)
            agent.conn.write(data)
        elif self.state == _LINE:
            self.buf += data
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > MAX_LINE:
                    self._refuse("malformed")
                return
            line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
            self._on_line(line)
        elif self.state == _CONNECTING:
            self.buf += data
            if len(self.buf) > MAX_EARLY_DATA:
                self._fail("early-data", "client sent too much before the relay was up")

    def pause_writing(self) -> None:
        if self.agent and self.agent.conn:
            self.agent.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.agent and self.agent.conn and self.state == _RELAY:
            self.agent.conn.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        was = self.state
        self.state = _CLOSED
        if self.timer:
            self.timer.cancel()
        if self.task and not self.task.done():
            self.task.cancel()
        self._release()
        self._forget()
        if self.agent and self.agent.conn:
            self.agent.conn.close()
        if was == _RELAY and self.slog:
            self.slog.info("session closed", extra={"bytes_to_agent": self.up, "bytes_to_client": self.down})
        elif was == _LINE:
            log.debug("client left before its CONNECT line", extra={"client": self.client_ip})

    def handshake_failed(self, conn: TlsConn | None, exc: BaseException | None) -> None:
        # Scanners, old clients (TLS < 1.2, other ciphers) and idle sockets end here.
        self.gw.stats.handshaking -= 1
        self._forget()
        client = conn.peer[0] if conn else ""
        if isinstance(exc, TimeoutError):
            self.gw.refusals.refuse(
                "timeout", client, logging.INFO, "refused: no TLS handshake within RequestTimeout"
            )
            return
        detail = getattr(exc, "reason", None) or type(exc).__name__
        self.gw.refusals.refuse("tls-handshake", client, logging.INFO, "TLS handshake failed: %s", detail)

    def _forget(self) -> None:
        """The socket is closed: it no longer counts against the connection limits (idempotent)."""
        source = self.source
        if source is None:
            return
        self.source = None
        gw = self.gw
        gw.stats.open -= 1
        gw.give_slot()
        left = gw.per_source[source] - 1
        if left:
            gw.per_source[source] = left
        else:
            del gw.per_source[source]

    def _release(self) -> None:
        """Give the slot back (idempotent): on close, and at once on a refusal."""
        gw = self.gw
        if self not in gw.sessions:
            return
        gw.sessions.remove(self)
        if self.agent is not None and self.agent.relaying:
            gw.stats.active -= 1
        if not gw.accepting and not gw.sessions:
            gw.drained.set()
        if self.udp:
            gw.udp.remove(self.udp)
            self.udp = None

    # ------------------------------------------------------------ the grant

    def _line_timeout(self) -> None:
        if self.state == _LINE:
            self._refuse("timeout")

    def _on_line(self, line: bytes) -> None:
        if self.timer:
            self.timer.cancel()
        gw = self.gw
        try:
            tag = parse_connect_line(line)
        except LineError:
            self._refuse("malformed")
            return
        try:
            grant = gw.open_grant(tag, self.client_ip, self.server_name)
            first = gw.accept_grant(grant)
        except GrantError as exc:
            self._refuse(exc.reason)
            return
        if not first:
            self._refuse("replayed", grant.session_id)
            return
        self.slog = SessionLogger(log, grant.session_id)
        self.state = _CONNECTING
        assert self.conn is not None
        self.conn.pause_reading()
        self.task = self.conn.loop.create_task(self._connect(grant, tag))

    def _refuse(self, reason: str, session_id: str | None = None) -> None:
        """403 and close; the log names the reason and the client, never the grant."""
        fields = {"session_id": session_id} if session_id else {}
        self.gw.refusals.refuse(reason, self.client_ip, logging.WARNING, "refused: %s", reason, **fields)
        self.state = _CLOSED
        self._release()
        assert self.conn is not None
        self.conn.write(FORBIDDEN)
        self.conn.close()

    def _fail(self, reason: str, message: str) -> None:
        """The grant was good but the relay cannot be set up: 502 and close both sides."""
        self.gw.refusals.refuse(
            reason, self.client_ip, logging.WARNING, "relay failed: %s", message, logger=self.slog
        )
        self.state = _CLOSED
        self._release()
        if self.agent and self.agent.conn:
            self.agent.conn.abort()
        if self.conn:
            self.conn.write(BAD_GATEWAY)
            self.conn.close()

    # ------------------------------------------------------------ the agent

    async def _connect(self, grant: Grant, tag: str) -> None:
        loop = asyncio.get_running_loop()
        where = f"{grant.agent_host}:{grant.agent_port}"
        agent = AgentSide(self, loop, grant.session_tag, f"agent {where}")
        self.agent = agent
        try:
            async with asyncio.timeout(AGENT_TIMEOUT):
                agent.conn = await open_tls(
                    grant.agent_host, grant.agent_port, self.gw.agent_ctx, agent, AGENT_TIMEOUT
                )
                early = await agent.ready
        except CertificateError as exc:
            self._fail("agent-certificate", str(exc))
            return
        except AgentRefused:
            self._fail("agent-refused", f"agent {where} refused the session")
            return
        except TimeoutError:
            self._fail("agent-timeout", f"agent {where} did not answer within {AGENT_TIMEOUT:.0f}s")
            return
        except OSError as exc:
            self._fail("agent-unreachable", f"cannot reach agent {where}: {type(exc).__name__}")
            return
        except asyncio.CancelledError:
            if agent.conn:
                agent.conn.abort()
            raise
        if self.state != _CONNECTING or self.conn is None or not self.conn.is_open:
            if agent.conn:
                agent.conn.close()
            return
        self._start_relay(grant, tag, agent, early)

    def _start_relay(self, grant: Grant, tag: str, agent: AgentSide, early: bytes) -> None:
        gw = self.gw
        assert self.conn is not None and agent.conn is not None
        self.state = _RELAY
        agent.relaying = True  # counted as active from here on (see _release)
        gw.stats.active += 1
        gw.stats.accepted += 1
        self.conn.write(OK)
        early, agent.buf = early + agent.buf, b""
        if early:
            self.down += len(early)
            gw.stats.bytes_to_client += len(early)
            self.conn.write(early)
        if self.buf:
            self.up += len(self.buf)
            gw.stats.bytes_to_agent += len(self.buf)
            agent.conn.write(self.buf)
            self.buf = b""
        if self.state != _RELAY or not agent.conn.is_open:
            return  # a write above found a side gone (e.g. a reset client): it is closing, no UDP path
        agent.conn.resume_reading()
        self.conn.resume_reading()
        # In the loop turn that wrote "200 OK": the client's bind datagram cannot arrive earlier.
        local_ip = agent.conn.sock.getsockname()[0]
        agent_addr = (agent.conn.peer[0], grant.agent_port)
        self.udp = gw.udp.open(grant.session_id, self.client_ip, tag, local_ip, agent_addr)
        if self.slog:
            self.slog.info(
                "relaying",
                extra={"client": self.client_ip, "agent": f"{grant.agent_host}:{grant.agent_port}"},
            )

    def agent_closed(self) -> None:
        if self.conn:
            self.conn.close()

    # ------------------------------------------------------------ shutdown

    def close(self, timeout: float = SHUTDOWN_GRACE) -> None:
        if self.conn:
            self.conn.close(timeout)
        if self.agent and self.agent.conn:
            self.agent.conn.close(timeout)

    def abort(self) -> None:
        if self.agent and self.agent.conn:
            self.agent.conn.abort()
        if self.conn:
            self.conn.abort()


class AgentSide:
    __slots__ = ("buf", "client", "conn", "ready", "relaying", "tag", "what")

    def __init__(self, client: ClientSide, loop: asyncio.AbstractEventLoop, tag: str, what: str) -> None:
        self.client = client
        self.conn: TlsConn | None = None
        self.tag = tag
        self.what = what
        self.ready: asyncio.Future[bytes] = loop.create_future()
        # The connect task may be gone (client left) when the outcome arrives; mark it retrieved.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.relaying = False
        self.buf = b""

    def connection_made(self, conn: TlsConn) -> None:
        self.conn = conn
        try:
            # Weak agent keys are refused before the session-tag is sent.
            check_peer(conn.sock, self.what)
        except CertificateError as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            conn.abort()
            return
        conn.write(connect_line(self.tag))

    def data_received(self, data: memoryview) -> None:
        if self.relaying:
            client = self.client
            client.down += len(data)
            client.gw.stats.bytes_to_client += len(data)
            assert client.conn is not None
            client.conn.write(data)
            return
        self.buf += data
        if self.ready.done():
            return  # between the agent's OK and the relay start; reading is paused
        end = self.buf.find(b"\n")
        if end < 0:
            if len(self.buf) > MAX_AGENT_LINE:
                self.ready.set_exception(AgentRefused())
            return
        line, rest = self.buf[: end + 1], self.buf[end + 1 :]
        self.buf = b""
        assert self.conn is not None
        if line == OK:
            self.conn.pause_reading()
            self.ready.set_result(rest)
        else:
            self.ready.set_exception(AgentRefused())

    def pause_writing(self) -> None:
        if self.client.conn:
            self.client.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.client.conn and self.client.state == _RELAY:
            self.client.conn.resume_reading()

    def handshake_failed(self, conn: TlsConn | None, exc: BaseException | None) -> None:
        if isinstance(exc, ssl.SSLCertVerificationError) and not self.ready.done():
            # Not signed by AgentCaCert, not issued for the agent's address, expired, weak key.
            self.ready.set_exception(
                CertificateError(f"{self.what}: certificate refused: {exc.verify_message}")
            )
            return
        self.connection_lost(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ready.done():
            if isinstance(exc, OSError):
                self.ready.set_exception(exc)
            else:
                self.ready.set_exception(ConnectionResetError("the agent closed the connection"))
        elif self.relaying:
            self.client.agent_closed()
