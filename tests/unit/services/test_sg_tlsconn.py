"""The SG's own TLS connection over real sockets and real TLS on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pki import CertFiles
from pki import TestPKI as PKI

from gatehouse import tls
from gatehouse.sg.tlsconn import TlsConn, TlsListener, open_tls


class Recorder:
    """A handler that records events; ``echo`` sends back what it gets, pausing on back-pressure."""

    def __init__(self, echo: bool = False, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.conn: TlsConn | None = None
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self.failed: BaseException | None = None
        self.made = asyncio.Event()
        self.got = asyncio.Event()

    def connection_made(self, conn: TlsConn) -> None:
        self.conn = conn
        self.made.set()
        if self.greeting:
            conn.write(self.greeting)
            conn.close()

    def data_received(self, data: memoryview) -> None:
        self.data += data
        self.got.set()
        if self.echo and self.conn:
            self.conn.write(data)

    def pause_writing(self) -> None:
        if self.conn:
            self.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.conn:
            self.conn.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def handshake_failed(self, conn: TlsConn, exc: BaseException | None) -> None:
        self.failed = exc
        self.connection_lost(exc)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return PKI(tmp_path_factory.mktemp("pki")).issue("srv")


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def listen(cert: CertFiles, factory: Callable[[], Recorder], timeout: float = 5.0) -> TlsListener:
    ctx = tls.server_context(cert.cert, cert.key, role="sg")
    return TlsListener(asyncio.get_running_loop(), "127.0.0.1", 0, ctx, lambda _peer: factory(), timeout)


async def test_echo_of_a_large_stream_with_back_pressure(cert: CertFiles) -> None:
    handlers: list[Recorder] = []

    def factory() -> Recorder:
        handlers.append(Recorder(echo=True))
        return handlers[-1]

    listener = listen(cert, factory)
    port = listener.sock.getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx())
        payload = bytes(range(256)) * 16 * 1024  # 4 MiB, more than all buffers on the way

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await reader.readexactly(len(payload))
        await sender
        assert echoed == payload
        writer.close()
        assert await asyncio.wait_for(handlers[0].lost, 10) is None
        assert handlers[0].conn is not None and not handlers[0].conn.is_open
    finally:
        listener.close()


async def test_close_flushes_queued_data_then_sends_close_notify(cert: CertFiles) -> None:
    big = b"q" * (3 * 1024 * 1024)
    listener = listen(cert, lambda: Recorder(greeting=big))
    port = listener.sock.getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx())
        assert await reader.readexactly(len(big)) == big
        assert await reader.read() == b""  # a clean TLS close, not a reset
        writer.close()
    finally:
        listener.close()


async def test_handshake_timeout_and_plain_tcp_peer(cert: CertFiles) -> None:
    handlers: list[Recorder] = []

    def factory() -> Recorder:
        handlers.append(Recorder())
        return handlers[-1]

    listener = listen(cert, factory, timeout=0.3)
    port = listener.sock.getsockname()[1]
    try:
        _reader, silent = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(handlers[0].lost, 10)
        assert isinstance(handlers[0].failed, TimeoutError)
        assert not handlers[0].made.is_set()
        silent.close()

        _reader, plain = await asyncio.open_connection("127.0.0.1", port)
        plain.write(b"GET / HTTP/1.0\r\n\r\n")
        await asyncio.wait_for(handlers[1].lost, 10)
        assert isinstance(handlers[1].failed, ssl.SSLError)
        plain.close()
    finally:
        listener.close()


async def test_client_side_connection(cert: CertFiles) -> None:
    listener = listen(cert, lambda: Recorder(echo=True))
    port = listener.sock.getsockname()[1]
    try:
        client = Recorder()
        conn = await open_tls("127.0.0.1", port, tls.client_context(verify=False, role="sg"), client, 5)
        await asyncio.wait_for(client.made.wait(), 10)
        assert conn.sock.version() in {"TLSv1.2", "TLSv1.3"}
        conn.write(b"hello")
        await asyncio.wait_for(client.got.wait(), 10)
        assert bytes(client.data) == b"hello"
        conn.close()
        assert await asyncio.wait_for(client.lost, 10) is None
        with pytest.raises(OSError):
            await open_tls("127.0.0.1", free_tcp_port(), tls.client_context(verify=False), Recorder(), 5)
    finally:
        listener.close()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
