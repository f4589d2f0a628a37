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
from typing import Any

from gatehouse import linechan
from gatehouse.sg import proxyproto
from gatehouse.sg.stats import Stats
from gatehouse.sg.udp_table import Addr, UdpSession, UdpTable, forwarded_key

log = logging.getLogger("gatehouse.sg.udp")
# The default socket buffer (about 200 KiB, ~90 datagrams) overflows whenever the loop is busy
# for a millisecond at high rates; the kernel caps the request at net.core.[rw]mem_max.
SOCKET_BUFFER = 4 * 1024 * 1024
SESSION_BUFFER = 1024 * 1024  # per-session agent-side socket: one session's burst
MAX_DATAGRAM = 65535
_READS_PER_WAKE = 64  # fairness between busy sessions
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
        self.client_side: asyncio.DatagramTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, listen: str, port: int, sock: socket.socket | None = None) -> None:
        """Serve the client side on ``listen``:``port``, or on ``sock`` (bound for this worker)."""
        self.loop = asyncio.get_running_loop()
        where: dict[str, Any]
        if sock is not None:
            where = {"sock": sock}
        elif ":" in listen:
            where = {"sock": _dual_stack_socket(listen, port)}
        else:
            where = {"local_addr": (listen, port)}
        self.client_side, _protocol = await self.loop.create_datagram_endpoint(
            lambda: _ClientDatagrams(self), **where
        )
        _set_buffers(self.client_side.get_extra_info("socket"), SOCKET_BUFFER)

    def close(self) -> None:
        if self.client_side:
            self.client_side.close()

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

    def from_client(self, data: bytes, addr: Addr) -> None:
        session = self.table.by_client.get(addr)
        # The common case: one lookup. A bind datagram from a bound address is a resent bind.
        if session is not None and (len(data) != linechan.BIND_LEN or data[:4] != linechan.BIND_MAGIC):
            try:
                session.sock.send(data)
            except BlockingIOError:
                self.stats.udp_dropped["agent-busy"] += 1
                return
            except OSError:  # e.g. ECONNREFUSED: an earlier datagram met an ICMP port unreachable
                self.stats.udp_dropped["agent-unreachable"] += 1
                return
            self.stats.udp_relayed["to_agent"] += 1
            return
        if self.proxy_source is not None and self._is_forwarder(addr[0]):
            self._forwarded(data, addr)
            return
        self._bind(data, addr)

    def _is_forwarder(self, ip: str) -> bool:
        trusted = self._trusted.get(ip)
        if trusted is None:
            assert self.proxy_source is not None
            if len(self._trusted) >= _TRUST_CACHE:
                self._trusted.clear()
            trusted = self._trusted[ip] = self.proxy_source(ip)
        return trusted

    def _forwarded(self, data: bytes, addr: Addr) -> None:
        """A datagram through a forwarder: its PROXY v2 header names the client (never bound as a
        plain address, so ``from_client``'s first lookup always misses for a forwarder)."""
        try:
            client, length = proxyproto.parse(data, proxyproto.DGRAM)
        except proxyproto.ProxyError as exc:
            self.stats.udp_dropped[exc.reason] += 1
            return
        payload = data[length:]
        session = self.table.by_client.get(forwarded_key(addr, client))
        if session is not None and (len(payload) != linechan.BIND_LEN or payload[:4] != linechan.BIND_MAGIC):
            try:
                session.sock.send(payload)
            except BlockingIOError:
                self.stats.udp_dropped["agent-busy"] += 1
                return
            except OSError:
                self.stats.udp_dropped["agent-unreachable"] += 1
                return
            self.stats.udp_relayed["to_agent"] += 1
            return
        self._bind(payload, addr, client)

    def _bind(self, data: bytes, addr: Addr, client: Addr | None = None) -> None:
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
        self.client_side.sendto(linechan.bind_ack(session.key, session.key_id, session.counter), addr)

    def _from_agent(self, session: UdpSession) -> None:
        # The socket exists only once the session has bound a client address (_open_socket).
        sock, addr, client_side = session.sock, session.reply_addr, self.client_side
        if sock is None:
            return
        assert client_side is not None
        for _read in range(_READS_PER_WAKE):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors of earlier sends surface here; keep reading
                continue
            client_side.sendto(data, addr)
            self.stats.udp_relayed["to_client"] += 1


class _ClientDatagrams(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.datagram_received = relay.from_client  # type: ignore[method-assign]  # one call less per datagram

    def error_received(self, exc: Exception) -> None:
        log.debug("client-side udp error: %s", exc)


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
