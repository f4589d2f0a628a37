"""Client-side helpers for tests that talk to a real security gateway (and agent session endpoint).

Shared by tests/integration/services/test_sg_agent.py and tests/security/test_sg.py: the CONNECT line over
TLS, the UDP bind, reading answers, scraping the SG's /metrics, waiting for a condition.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable

from gatehouse import linechan

CLIENT = "127.0.0.1"


def client_ctx() -> ssl.SSLContext:
    """A client context that accepts any server certificate (the tests play a client)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def echo_both_ways(sock: ssl.SSLSocket, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send ``payload`` while reading its echo, in one thread; returns what came back.

    One SSL object must not be read and written from two threads at once (OpenSSL gives no such
    guarantee, and the reader then sees a spurious end of stream), so sending and receiving are
    interleaved on a non-blocking socket instead. Both directions stay under flow control: the
    sender waits whenever the SG stops reading.
    """
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent, echoed = 0, bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(echoed) < len(payload) and time.monotonic() < deadline:
            sel.select(0.5)
            while True:  # drain what TLS has decrypted or the socket holds
                try:
                    chunk = sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                if not chunk:
                    return bytes(echoed)
                echoed += chunk
            if sent < len(payload):
                try:
                    sent += sock.send(payload[sent : sent + 16384])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    pass
                if sent == len(payload):
                    sel.modify(sock, selectors.EVENT_READ)
        return bytes(echoed)
    finally:
        sel.close()
        sock.setblocking(True)


def closed_by_peer(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def open_tls(port: int, source: str = CLIENT, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A TLS connection to the SG on 127.0.0.1:``port`` from ``source``."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return (ctx or client_ctx()).wrap_socket(raw)


def connect(port: int, grant: str, source: str = CLIENT) -> tuple[ssl.SSLSocket, bytes]:
    """Send the CONNECT line with ``grant``; the socket and the SG's answer line."""
    sock = open_tls(port, source)
    sock.sendall(linechan.connect_line(grant))
    return sock, read_line(sock)


def udp_bind(udp: socket.socket, grant: str, port: int, counter: int = 1) -> bytes:
    """Bind ``udp``'s address to the grant's session at the SG; returns the bind datagram."""
    key, key_id = linechan.udp_bind_key(grant)
    datagram = linechan.bind_datagram(key, key_id, counter)
    udp.sendto(datagram, ("127.0.0.1", port))
    ack, source = udp.recvfrom(2048)
    assert source == ("127.0.0.1", port)
    assert ack == linechan.bind_ack(key, key_id, counter)
    return datagram


def metrics(admin_port: int) -> dict[str, float]:
    """The SG's /metrics on its management listener (127.0.0.1:``admin_port``), by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _sep, value = line.rpartition(" ")
            values[name] = float(value)
    return values
