"""The forwarder of a double-hop DMZ (ForwardTo): client ↔ this SG ↔ one inner SG (docs/dmz.md).

TCP: the client's TLS passes through untouched. The forwarder holds no TLS key and no grant
secret; it sees ciphertext only, so it can neither read, mint nor validate a grant, and a
forwarder taken over by an attacker learns no connect-tag. In front of the client's first bytes
it sends the inner SG a PROXY v2 header naming the client's address, which the inner SG (its
ProxyProtocolSources list this forwarder) uses for admission, the grant check and the UDP bind.

UDP: each client address gets its own socket towards the inner SG that its TCP connection went
to (a flow); every datagram goes out with a PROXY v2 header naming the client, and what the
inner SG sends back on that socket goes to that client only.

Invariants:

- A client connection counts against MaxConnections and MaxConnectionsPerSource from accept (or,
  behind a HALB in ProxyProtocolSources, from its header) until closed. Its first bytes must
  begin a TLS handshake record and the inner SG must answer within RequestTimeout of accept;
  from then on the inner SG's own RequestTimeout (TLS handshake and CONNECT line) bounds it.
- Inner SGs are tried in turn from a rotating start (round-robin), each within
  FORWARD_CONNECT_TIMEOUT; one that failed is tried last for FORWARD_RETRY_AFTER. A client
  address with a connection open through an inner SG keeps being sent there (its UDP must reach
  the inner SG that holds its session).
- A UDP flow is opened only for a client IP with a TCP connection open through this forwarder,
  at most MaxConnectionsPerSource per source and MaxConnections in all; it is closed with the
  IP's last TCP connection or after UDP_FLOW_IDLE without datagrams.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from gatehouse.sg import proxyproto
from gatehouse.sg.settings import (
    FORWARD_CONNECT_TIMEOUT,
    FORWARD_RETRY_AFTER,
    SHUTDOWN_GRACE,
    UDP_FLOW_IDLE,
    SgSettings,
)
from gatehouse.sg.stats import Refusals, Stats
from gatehouse.sg.udp import MAX_DATAGRAM, close_client_side, relay_back, send_on, serve_client_side
from gatehouse.web import norm_ip, source_key

log = logging.getLogger("gatehouse.sg.forward")

Target = tuple[str, int]
MAX_EARLY_DATA = 64 * 1024  # client bytes held while the inner SG is being connected
_TLS_HANDSHAKE = 0x16
_SWEEP_EVERY = 10.0


class Inners:
    """The ForwardTo list: which inner SG a new connection tries first, and where each client IP's
    open connections went (for its next connection and its UDP)."""

    def __init__(self, targets: tuple[Target, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self.targets = list(targets)
        self.clock = clock
        self._next = 0
        self._down_until: dict[Target, float] = {}
        self._clients: dict[str, list[Any]] = {}  # client IP -> [target, inner address, open count]

    def order(self, client_ip: str) -> list[Target]:
        """The inner SGs in the order to try: the client's current one, then round-robin from a
        rotating start, those that failed lately last."""
        n = len(self.targets)
        start, self._next = self._next, (self._next + 1) % n
        rotated = self.targets[start:] + self.targets[:start]
        now = self.clock()
        up = [t for t in rotated if self._down_until.get(t, 0.0) <= now]
        order = up + [t for t in rotated if t not in up]
        held = self._clients.get(client_ip)
        if held is not None and held[0] in order:
            order.remove(held[0])
            order.insert(0, held[0])
        return order

    def failed(self, target: Target) -> None:
        self._down_until[target] = self.clock() + FORWARD_RETRY_AFTER

    def attach(self, client_ip: str, target: Target, address: tuple[Any, ...]) -> None:
        self._down_until.pop(target, None)
        held = self._clients.get(client_ip)
        if held is None:
            self._clients[client_ip] = [target, address, 1]
        else:  # the latest connection's inner SG is where this client's datagrams go
            held[0], held[1], held[2] = target, address, held[2] + 1

    def detach(self, client_ip: str) -> bool:
        """One connection of ``client_ip`` closed; True when it was its last."""
        held = self._clients[client_ip]
        held[2] -= 1
        if held[2]:
            return False
        del self._clients[client_ip]
        return True

    def address_of(self, client_ip: str) -> tuple[Any, ...] | None:
        """The inner SG's socket address that ``client_ip``'s open connection reached, or None."""
        held = self._clients.get(client_ip)
        return held[1] if held else None


class Forwarder:
    """State shared by the forwarder's connections: settings, admission, counters, inner SGs."""

    def __init__(self, settings: SgSettings, stats: Stats, udp: UdpForwarder | None = None) -> None:
        self.settings = settings
        self.stats = stats
        self.refusals = Refusals(stats, log)
        self.inners = Inners(settings.forward_to)
        self.udp = udp
        self.conns: set[ClientConn] = set()
        self.per_source: dict[str, int] = {}
        self.relaying = 0  # connections the inner SG has answered
        self.accepting = True
        self.drained = asyncio.Event()

    def protocol(self) -> ClientConn:
        return ClientConn(self)

    def count(self, client_ip: str) -> str | None:
        """Count a connection of ``client_ip`` against MaxConnectionsPerSource; its key, or None."""
        source = source_key(client_ip)
        held = self.per_source.get(source, 0)
        if held >= self.settings.max_connections_per_source:
            return None
        self.per_source[source] = held + 1
        return source

    def uncount(self, source: str) -> None:
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]

    async def close_all(self, grace: float = SHUTDOWN_GRACE) -> None:
        self.accepting = False
        for conn in list(self.conns):
            conn.close()
        if self.conns:
            try:
                await asyncio.wait_for(self.drained.wait(), grace)
            except TimeoutError:
                pass
        for conn in list(self.conns):
            conn.abort()


_FIRST, _CONNECTING, _RELAY, _CLOSED = range(4)


class ClientConn(asyncio.Protocol):
    """One client connection and its connection to an inner SG."""

    def __init__(self, fw: Forwarder) -> None:
        self.fw = fw
        self.state = _FIRST
        self.transport: asyncio.Transport | None = None
        self.inner: InnerConn | None = None
        self.client: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.source: str | None = None  # per-source key while counted
        self.counted = False  # against MaxConnections
        self.attached = False  # in Inners (a TCP connection through an inner SG is open)
        self.needs_header = False
        self.answered = False
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no asyncio.Transport subclass
        fw = self.fw
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.client = (norm_ip(peer[0]), peer[1])
        self.local = (norm_ip(local[0]), local[1])
        if not fw.accepting or fw.stats.open >= fw.settings.max_connections:
            fw.refusals.refuse("busy", self.client[0], logging.WARNING, "refused: MaxConnections reached")
            transport.abort()
            self.state = _CLOSED
            return
        fw.stats.open += 1
        self.counted = True
        fw.conns.add(self)
        self.needs_header = fw.settings.proxy_source(self.client[0])
        if not self.needs_header and not self._admit():
            return
        self.timer = asyncio.get_running_loop().call_later(fw.settings.request_timeout, self._timeout)

    def _admit(self) -> bool:
        self.source = self.fw.count(self.client[0])
        if self.source is None:
            self._refuse("per-source", "refused: MaxConnectionsPerSource reached")
            return False
        return True

    def data_received(self, data: bytes) -> None:
        if self.state == _RELAY:
            assert self.inner is not None and self.inner.transport is not None
            self.fw.stats.bytes_to_agent += len(data)
            self.inner.transport.write(data)
            return
        if self.state == _CLOSED:
            return
        self.buf += data
        if len(self.buf) > MAX_EARLY_DATA:
            self._refuse("early-data", "refused: too much before the inner gateway answered")
            return
        if self.state == _FIRST:
            self._first_bytes()

    def _first_bytes(self) -> None:
        if self.needs_header:
            try:
                if proxyproto.needed(self.buf):
                    return
                self.client, length = proxyproto.parse(self.buf, proxyproto.STREAM)
            except proxyproto.ProxyError as exc:
                self._refuse(exc.reason, "refused: %s", exc)
                return
            self.buf = self.buf[length:]
            self.needs_header = False
            if not self._admit():
                return
        buf = self.buf
        if not buf:
            return
        # A TLS record of type handshake, record version 3.x (x ≤ 4): anything else is no client.
        if buf[0] != _TLS_HANDSHAKE or (len(buf) > 1 and buf[1] != 3) or (len(buf) > 2 and buf[2] > 4):
            self._refuse("not-tls", "refused: not a TLS handshake", level=logging.INFO)
            return
        if len(buf) < 3:
            return
        self.state = _CONNECTING
        assert self.transport is not None
        self.transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect())

    def pause_writing(self) -> None:
        if self.inner and self.inner.transport:
            self.inner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.inner and self.inner.transport and self.state == _RELAY:
            self.inner.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close; connection_lost closes the inner side after its queue is sent

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state = _CLOSED
        if self.timer:
            self.timer.cancel()
        if self.task and not self.task.done():
            self.task.cancel()
        if self.inner and self.inner.transport:
            self.inner.transport.close()
        self._forget()

    def _forget(self) -> None:
        """No longer counted anywhere (idempotent)."""
        fw = self.fw
        if self.source is not None:
            fw.uncount(self.source)
            self.source = None
        if self.answered:
            self.answered = False
            fw.relaying -= 1
        if self.attached:
            self.attached = False
            if fw.inners.detach(self.client[0]) and fw.udp is not None:
                fw.udp.close_ip(self.client[0])
        if self.counted:
            self.counted = False
            fw.stats.open -= 1
            fw.conns.discard(self)
            if not fw.accepting and not fw.conns:
                fw.drained.set()

    def _refuse(self, reason: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        self.fw.refusals.refuse(reason, self.client[0], level, message, *args)
        self.state = _CLOSED
        if self.inner and self.inner.transport:
            self.inner.transport.abort()
        if self.transport:
            self.transport.abort()
        self._forget()

    def _timeout(self) -> None:
        if not self.answered and self.state != _CLOSED:
            self._refuse(
                "timeout", "refused: no TLS handshake through to an inner gateway within RequestTimeout"
            )

    # ------------------------------------------------------------ the inner side

    async def _connect(self) -> None:
        fw = self.fw
        loop = asyncio.get_running_loop()
        for target in fw.inners.order(self.client[0]):
            try:
                async with asyncio.timeout(FORWARD_CONNECT_TIMEOUT):
                    transport, _proto = await loop.create_connection(lambda: InnerConn(self), *target)
            except (OSError, TimeoutError) as exc:
                fw.inners.failed(target)
                if fw.refusals.allow("inner-down"):  # at a bounded rate, like refusals
                    log.warning(
                        "inner gateway %s:%d unreachable: %s", target[0], target[1], type(exc).__name__
                    )
                continue
            if self.state != _CONNECTING:  # the client left meanwhile
                transport.abort()
                return
            inner_addr = transport.get_extra_info("peername")
            fw.inners.attach(self.client[0], target, inner_addr)
            self.attached = True
            self._relay(target)
            return
        self._refuse("inner-unreachable", "refused: no inner gateway reachable")

    def _relay(self, target: Target) -> None:
        assert self.inner is not None and self.inner.transport is not None and self.transport is not None
        header = proxyproto.build(self.client, self.local)
        self.inner.transport.write(header + self.buf)
        self.fw.stats.bytes_to_agent += len(self.buf)
        self.buf = b""
        self.state = _RELAY
        self.transport.resume_reading()
        log.debug("forwarding", extra={"client": self.client[0], "inner": f"{target[0]}:{target[1]}"})

    def inner_data(self, data: bytes) -> None:
        if self.state != _RELAY or self.transport is None:
            return
        if not self.answered:  # the inner SG answered: its own deadlines take over
            self.answered = True
            self.fw.relaying += 1
            self.fw.stats.accepted += 1
            if self.timer:
                self.timer.cancel()
        self.fw.stats.bytes_to_client += len(data)
        self.transport.write(data)

    def inner_lost(self) -> None:
        if self.transport and self.state != _CLOSED:
            self.transport.close()

    # ------------------------------------------------------------ shutdown

    def close(self) -> None:
        if self.transport:
            self.transport.close()
        if self.inner and self.inner.transport:
            self.inner.transport.close()

    def abort(self) -> None:
        if self.inner and self.inner.transport:
            self.inner.transport.abort()
        if self.transport:
            self.transport.abort()


class InnerConn(asyncio.Protocol):
    def __init__(self, client: ClientConn) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.inner = self

    def data_received(self, data: bytes) -> None:
        self.client.inner_data(data)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.client.transport:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport and self.client.state == _RELAY:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.inner_lost()


# ---------------------------------------------------------------- UDP


@dataclass(eq=False)
class Flow:
    client_addr: tuple[Any, ...]
    client_ip: str
    source: str
    header: bytes = field(repr=False)
    sock: socket.socket = field(repr=False)
    last: float = 0.0
    # Runs of equal-sized datagrams go as one UDP_SEGMENT send until a path refuses it (udp.py).
    segment_out: bool = True  # towards the inner SG
    segment_back: bool = True  # towards the client


class UdpForwarder:
    """Client datagrams on Port ↔ one socket per client address towards its inner SG."""

    def __init__(self, settings: SgSettings, stats: Stats, inners_of: Callable[[], Inners]) -> None:
        self.settings = settings
        self.stats = stats
        self.inners_of = inners_of
        self.flows: dict[tuple[Any, ...], Flow] = {}
        self.by_ip: dict[str, set[Flow]] = {}
        self.per_source: dict[str, int] = {}
        self.client_side: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.local: tuple[Any, ...] = ("", 0)  # the client-side socket's address (the header's destination)
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.flows)

    async def start(self, listen: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.client_side = serve_client_side(self.loop, listen, port, None, self.from_clients)
        self.local = self.client_side.getsockname()
        self._sweeper = self.loop.call_later(_SWEEP_EVERY, self._sweep)

    def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for flow in list(self.flows.values()):
            self._close(flow)
        sock, self.client_side = self.client_side, None
        if sock is not None:
            assert self.loop is not None
            close_client_side(self.loop, sock)

    def from_clients(self, batch: list[tuple[bytes, tuple[Any, ...]]]) -> None:
        """Client datagrams in the order received: each flow's go to its inner SG in that order,
        each behind the flow's PROXY v2 header, with one system call per flow (sendmmsg)."""
        assert self.loop is not None
        now = self.loop.time()
        out: dict[Flow, list[bytes]] = {}
        for data, addr in batch:
            flow = self.flows.get(addr)
            if flow is None:
                flow = self._open(addr)
                if flow is None:
                    continue
            if len(flow.header) + len(data) > MAX_DATAGRAM - 28:  # IPv4 + UDP headers
                self.stats.udp_dropped["oversized"] += 1
                continue
            flow.last = now
            queued = out.get(flow)
            if queued is None:
                out[flow] = [flow.header + data]
            else:
                queued.append(flow.header + data)
        for flow, datagrams in out.items():
            flow.segment_out = send_on(flow.sock, datagrams, flow.segment_out, self.stats, "inner")

    def _open(self, addr: tuple[Any, ...]) -> Flow | None:
        ip = norm_ip(addr[0])
        inner = self.inners_of().address_of(ip)
        if inner is None:
            self.stats.udp_dropped["no-tcp"] += 1  # only a client with a connection open here
            return None
        if len(self.flows) >= self.settings.max_connections:
            self.stats.udp_dropped["busy"] += 1
            return None
        source = source_key(ip)
        if self.per_source.get(source, 0) >= self.settings.max_connections_per_source:
            self.stats.udp_dropped["per-source"] += 1
            return None
        family = socket.AF_INET6 if ":" in inner[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(inner[:2] if family == socket.AF_INET else inner)  # replies from it only
        except OSError:
            sock.close()
            self.stats.udp_dropped["inner-unreachable"] += 1
            return None
        local = self.local
        header = proxyproto.build((ip, addr[1]), (norm_ip(local[0]), local[1]), proxyproto.DGRAM)
        assert self.loop is not None
        flow = Flow(addr, ip, source, header, sock, self.loop.time())
        self.flows[addr] = flow
        self.by_ip.setdefault(ip, set()).add(flow)
        self.per_source[source] = self.per_source.get(source, 0) + 1
        self.loop.add_reader(sock.fileno(), self._from_inner, flow)
        log.debug("udp flow opened", extra={"client": f"{ip}:{addr[1]}"})
        return flow

    def _from_inner(self, flow: Flow) -> None:
        if self.client_side is None:
            return
        read, flow.segment_back = relay_back(
            flow.sock, self.client_side, flow.client_addr, flow.segment_back, self.stats
        )
        if read:
            assert self.loop is not None
            flow.last = self.loop.time()

    def close_ip(self, ip: str) -> None:
        """The last TCP connection of ``ip`` closed: so do its flows."""
        for flow in list(self.by_ip.get(ip, ())):
            self._close(flow)

    def _close(self, flow: Flow) -> None:
        if self.flows.get(flow.client_addr) is not flow:
            return
        del self.flows[flow.client_addr]
        flows = self.by_ip[flow.client_ip]
        flows.discard(flow)
        if not flows:
            del self.by_ip[flow.client_ip]
        left = self.per_source[flow.source] - 1
        if left:
            self.per_source[flow.source] = left
        else:
            del self.per_source[flow.source]
        assert self.loop is not None
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()

    def _sweep(self) -> None:
        assert self.loop is not None
        idle_since = self.loop.time() - UDP_FLOW_IDLE
        for flow in [f for f in self.flows.values() if f.last < idle_since]:
            self._close(flow)
        self._sweeper = self.loop.call_later(_SWEEP_EVERY, self._sweep)
