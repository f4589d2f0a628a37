"""The SG's UDP relay: client ↔ SG:Port/udp, per-session SG:port ↔ agent session port.

Client side: one socket on Port. A datagram from an address bound to a session (see
udp_table.py) goes to that session's agent; anything else is a bind attempt or dropped and
counted by reason. Agent side: each relayed session has its own socket from its first accepted
bind until it ends (a session that never binds holds none), bound to a port of
AgentUdpSourcePort .. +AgentUdpPortCount-1 and connected to its agent, so the kernel delivers that
agent's replies to that socket only and they go back to that session's client address only.

Datagrams from a ProxyProtocolSources address (a forwarder, docs/dmz.md) must each start with a
PROXY v2 header naming the client; the rest is handled as if it came from that client, and
replies go back to the forwarder's socket, which it keeps for that client alone. A datagram from
such an address without a valid header is dropped (``proxy-malformed``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable

from gatehouse import linechan
from gatehouse.sg import _mmsg, proxyproto
from gatehouse.sg.stats import Stats
from gatehouse.sg.udp_table import Addr, UdpSession, UdpTable, forwarded_key

log = logging.getLogger("gatehouse.sg.udp")
# The default socket buffer (about 200 KiB, ~90 datagrams) overflows whenever the loop is busy
# for a millisecond at high rates; the kernel caps the request at net.core.[rw]mem_max.
SOCKET_BUFFER = 4 * 1024 * 1024
SESSION_BUFFER = 1024 * 1024  # per-session agent-side socket: one session's burst
MAX_DATAGRAM = 65535
_BIND_ATTEMPTS = 64  # ports tried per session before giving up (others may hold some of the range)
_TRUST_CACHE = 4096  # source addresses whose ProxyProtocolSources membership is remembered


def _set_buffers(sock: socket.socket, size: int) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError as exc:  # a smaller buffer still works
            log.debug("cannot set the UDP socket buffer: %s", exc)


class PortPool:
    """Agent-side source ports, handed out oldest-freed first so a port is reused as late as possible
    (a late reply to a closed session must not reach the next session on that port)."""

    def __init__(self, ports: range, start: int = 0) -> None:
        self.size = len(ports)
        self.free: deque[int] = deque(ports)
        # Workers > 1 share the range: each starts at its own offset (EADDRINUSE moves on).
        self.free.rotate(-start)

    def in_use(self) -> int:
        return self.size - len(self.free)

    def open(self, bind_ip: str, agent_addr: tuple[str, int]) -> tuple[socket.socket, int] | None:
        family = socket.AF_INET6 if ":" in agent_addr[0] else socket.AF_INET
        for _attempt in range(min(_BIND_ATTEMPTS, len(self.free))):
            port = self.free.popleft()
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((bind_ip, port))
                sock.connect(agent_addr)  # the kernel drops datagrams from anyone but this agent
            except OSError as exc:
                sock.close()
                self.free.append(port)
                if exc.errno == errno.EADDRINUSE:
                    continue  # another process holds this one; try the next
                raise
            _set_buffers(sock, SESSION_BUFFER)
            return sock, port
        return None

    def release(self, port: int) -> None:
        self.free.append(port)


class UdpRelay:
    def __init__(
        self,
        table: UdpTable,
        stats: Stats,
        ports: range,
        proxy_source: Callable[[str], bool] | None = None,
        pool_start: int = 0,
    ) -> None:
        self.table = table
        self.stats = stats
        self.pool = PortPool(ports, pool_start)
        self.proxy_source = proxy_source  # None: no ProxyProtocolSources
        self._trusted: dict[str, bool] = {}
        self.client_side: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, listen: str, port: int, sock: socket.socket | None = None) -> None:
        """Serve the client side on ``listen``:``port``, or on ``sock`` (bound for this worker)."""
        self.loop = asyncio.get_running_loop()
        self.client_side = serve_client_side(self.loop, listen, port, sock, self.from_clients)

    def close(self) -> None:
        sock, self.client_side = self.client_side, None
        if sock is not None:
            assert self.loop is not None
            close_client_side(self.loop, sock)

    # ------------------------------------------------------------ sessions

    def open(
        self, session_id: str, client_ip: str, connect_tag: str, local_ip: str, agent_addr: tuple[str, int]
    ) -> UdpSession:
        """Let a relayed session bind a client address. Its agent-side socket is opened at its first
        accepted bind (:meth:`_open_socket`), so a session that never uses UDP holds no port.

        ``local_ip`` is the SG's address on the session's TCP connection to the agent: the agent
        echoes datagrams only from the address whose session channel is up.
        """
        key, key_id = linechan.udp_bind_key(connect_tag)
        session = UdpSession(session_id, client_ip, agent_addr, key, key_id, local_ip=local_ip)
        self.table.add(session)
        return session

    def _open_socket(self, session: UdpSession) -> bool:
        """Before a session's first address is bound: its agent-side socket. False when no port is
        free; the bind is then dropped unanswered (the client's retries bind once a port is free)."""
        if session.sock is not None:
            return True
        try:
            opened = self.pool.open(session.local_ip, session.agent_addr)
        except OSError as exc:
            opened = None
            if not session.no_port:
                log.warning(
                    "cannot open the agent-side UDP socket: %s", exc, extra={"session_id": session.session_id}
                )
        if opened is None:
            if not session.no_port:  # counted and logged once per session, however often it binds
                session.no_port = True
                self.stats.udp_ports_exhausted += 1
                log.warning(
                    "no agent-side UDP port free; session relayed without UDP",
                    extra={"session_id": session.session_id},
                )
            return False
        session.sock, session.port = opened
        assert self.loop is not None
        self.loop.add_reader(session.sock.fileno(), self._from_agent, session)
        return True

    def remove(self, session: UdpSession) -> None:
        """Close the session's UDP path (idempotent)."""
        self.table.remove(session)
        sock, session.sock = session.sock, None
        if sock is not None:
            assert self.loop is not None
            self.loop.remove_reader(sock.fileno())
            sock.close()
            self.pool.release(session.port)

    # ------------------------------------------------------------ datagrams

    def from_clients(self, batch: list[tuple[bytes, Addr]]) -> None:
        """Datagrams from the client side, in the order received: each session's are sent on to its
        agent in that order, with one system call per session (sendmmsg)."""
        by_client = self.table.by_client
        out: dict[UdpSession, list[bytes]] = {}
        for data, addr in batch:
            session = by_client.get(addr)
            # The common case: one lookup. A bind datagram from a bound address is a resent bind.
            if session is None or (len(data) == linechan.BIND_LEN and data[:4] == linechan.BIND_MAGIC):
                if self.proxy_source is None or not self._is_forwarder(addr[0]):
                    self._bind(data, addr)
                    continue
                routed = self._forwarded(data, addr)
                if routed is None:
                    continue
                session, data = routed
            queued = out.get(session)
            if queued is None:
                out[session] = [data]
            else:
                queued.append(data)
        for session, datagrams in out.items():
            session.segment_out = send_on(session.sock, datagrams, session.segment_out, self.stats, "agent")

    def _is_forwarder(self, ip: str) -> bool:
        trusted = self._trusted.get(ip)
        if trusted is None:
            assert self.proxy_source is not None
            if len(self._trusted) >= _TRUST_CACHE:
                self._trusted.clear()
            trusted = self._trusted[ip] = self.proxy_source(ip)
        return trusted

    def _forwarded(self, data: bytes, addr: Addr) -> tuple[UdpSession, bytes] | None:
        """A datagram through a forwarder: its PROXY v2 header names the client (never bound as a
        plain address, so the first lookup of ``from_clients`` always misses for a forwarder).
        Returns the session and payload to relay, or None (a bind, or dropped)."""
        try:
            client, length = proxyproto.parse(data, proxyproto.DGRAM)
        except proxyproto.ProxyError as exc:
            self.stats.udp_dropped[exc.reason] += 1
            return None
        payload = data[length:]
        session = self.table.by_client.get(forwarded_key(addr, client))
        if session is not None and (len(payload) != linechan.BIND_LEN or payload[:4] != linechan.BIND_MAGIC):
            return session, payload
        self._bind(payload, addr, client)
        return None

    def _bind(self, data: bytes, addr: Addr, client: Addr | None = None) -> None:
        """A datagram from an unbound address, or a bind: acknowledged when it binds, else dropped
        and counted. Never relayed."""
        session, reason = self.table.bind(data, addr, self._open_socket, client)
        if session is None:
            self.stats.udp_dropped[reason] += 1
            return
        self.stats.udp_binds += 1
        log.debug(
            "udp address bound",
            extra={
                "session_id": session.session_id,
                "client": f"{(client or addr)[0]}:{(client or addr)[1]}",
                "counter": session.counter,
            },
        )
        assert self.client_side is not None
        try:
            self.client_side.sendto(linechan.bind_ack(session.key, session.key_id, session.counter), addr)
        except OSError as exc:  # the client's retry is answered (the same bind again changes nothing)
            log.debug("cannot acknowledge a udp bind: %s", exc)

    def _from_agent(self, session: UdpSession) -> None:
        # The socket exists only once the session has bound a client address (_open_socket).
        if session.sock is not None and self.client_side is not None:
            _read, session.segment_back = relay_back(
                session.sock, self.client_side, session.reply_addr, session.segment_back, self.stats
            )


# ---------------------------------------------------------------- shared with forward.py


def serve_client_side(
    loop: asyncio.AbstractEventLoop,
    listen: str,
    port: int,
    sock: socket.socket | None,
    on_batch: Callable[[list[tuple[bytes, Addr]]], None],
) -> socket.socket:
    """The client-side socket (``sock``, or one bound to ``listen``:``port``), each wake's batch of
    datagrams handed to ``on_batch``: one batch per wake, so the agent sides get their turn."""
    if sock is None:
        sock = _dual_stack_socket(listen, port) if ":" in listen else _bound_socket(listen, port)
    sock.setblocking(False)
    _set_buffers(sock, SOCKET_BUFFER)
    fd = sock.fileno()

    def ready() -> None:
        try:
            batch = _mmsg.recv(fd, _mmsg.BATCH)
        except OSError as exc:
            log.debug("client-side udp error: %s", exc)
            return
        on_batch(batch)

    loop.add_reader(fd, ready)
    return sock


def close_client_side(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    loop.remove_reader(sock.fileno())
    sock.close()


def send_on(sock: socket.socket, datagrams: list[bytes], segment: bool, stats: Stats, peer: str) -> bool:
    """One session's (or flow's) datagrams of a batch to its connected ``peer`` side ("agent", or
    "inner" on a forwarder), in order, counted. Returns whether runs may still be segmented (GSO)
    on that path: a path that refused it gets datagrams one by one from then on."""
    sent, busy, failed, refused = _mmsg.send(sock.fileno(), datagrams, None, segment)
    stats.udp_relayed["to_agent"] += sent
    if busy:
        stats.udp_dropped[f"{peer}-busy"] += busy
    if failed:  # e.g. ECONNREFUSED: an earlier datagram met an ICMP port unreachable
        stats.udp_dropped[f"{peer}-unreachable"] += failed
    return _segment_still(segment, refused, peer)


def relay_back(
    source: socket.socket, client_side: socket.socket, addr: Addr, segment: bool, stats: Stats
) -> tuple[int, bool]:
    """One batch read from a session's (or flow's) connected socket, sent to ``addr`` through the
    client side. Returns how many were read, and whether runs may still be segmented to ``addr``."""
    try:
        batch = _mmsg.recv(source.fileno(), _mmsg.BATCH)  # one batch per wake: fairness between sessions
    except OSError:  # ICMP errors of earlier sends surface here; the next wake reads on
        return 0, segment
    if not batch:
        return 0, segment
    sent, busy, failed, refused = _mmsg.send(
        client_side.fileno(), [data for data, _peer in batch], addr, segment
    )
    stats.udp_relayed["to_client"] += sent
    if busy or failed:  # the client-side socket's buffer is full (or the route is gone)
        stats.udp_dropped["client-busy"] += busy + failed
    return len(batch), _segment_still(segment, refused, "client")


def _segment_still(segment: bool, refused: int, towards: str) -> bool:
    if segment and refused:
        log.debug("udp segmentation refused towards the %s; sending one by one", towards)
        return False
    return segment


def _bound_socket(listen: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((listen, port))
    except OSError:
        sock.close()
        raise
    return sock


def _dual_stack_socket(listen: str, port: int) -> socket.socket:
    """A UDP socket bound to an IPv6 ``listen`` that also serves IPv4 ("::" as the TCP listener):
    v6-only is switched off before the bind rather than left to the host's net.ipv6.bindv6only."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)
        sock.bind((listen, port))
    except OSError:
        sock.close()
        raise
    return sock
