"""The one-line handshake in front of a relayed session channel (SG and agent session endpoint).

After TLS the client sends ``CONNECT <tag>\\r\\n``; the server answers ``200 OK\\r\\n`` and relays,
or ``403 Forbidden\\r\\n`` (``503 Service Unavailable\\r\\n`` when full, ``502 Bad Gateway\\r\\n``
when the SG cannot reach the agent) and closes. Plain text on
purpose: the seed's troubleshooting reads it with ``openssl s_client``.
"""

from __future__ import annotations

MAX_LINE = 2048
OK = b"200 OK\r\n"
FORBIDDEN = b"403 Forbidden\r\n"
BUSY = b"503 Service Unavailable\r\n"
BAD_REQUEST = b"400 Bad Request\r\n"
BAD_GATEWAY = b"502 Bad Gateway\r\n"  # the grant was good but the agent could not be reached


class LineError(ValueError):
    pass


def connect_line(tag: str) -> bytes:
    return f"CONNECT {tag}\r\n".encode("ascii")


def parse_connect_line(line: bytes) -> str:
    """The tag of a ``CONNECT <tag>`` line (with or without the line ending)."""
    if len(line) > MAX_LINE:
        raise LineError("line too long")
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise LineError("not ASCII") from None
    verb, _sep, tag = text.partition(" ")
    tag = tag.strip()
    if verb != "CONNECT" or not tag or " " in tag:
        raise LineError("expected CONNECT <tag>")
    return tag
