"""A TLS probe that offers old protocols and weak suites, and the proof that it really can.

A handshake that fails says nothing by itself: the client may never have offered what the test
is about (OpenSSL refuses TLS 1.0/1.1 at its default security level). :func:`assert_probe_offers`
first completes the same handshakes against a local server that accepts everything, so a later
refusal by the server under test is that server's.
"""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

OLD_VERSIONS = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)


def handshake(host: str, port: int, ctx: ssl.SSLContext) -> tuple[str, str] | None:
    """(protocol, cipher) of a completed handshake, None when either side refused it."""
    try:
        with socket.create_connection((host, port), timeout=3) as raw:
            with ctx.wrap_socket(raw) as tls:
                cipher = tls.cipher()
                return tls.version() or "", cipher[0] if cipher else ""
    except (OSError, ssl.SSLError):
        return None


def probe_context(cipher: str | None, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client offering exactly ``version`` (and ``cipher``, at security level 0)."""
    with warnings.catch_warnings():
        # TLS 1.0/1.1 are deprecated in Python: offering them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = version
        ctx.maximum_version = version
    if cipher:
        # SECLEVEL 0: the client offers everything, the server's table alone decides.
        ctx.set_ciphers(cipher + ":@SECLEVEL=0")
    return ctx


def assert_probe_offers(
    cert: Path, key: Path, versions: Iterable[ssl.TLSVersion] = OLD_VERSIONS, cipher: str = "AES128-SHA"
) -> None:
    """The probe completes each of ``versions`` with ``cipher`` against a server accepting all."""
    versions = list(versions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
    server_ctx.set_ciphers("ALL:@SECLEVEL=0")
    server_ctx.load_cert_chain(cert, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            for _attempt in versions:
                conn, _addr = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True):
                        pass
                except (OSError, ssl.SSLError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        for version in versions:
            assert handshake("127.0.0.1", port, probe_context(cipher, version)) is not None, version
        thread.join(5)
