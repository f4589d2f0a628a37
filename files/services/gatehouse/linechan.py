"""The handshakes in front of a relayed session channel (SG and agent session endpoint).

TCP: after TLS the client sends ``CONNECT <tag>\\r\\n``; the server answers ``200 OK\\r\\n`` and
relays, or ``403 Forbidden\\r\\n`` (``502 Bad Gateway\\r\\n`` when the SG cannot reach the agent) and
closes. Plain text on purpose: the seed's troubleshooting reads it with ``openssl s_client``.

UDP: before its datagrams are relayed, a client binds its UDP address to its session with a bind
datagram that only the holder of the connect-tag can make (the tag travelled inside TLS; only the
client and the SG know it). See docs/architecture.md, "UDP".

``BIND_MAGIC | key-id (8) | counter (8, big-endian) | HMAC-SHA256(key, magic|key-id|counter)[:16]``

``key`` is derived from the connect-tag, ``key-id`` from the key (it names the session without
revealing the key). The SG binds the datagram's source address to the session when the MAC
verifies and the counter is higher than the last one it accepted, and answers with the same
layout under ``ACK_MAGIC``. An agent reached directly (no SG) echoes the bind datagram unchanged.
"""

from __future__ import annotations

import hashlib
import hmac

MAX_LINE = 2048
OK = b"200 OK\r\n"
FORBIDDEN = b"403 Forbidden\r\n"
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


# ---------------------------------------------------------------- UDP bind datagram

BIND_MAGIC = b"GHB1"
ACK_MAGIC = b"GHA1"
KEY_ID_LEN = 8
MAC_LEN = 16
BIND_LEN = 4 + KEY_ID_LEN + 8 + MAC_LEN  # 36 bytes
_KEY_INFO = b"gatehouse udp-bind key v1"
_ID_INFO = b"gatehouse udp-bind key-id v1"


def udp_bind_key(connect_tag: str) -> tuple[bytes, bytes]:
    """``(key, key_id)`` of a session's UDP binding, derived from its connect-tag."""
    key = hmac.new(connect_tag.encode("utf-8"), _KEY_INFO, hashlib.sha256).digest()
    return key, hmac.new(key, _ID_INFO, hashlib.sha256).digest()[:KEY_ID_LEN]


def _mac(key: bytes, head: bytes) -> bytes:
    return hmac.new(key, head, hashlib.sha256).digest()[:MAC_LEN]


def _signed(magic: bytes, key: bytes, key_id: bytes, counter: int) -> bytes:
    head = magic + key_id + counter.to_bytes(8, "big")
    return head + _mac(key, head)


def bind_datagram(key: bytes, key_id: bytes, counter: int) -> bytes:
    """The client's bind datagram; ``counter`` must grow with every new source address."""
    return _signed(BIND_MAGIC, key, key_id, counter)


def bind_ack(key: bytes, key_id: bytes, counter: int) -> bytes:
    """The SG's answer to an accepted bind datagram."""
    return _signed(ACK_MAGIC, key, key_id, counter)


def split_signed(data: bytes, magic: bytes) -> tuple[bytes, int, bytes] | None:
    """``(key_id, counter, mac)`` of a bind datagram or ack with ``magic``, or None."""
    if len(data) != BIND_LEN or data[:4] != magic:
        return None
    return data[4:12], int.from_bytes(data[12:20], "big"), data[20:]


def mac_ok(key: bytes, data: bytes) -> bool:
    """Whether a bind datagram or ack (already split) carries a valid MAC under ``key``."""
    return hmac.compare_digest(_mac(key, data[: BIND_LEN - MAC_LEN]), data[BIND_LEN - MAC_LEN :])
