"""The PROXY protocol v2 header (haproxy.org proxy-protocol.txt, section 2.2), strictly.

A forwarding SG puts one header in front of each TCP connection and each UDP datagram it passes
to an inner SG, naming the client's address. The inner SG reads headers only from its
ProxyProtocolSources and uses the named address for admission, the grant check and the UDP bind.

Invariants:

- :func:`parse` accepts exactly what :func:`build` produces and the same from other senders:
  the 12-byte signature, version 2, command PROXY, family INET or INET6, transport STREAM or
  DGRAM as the caller expects, and an address block of at least its family's size. TLVs after
  the addresses are allowed (and skipped) up to :data:`MAX_LENGTH` bytes in all; anything else
  (v1 text headers, LOCAL, UNSPEC or UNIX families, a longer header) raises :class:`ProxyError`.
- It never reads past the header: ``parse`` reports how many bytes the header took, and
  :func:`needed` tells a stream reader how many bytes to read next, so that the TLS bytes
  after the header stay in the socket.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16  # signature, version/command, family/transport, length
MAX_LENGTH = 256  # address block + TLVs we accept (ours: 12 or 36 bytes)

STREAM = 0x1
DGRAM = 0x2
_V2_PROXY = 0x21
_INET = 0x1
_INET6 = 0x2
_ADDR_LEN = {_INET: 12, _INET6: 36}


class ProxyError(ValueError):
    """Not a valid PROXY v2 header for us; ``reason`` is the refusal reason for the counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def build(src: tuple[str, int], dst: tuple[str, int], transport: int = STREAM) -> bytes:
    """The header naming ``src`` (the client) and ``dst`` (where it connected); both of one family
    (an IPv4 client of a dual-stack socket is passed as a plain IPv4 address)."""
    src_ip = _plain(src[0])
    dst_ip = _plain(dst[0])
    if src_ip.version != dst_ip.version:
        # A v4 client on a v6 listener: name the listener by its family's unspecified address.
        dst_ip = ipaddress.ip_address("0.0.0.0" if src_ip.version == 4 else "::")
    family = _INET if src_ip.version == 4 else _INET6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", src[1], dst[1])
    return SIGNATURE + bytes([_V2_PROXY, (family << 4) | transport]) + struct.pack("!H", len(body)) + body


def needed(buf: bytes) -> int:
    """How many more bytes make the header in ``buf`` complete (0: complete). Raises ProxyError as
    soon as the bytes so far cannot begin a valid header, so a wrong sender is refused early."""
    head = buf[: len(SIGNATURE)]
    if SIGNATURE[: len(head)] != head:
        raise ProxyError("proxy-malformed", "not a PROXY v2 signature")
    if len(buf) < FIXED:
        return FIXED - len(buf)
    length = struct.unpack_from("!H", buf, 14)[0]
    if length > MAX_LENGTH:
        raise ProxyError("proxy-malformed", f"header longer than {MAX_LENGTH} bytes")
    return max(0, FIXED + length - len(buf))


def parse(buf: bytes, transport: int = STREAM) -> tuple[tuple[str, int], int]:
    """``((client_ip, client_port), header_length)`` of the header at the start of ``buf``."""
    if needed(buf):
        raise ProxyError("proxy-malformed", "truncated header")
    ver_cmd, fam_proto = buf[12], buf[13]
    if ver_cmd != _V2_PROXY:
        raise ProxyError("proxy-malformed", f"version/command 0x{ver_cmd:02x} (only v2 PROXY)")
    family, proto = fam_proto >> 4, fam_proto & 0x0F
    if family not in _ADDR_LEN:
        raise ProxyError("proxy-malformed", "address family other than INET or INET6")
    if proto != transport:
        raise ProxyError("proxy-malformed", "transport other than expected")
    length = struct.unpack_from("!H", buf, 14)[0]
    if length < _ADDR_LEN[family]:
        raise ProxyError("proxy-malformed", "address block too short")
    size = 4 if family == _INET else 16
    raw_ip = buf[FIXED : FIXED + size]
    (port,) = struct.unpack_from("!H", buf, FIXED + 2 * size)
    ip = ipaddress.IPv4Address(raw_ip) if family == _INET else ipaddress.IPv6Address(raw_ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or port == 0:
        raise ProxyError("proxy-malformed", "source address or port not a client's")
    return (str(ip), port), FIXED + length


def _plain(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr
