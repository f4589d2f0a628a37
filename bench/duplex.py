"""Both directions of one TLS stream from one thread.

An ``ssl.SSLSocket`` must not be used from two threads at once (one OpenSSL connection object
under both a reader and a writer); the load generator and the backend stand-in pump both
directions here instead: a non-blocking socket, a selector, reads drained before each write.
"""

from __future__ import annotations

import selectors
import ssl
from collections.abc import Callable

CHUNK = 64 * 1024


def pump(
    conn: ssl.SSLSocket,
    keep_going: Callable[[], bool],
    sent: Callable[[int], None] = lambda _n: None,
    received: Callable[[int], None] = lambda _n: None,
) -> None:
    """Send blocks and read whatever arrives until ``keep_going()`` is false or the peer closes."""
    block = b"d" * CHUNK
    conn.setblocking(False)
    with selectors.DefaultSelector() as selector:
        selector.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while keep_going():
            selector.select(0.5)
            try:
                while True:  # what OpenSSL has buffered does not wake the selector: drain it
                    data = conn.recv(CHUNK)
                    if not data:
                        return
                    received(len(data))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
            try:
                sent(conn.send(block))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                pass
