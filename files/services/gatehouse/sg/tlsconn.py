"""A small TLS connection driven by the event loop's reader/writer callbacks.

Why not the loop's SSL transport: both asyncio's and uvloop's keep a 256 KiB read buffer and two
memory BIOs per connection whose capacity stays at the largest burst seen, so an idle session
that once moved 64 KiB costs about 500 KiB of RSS. Here OpenSSL reads and writes the socket
itself (a non-blocking ``SSLSocket``); CPython sets ``SSL_MODE_RELEASE_BUFFERS``, so an idle
connection holds no record buffers, and decrypted data goes through one buffer shared by all
connections. An idle relayed session (two connections) stays well under 100 KiB.

The handler gets the calls of an asyncio Protocol: ``connection_made(conn)`` after the
handshake, ``data_received(view)`` (a view into the shared buffer, valid during the call only),
``pause_writing()``/``resume_writing()`` around the write-queue limits, ``connection_lost(exc)``
once open, or ``handshake_failed(conn, exc)`` instead when the handshake does not complete
(``conn`` is None when the socket could not even be set up). Exactly one of ``connection_lost``
and ``handshake_failed`` is called for every handler given to a connection.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol

from gatehouse.sg import proxyproto
from gatehouse.web import norm_ip

log = logging.getLogger("gatehouse.sg.tls")

_READ_SIZE = 16 * 1024  # one TLS record
_BUF = bytearray(_READ_SIZE)
_VIEW = memoryview(_BUF)
_READS_PER_WAKE = 16  # fairness between busy connections
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024

_HANDSHAKE, _OPEN, _CLOSED = range(3)


class Handler(Protocol):
    def connection_made(self, conn: TlsConn) -> None: ...
    def data_received(self, data: memoryview) -> None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def handshake_failed(self, conn: TlsConn | None, exc: BaseException | None) -> None: ...


class TlsConn:
    __slots__ = (
        "_closing",
        "_out",
        "_out_size",
        "_peer_paused",
        "_read_wants_write",
        "_reader_on",
        "_reading",
        "_timer",
        "_writer_on",
        "fd",
        "handler",
        "loop",
        "peer",
        "sock",
        "state",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        handler: Handler,
        peer: tuple[str, int] | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.handler = handler
        self.state = _HANDSHAKE
        if peer is None:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = ("", 0)
        # A dual-stack listener ("::") sees IPv4 clients as ::ffff:a.b.c.d: logs, caps and grant
        # checks use the plain IPv4 address. ``peer`` given: the client that a trusted forwarder's
        # PROXY v2 header names (the socket's peer is the forwarder).
        self.peer: tuple[str, int] = (norm_ip(peer[0]), peer[1]) if peer[0] else ("", 0)
        self._out: deque[bytes] | None = None
        self._out_size = 0
        self._reading = True
        self._reader_on = False
        self._writer_on = False
        self._read_wants_write = False
        self._peer_paused = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ public

    def start(self, handshake_timeout: float) -> None:
        self._timer = self.loop.call_later(handshake_timeout, self._handshake_timeout)
        self._handshake()

    @property
    def is_open(self) -> bool:
        return self.state == _OPEN and not self._closing

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def write(self, data: bytes | memoryview) -> None:
        if self.state != _OPEN or self._closing or not data:
            return
        if self._out:
            self._queue(data)
            return
        try:
            sent = self.sock.send(data)
        except ssl.SSLWantWriteError:
            # OpenSSL may hold part of it already; the retry must offer the same bytes.
            self._queue(data)
            return
        except (ssl.SSLError, OSError) as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._queue(data[sent:])

    def pause_reading(self) -> None:
        self._reading = False
        self._set_reader(False)

    def resume_reading(self) -> None:
        if self._reading or self.state != _OPEN or self._closing:
            return
        self._reading = True
        self._set_reader(True)
        # OpenSSL may hold decrypted bytes that no readiness event will announce.
        self.loop.call_soon(self._read)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, send close_notify and close (abort after ``timeout``)."""
        if self.state == _CLOSED or self._closing:
            return
        if self.state == _HANDSHAKE:
            self.abort()
            return
        self._closing = True
        self.pause_reading()
        if self._out:
            self._timer = self.loop.call_later(timeout, self.abort)
            return
        self._finish_close()

    def abort(self) -> None:
        self._lost(None)

    # ------------------------------------------------------------ event loop callbacks

    def _on_readable(self) -> None:
        if self.state == _HANDSHAKE:
            self._handshake()
        elif self.state == _OPEN:
            self._read()

    def _on_writable(self) -> None:
        if self.state == _HANDSHAKE:
            self._handshake()
        elif self.state == _OPEN:
            if self._read_wants_write:
                self._read_wants_write = False
                self._read()
            self._flush()

    # ------------------------------------------------------------ internals

    def _set_reader(self, on: bool) -> None:
        if on and not self._reader_on and self.state != _CLOSED:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reader_on = True
        elif not on and self._reader_on:
            self.loop.remove_reader(self.fd)
            self._reader_on = False

    def _set_writer(self, on: bool) -> None:
        if on and not self._writer_on and self.state != _CLOSED:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writer_on = True
        elif not on and self._writer_on:
            self.loop.remove_writer(self.fd)
            self._writer_on = False

    def _handshake_timeout(self) -> None:
        if self.state == _HANDSHAKE:
            self._lost(TimeoutError("TLS handshake timed out"))

    def _handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_writer(False)
            self._set_reader(True)
            return
        except ssl.SSLWantWriteError:
            self._set_reader(False)
            self._set_writer(True)
            return
        except (ssl.SSLError, OSError) as exc:
            self._lost(exc)
            return
        if self._timer:
            self._timer.cancel()
            self._timer = None
        self.state = _OPEN
        self._set_writer(False)
        self._set_reader(True)
        self.handler.connection_made(self)
        if self.state == _OPEN and self._reading:
            self._read()  # the client's first bytes may have arrived with the handshake

    def _read(self) -> None:
        sock = self.sock
        for _chunk in range(_READS_PER_WAKE):
            if not self._reading or self.state != _OPEN:
                return
            try:
                n = sock.recv_into(_BUF, _READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self._set_writer(True)
                return
            except (ssl.SSLError, OSError) as exc:
                self._lost(exc)
                return
            if n == 0:  # close_notify or TCP FIN
                self._lost(None)
                return
            self.handler.data_received(_VIEW[:n])
        if self._reading and self.state == _OPEN and sock.pending():
            self.loop.call_soon(self._read)

    def _queue(self, data: bytes | memoryview) -> None:
        if self._out is None:
            self._out = deque()
        self._out.append(bytes(data))
        self._out_size += len(data)
        self._set_writer(True)
        if not self._peer_paused and self._out_size > HIGH_WATER:
            self._peer_paused = True
            self.handler.pause_writing()

    def _flush(self) -> None:
        out = self._out
        while out:
            head = out[0]
            try:
                sent = self.sock.send(head)
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
                self._lost(exc)
                return
            self._out_size -= sent
            if sent < len(head):
                out[0] = head[sent:]
            else:
                out.popleft()
        self._out = None  # an idle connection keeps no queue
        self._set_writer(False)
        if self._peer_paused and self._out_size <= LOW_WATER:
            self._peer_paused = False
            self.handler.resume_writing()
        if self._closing:
            self._finish_close()

    def _finish_close(self) -> None:
        try:
            self.sock.unwrap()  # sends close_notify; we do not wait for the peer's
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._lost(None)

    def _lost(self, exc: BaseException | None) -> None:
        if self.state == _CLOSED:
            return
        handshaking = self.state == _HANDSHAKE
        self.state = _CLOSED
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self._reader_on:
            self.loop.remove_reader(self.fd)
            self._reader_on = False
        if self._writer_on:
            self.loop.remove_writer(self.fd)
            self._writer_on = False
        self._out = None
        self._out_size = 0
        try:
            self.sock.close()
        except OSError:
            pass
        if handshaking:
            self.handler.handshake_failed(self, exc)
        else:
            self.handler.connection_lost(exc)


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class TlsListener:
    """Accept TCP connections and start a TLS handshake on each.

    ``handler_factory(peer)`` is called at accept, before any TLS work: it returns the client's
    handler, or None to refuse the connection (it is closed at once, no handshake is spent on it).

    A connection from an address for which ``proxy_source(ip)`` is true (a trusted forwarder)
    must first send a PROXY v2 header, within ``handshake_timeout`` of accept; the factory is then
    called with the client's address from the header, and the TLS handshake follows. Without a
    valid header in time it is closed and ``proxy_refused(reason, ip)`` is called. At most
    ``max_pending`` such connections wait for their header at once.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        handler_factory: Callable[[tuple[str, int]], Handler | None],
        handshake_timeout: float,
        backlog: int = 4096,
        *,
        proxy_source: Callable[[str], bool] | None = None,
        proxy_refused: Callable[[str, str], None] = lambda _reason, _ip: None,
        max_pending: int = 1024,
        sock: socket.socket | None = None,
    ) -> None:
        self.loop = loop
        self.ctx = ctx
        self.factory = handler_factory
        self.handshake_timeout = handshake_timeout
        self.proxy_source = proxy_source
        self.proxy_refused = proxy_refused
        self.max_pending = max_pending
        self.pending: set[ProxyHeaderReader] = set()
        if sock is None:  # ``sock``: a listening socket made for this process (workers.py)
            family = _family(host)
            # "::" serves IPv4 clients too (as mapped addresses; grants and the UDP table normalise them).
            dualstack = host == "::" and socket.has_dualstack_ipv6()
            sock = socket.create_server(
                (host, port), family=family, backlog=backlog, dualstack_ipv6=dualstack
            )
        self.sock = sock
        self.sock.setblocking(False)
        self.accepting = True
        loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for reader in list(self.pending):
            reader.close()

    def _resume(self) -> None:
        if self.accepting:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _attempt in range(64):
            try:
                raw, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: back off instead of spinning on a readable listener.
                    log.error("cannot accept: %s", exc.strerror)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(0.5, self._resume)
                return
            if self.proxy_source is not None and self.proxy_source(addr[0]):
                if len(self.pending) >= self.max_pending:
                    raw.close()
                    self.proxy_refused("proxy-busy", norm_ip(addr[0]))
                    continue
                self.pending.add(ProxyHeaderReader(self, raw, norm_ip(addr[0])))
                continue
            self.start(raw, (addr[0], addr[1]))

    def start(self, raw: socket.socket, peer: tuple[str, int], client: tuple[str, int] | None = None) -> None:
        """Admit ``raw`` (from ``peer``, or for ``client`` named by a PROXY header) and start TLS."""
        handler = self.factory(client or peer)
        if handler is None:
            raw.close()
            return
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            raw.close()
            handler.handshake_failed(None, exc)  # gives back what the factory counted
            return
        TlsConn(self.loop, tls, handler, client).start(self.handshake_timeout)


class ProxyHeaderReader:
    """Reads the PROXY v2 header of a trusted forwarder's connection byte-exactly (the client's TLS
    bytes after it stay in the socket for the handshake), then hands the socket to the listener."""

    __slots__ = ("buf", "listener", "peer_ip", "raw", "timer")

    def __init__(self, listener: TlsListener, raw: socket.socket, peer_ip: str) -> None:
        self.listener = listener
        self.raw = raw
        self.peer_ip = peer_ip
        self.buf = b""
        raw.setblocking(False)
        loop = listener.loop
        self.timer = loop.call_later(listener.handshake_timeout, self._fail, "proxy-timeout")
        loop.add_reader(raw.fileno(), self._read)

    def _read(self) -> None:
        try:
            want = proxyproto.needed(self.buf)
            chunk = self.raw.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except proxyproto.ProxyError as exc:
            self._fail(exc.reason)
            return
        except OSError:
            self._fail("proxy-missing")
            return
        if not chunk:
            self._fail("proxy-missing")  # closed before a whole header
            return
        self.buf += chunk
        try:
            if proxyproto.needed(self.buf):
                return
            client, _length = proxyproto.parse(self.buf, proxyproto.STREAM)
        except proxyproto.ProxyError as exc:
            self._fail(exc.reason)
            return
        self.listener.start(self._detach(), (self.peer_ip, 0), client)

    def _detach(self) -> socket.socket:
        listener = self.listener
        self.timer.cancel()
        listener.loop.remove_reader(self.raw.fileno())
        listener.pending.discard(self)
        return self.raw

    def _fail(self, reason: str) -> None:
        if self not in self.listener.pending:
            return
        self._detach().close()
        self.listener.proxy_refused(reason, self.peer_ip)

    def close(self) -> None:
        if self in self.listener.pending:
            self._detach().close()


async def open_tls(
    host: str, port: int, ctx: ssl.SSLContext, handler: Handler, handshake_timeout: float
) -> TlsConn:
    """Connect and start the handshake; ``handler.connection_made`` follows once it is done."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _name, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        # The name checked against the certificate when the context verifies (an address is matched
        # with the certificate's IP SANs); Python sends no SNI for an address.
        tls = ctx.wrap_socket(sock, server_side=False, server_hostname=host, do_handshake_on_connect=False)
        conn = TlsConn(loop, tls, handler)
        conn.start(handshake_timeout)
        return conn
    raise last or OSError(f"cannot resolve {host}")
