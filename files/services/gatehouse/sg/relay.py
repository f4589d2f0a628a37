"""The SG's TCP side: check the client's grant, open TLS to the agent, relay both ways.

Each side is a :class:`~gatehouse.sg.tlsconn.TlsConn` with a Protocol-style handler, so that an
idle session costs two TLS connections and two small objects. A client slot is taken right after
the TLS handshake and given back on close or refusal; the CONNECT line must arrive within
LINE_TIMEOUT so that idle connections cannot pin slots. Nothing reaches an agent before the grant
is authenticated, unexpired, bound to this client address and seen for the first time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from gatehouse.grant import Grant, GrantError, GrantSealer, ReplayCache
from gatehouse.linechan import (
    BAD_GATEWAY,
    BUSY,
    FORBIDDEN,
    MAX_LINE,
    OK,
    LineError,
    connect_line,
    parse_connect_line,
)
from gatehouse.logs import SessionLogger
from gatehouse.sg.settings import AGENT_TIMEOUT, LINE_TIMEOUT, SHUTDOWN_GRACE, SgSettings
from gatehouse.sg.stats import Stats
from gatehouse.sg.tlsconn import TlsConn, open_tls
from gatehouse.sg.udp_table import UdpSession, UdpTable
from gatehouse.tls import CertificateError, check_peer

log = logging.getLogger("gatehouse.sg")

MAX_EARLY_DATA = 64 * 1024  # bytes a client may send before our "200 OK" (kept for the agent)
MAX_AGENT_LINE = 256

_LINE, _CONNECTING, _RELAY, _CLOSED = range(4)


class AgentRefused(Exception):
    """The agent answered something other than ``200 OK`` to our CONNECT line."""


class Gateway:
    """State shared by every session: settings, grant checks, counters, the UDP table."""

    def __init__(
        self, settings: SgSettings, agent_ctx: ssl.SSLContext, stats: Stats, udp_table: UdpTable
    ) -> None:
        self.settings = settings
        self.agent_ctx = agent_ctx
        self.stats = stats
        self.udp_table = udp_table
        self.sealer = GrantSealer(settings.grant_secret)
        self.replay = ReplayCache()
        self.sessions: set[ClientSide] = set()
        self.accepting = True
        self.drained = asyncio.Event()

    def handler(self) -> ClientSide:
        return ClientSide(self)

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
        "counted",
        "down",
        "gw",
        "slog",
        "state",
        "task",
        "timer",
        "udp",
        "up",
    )

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.conn: TlsConn | None = None
        self.agent: AgentSide | None = None
        self.state = _LINE
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.slog: SessionLogger | None = None
        self.udp: UdpSession | None = None
        self.counted: str | None = None  # which gauge this session is counted in
        self.up = 0
        self.down = 0

    @property
    def client_ip(self) -> str:
        return self.conn.peer[0] if self.conn else ""

    # ------------------------------------------------------------ client connection callbacks

    def connection_made(self, conn: TlsConn) -> None:
        self.conn = conn
        gw = self.gw
        if not gw.accepting or len(gw.sessions) >= gw.settings.max_connections:
            gw.stats.refused["busy"] += 1
            log.warning("refused: MaxConnections reached", extra={"client": self.client_ip, "reason": "busy"})
            self.state = _CLOSED
            conn.write(BUSY)
            conn.close()
            return
        gw.sessions.add(self)
        gw.stats.establishing += 1
        self.counted = "establishing"
        self.timer = conn.loop.call_later(LINE_TIMEOUT, self._line_timeout)

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
        if self.agent and self.agent.conn:
            self.agent.conn.close()
        if was == _RELAY and self.slog:
            self.slog.info("session closed", extra={"bytes_to_agent": self.up, "bytes_to_client": self.down})
        elif was == _LINE:
            log.debug("client left before its CONNECT line", extra={"client": self.client_ip})

    def handshake_failed(self, conn: TlsConn, exc: BaseException | None) -> None:
        # Scanners and old clients (TLS < 1.2, other ciphers) end here; no slot was taken.
        self.gw.stats.refused["tls-handshake"] += 1
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.info("TLS handshake failed: %s", reason, extra={"client": conn.peer[0]})

    def _release(self) -> None:
        """Give the slot back (idempotent): on close, and at once on a refusal."""
        gw = self.gw
        if self.counted == "active":
            gw.stats.active -= 1
        elif self.counted == "establishing":
            gw.stats.establishing -= 1
        self.counted = None
        gw.sessions.discard(self)
        if not gw.accepting and not gw.sessions:
            gw.drained.set()
        if self.udp:
            gw.udp_table.remove(self.udp)
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
            grant = gw.sealer.open(tag, self.client_ip)
        except GrantError as exc:
            self._refuse(exc.reason)
            return
        if not gw.replay.accept(grant):
            self._refuse("replayed", grant.session_id)
            return
        self.slog = SessionLogger(log, grant.session_id)
        self.state = _CONNECTING
        assert self.conn is not None
        self.conn.pause_reading()
        self.task = self.conn.loop.create_task(self._connect(grant))

    def _refuse(self, reason: str, session_id: str | None = None) -> None:
        """403 and close; the log names the reason and the client, never the grant."""
        self.gw.stats.refused[reason] += 1
        extra: dict[str, Any] = {"client": self.client_ip, "reason": reason}
        if session_id:
            extra["session_id"] = session_id
        log.warning("refused: %s", reason, extra=extra)
        self.state = _CLOSED
        self._release()
        assert self.conn is not None
        self.conn.write(FORBIDDEN)
        self.conn.close()

    def _fail(self, reason: str, message: str) -> None:
        """The grant was good but the relay cannot be set up: 502 and close both sides."""
        self.gw.stats.refused[reason] += 1
        if self.slog:
            self.slog.warning("relay failed: %s", message, extra={"client": self.client_ip, "reason": reason})
        self.state = _CLOSED
        self._release()
        if self.agent and self.agent.conn:
            self.agent.conn.abort()
        if self.conn:
            self.conn.write(BAD_GATEWAY)
            self.conn.close()

    # ------------------------------------------------------------ the agent

    async def _connect(self, grant: Grant) -> None:
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
        self._start_relay(grant, agent, early)

    def _start_relay(self, grant: Grant, agent: AgentSide, early: bytes) -> None:
        gw = self.gw
        assert self.conn is not None and agent.conn is not None
        self.state = _RELAY
        gw.stats.establishing -= 1
        gw.stats.active += 1
        gw.stats.accepted += 1
        self.counted = "active"
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
        agent.relaying = True
        agent.conn.resume_reading()
        self.conn.resume_reading()
        self.udp = UdpSession(grant.session_id, self.client_ip, (agent.conn.peer[0], grant.agent_port))
        gw.udp_table.add(self.udp)
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

    def handshake_failed(self, conn: TlsConn, exc: BaseException | None) -> None:
        self.connection_lost(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ready.done():
            if isinstance(exc, OSError):
                self.ready.set_exception(exc)
            else:
                self.ready.set_exception(ConnectionResetError("the agent closed the connection"))
        elif self.relaying:
            self.client.agent_closed()
