"""The PROXY v2 header a forwarder sends and an inner SG reads: built, parsed, and refused."""

from __future__ import annotations

import struct

import pytest

from gatehouse.sg import proxyproto as pp


def test_ipv4_stream_header_round_trips() -> None:
    header = pp.build(("203.0.113.7", 50123), ("192.0.2.1", 4172))
    assert header.startswith(pp.SIGNATURE) and len(header) == 16 + 12
    assert header[12:14] == b"\x21\x11"  # v2 PROXY, INET STREAM
    assert pp.needed(header) == 0
    assert pp.parse(header + b"\x16\x03\x01", pp.STREAM) == (("203.0.113.7", 50123), 28)


def test_ipv6_and_dgram_headers_round_trip() -> None:
    header = pp.build(("2001:db8::5", 40000), ("2001:db8::1", 4172), pp.DGRAM)
    assert len(header) == 16 + 36 and header[13] == 0x22
    assert pp.parse(header + b"payload", pp.DGRAM) == (("2001:db8::5", 40000), 52)


def test_a_mapped_client_on_a_dual_stack_listener_is_passed_as_ipv4() -> None:
    header = pp.build(("::ffff:198.51.100.9", 1234), ("::", 4172))
    assert header[13] == 0x11
    assert pp.parse(header)[0] == ("198.51.100.9", 1234)


def test_needed_tells_a_stream_reader_how_much_to_read() -> None:
    header = pp.build(("203.0.113.7", 50123), ("192.0.2.1", 4172))
    assert pp.needed(b"") == 16
    assert pp.needed(header[:5]) == 11
    assert pp.needed(header[:16]) == 12
    assert pp.needed(header[:20]) == 8
    assert pp.needed(header) == 0


def test_tlvs_after_the_addresses_are_skipped() -> None:
    header = pp.build(("203.0.113.7", 50123), ("192.0.2.1", 4172))
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
    grown = header[:14] + struct.pack("!H", 12 + len(tlv)) + header[16:] + tlv
    assert pp.parse(grown) == (("203.0.113.7", 50123), len(grown))


def _with(header: bytes, offset: int, value: bytes) -> bytes:
    return header[:offset] + value + header[offset + len(value) :]


GOOD = pp.build(("203.0.113.7", 50123), ("192.0.2.1", 4172))


@pytest.mark.parametrize(
    ("data", "transport"),
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 4172\r\n", pp.STREAM, id="v1-text"),
        pytest.param(b"\x16\x03\x01\x02\x00", pp.STREAM, id="tls-instead"),
        pytest.param(_with(GOOD, 12, b"\x20"), pp.STREAM, id="local-command"),
        pytest.param(_with(GOOD, 12, b"\x11"), pp.STREAM, id="version-1"),
        pytest.param(_with(GOOD, 12, b"\x22"), pp.STREAM, id="unknown-command"),
        pytest.param(_with(GOOD, 13, b"\x01"), pp.STREAM, id="unspec-family"),
        pytest.param(_with(GOOD, 13, b"\x31"), pp.STREAM, id="unix-family"),
        pytest.param(GOOD, pp.DGRAM, id="stream-as-dgram"),
        pytest.param(_with(GOOD, 14, b"\x00\x08")[:24], pp.STREAM, id="address-block-short"),
        pytest.param(_with(GOOD, 16, b"\x00\x00\x00\x00"), pp.STREAM, id="unspecified-source"),
        pytest.param(_with(GOOD, 16, b"\xe0\x00\x00\x01"), pp.STREAM, id="multicast-source"),
        pytest.param(_with(GOOD, 24, b"\x00\x00"), pp.STREAM, id="source-port-0"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, transport: int) -> None:
    with pytest.raises(pp.ProxyError) as info:
        pp.parse(data, transport)
    assert info.value.reason == "proxy-malformed"


@pytest.mark.parametrize("cut", [0, 1, 12, 15, 16, 27])
def test_truncated_headers_are_refused(cut: int) -> None:
    with pytest.raises(pp.ProxyError, match="truncated"):
        pp.parse(GOOD[:cut])


def test_a_wrong_signature_is_refused_from_its_first_byte() -> None:
    with pytest.raises(pp.ProxyError):
        pp.needed(b"\x16")
    with pytest.raises(pp.ProxyError):
        pp.needed(pp.SIGNATURE[:6] + b"X")


def test_an_oversized_header_is_refused_before_it_is_read() -> None:
    oversized = GOOD[:14] + struct.pack("!H", pp.MAX_LENGTH + 1)
    with pytest.raises(pp.ProxyError, match="longer"):
        pp.needed(oversized)
    huge = GOOD[:14] + b"\xff\xff" + GOOD[16:]
    with pytest.raises(pp.ProxyError, match="longer"):
        pp.parse(huge + bytes(70000))
