"""The SG's UDP bindings: a client address is bound to one session only by a valid bind datagram."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import pytest

from gatehouse import linechan
from gatehouse.sg.stats import Refusals, Stats
from gatehouse.sg.udp import PortPool, UdpRelay
from gatehouse.sg.udp_table import UdpSession, UdpTable
from gatehouse.web import norm_ip, source_key

AGENT = ("10.0.0.5", 4172)
CLIENT_IP = "198.51.100.7"


def session(tag: str = "g1.tag-one", client_ip: str = CLIENT_IP, sid: str = "s1") -> UdpSession:
    key, key_id = linechan.udp_bind_key(tag)
    return UdpSession(sid, client_ip, AGENT, key, key_id)


def bind(s: UdpSession, counter: int) -> bytes:
    return linechan.bind_datagram(s.key, s.key_id, counter)


def test_bind_datagram_and_ack_layout() -> None:
    key, key_id = linechan.udp_bind_key("g1.some-connect-tag")
    assert linechan.udp_bind_key("g1.some-connect-tag") == (key, key_id)
    assert linechan.udp_bind_key("g1.other-connect-tag")[1] != key_id
    data = linechan.bind_datagram(key, key_id, 7)
    assert len(data) == linechan.BIND_LEN == 36
    assert linechan.split_signed(data, linechan.BIND_MAGIC) == (key_id, 7, data[20:])
    assert linechan.split_signed(data, linechan.ACK_MAGIC) is None
    assert linechan.mac_ok(key, data)
    assert not linechan.mac_ok(linechan.udp_bind_key("g1.x")[0], data)
    ack = linechan.bind_ack(key, key_id, 7)
    assert ack != data and linechan.mac_ok(key, ack)
    assert linechan.split_signed(ack, linechan.ACK_MAGIC) is not None
    # The connect-tag itself never travels in a datagram.
    assert b"some-connect-tag" not in data + ack


def test_nothing_is_relayed_before_a_bind() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    assert table.from_client((CLIENT_IP, 5000)) is None
    assert table.bind(b"any datagram", (CLIENT_IP, 5000)) == (None, "unbound")
    assert s.client_addr is None


def test_a_valid_bind_binds_that_address_only() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    assert table.bind(bind(s, 1), (CLIENT_IP, 5000)) == (s, "")
    assert table.from_client((CLIENT_IP, 5000)) is s
    assert s.client_addr == (CLIENT_IP, 5000)
    assert table.from_client((CLIENT_IP, 5001)) is None  # same IP, another port: nothing
    # The same bind resent from its address (lost ack) is answered again and changes nothing.
    assert table.bind(bind(s, 1), (CLIENT_IP, 5000)) == (s, "")


def test_refused_binds() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    table.bind(bind(s, 5), (CLIENT_IP, 5000))
    # Replayed from another port (an on-path copy), or older: refused, the binding stays.
    assert table.bind(bind(s, 5), (CLIENT_IP, 6000)) == (None, "bind-replayed")
    assert table.bind(bind(s, 4), (CLIENT_IP, 6000)) == (None, "bind-replayed")
    # Forged: a MAC under another key, or a flipped bit.
    other = session("g1.another-tag")
    forged = linechan.bind_datagram(other.key, s.key_id, 9)
    assert table.bind(forged, (CLIENT_IP, 6000)) == (None, "bind-forged")
    flipped = bytearray(bind(s, 9))
    flipped[-1] ^= 1
    assert table.bind(bytes(flipped), (CLIENT_IP, 6000)) == (None, "bind-forged")
    # Unknown session; another client IP (the grant is bound to the TLS channel's address).
    assert table.bind(bind(other, 1), (CLIENT_IP, 6000)) == (None, "bind-unknown")
    assert table.bind(bind(s, 9), ("203.0.113.9", 6000)) == (None, "bind-wrong-client")
    assert table.bind(bind(s, 0), (CLIENT_IP, 7000)) == (None, "bind-replayed")
    assert s.client_addr == (CLIENT_IP, 5000) and table.from_client((CLIENT_IP, 5000)) is s


def test_rebinding_with_a_higher_counter_moves_the_session() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    table.bind(bind(s, 1), (CLIENT_IP, 5000))
    assert table.bind(bind(s, 2), (CLIENT_IP, 5002)) == (s, "")  # NAT rebinding
    assert table.from_client((CLIENT_IP, 5000)) is None
    assert table.from_client((CLIENT_IP, 5002)) is s


def test_two_sessions_of_one_ip_stay_apart() -> None:
    table = UdpTable()
    a, b = session("g1.tag-a", sid="a"), session("g1.tag-b", sid="b")
    table.add(a)
    table.add(b)
    table.bind(bind(a, 1), (CLIENT_IP, 1111))
    table.bind(bind(b, 1), (CLIENT_IP, 2222))
    assert table.from_client((CLIENT_IP, 1111)) is a
    assert table.from_client((CLIENT_IP, 2222)) is b
    # b cannot take a's address, even with a valid bind of its own.
    assert table.bind(bind(b, 2), (CLIENT_IP, 1111)) == (None, "bind-address-in-use")
    assert table.from_client((CLIENT_IP, 1111)) is a


def test_removed_session_stops_relaying() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    table.bind(bind(s, 1), (CLIENT_IP, 5000))
    table.remove(s)
    assert table.from_client((CLIENT_IP, 5000)) is None
    assert table.bind(bind(s, 2), (CLIENT_IP, 5000)) == (None, "bind-unknown")
    assert len(table) == 0
    table.remove(s)  # idempotent


def test_mapped_ipv4_matches_plain_ipv4() -> None:
    assert norm_ip("::ffff:198.51.100.7") == "198.51.100.7"
    assert norm_ip("fe80::1%eth0") == "fe80::1"
    table = UdpTable()
    s = session(client_ip="::ffff:198.51.100.7")
    table.add(s)
    addr = ("::ffff:198.51.100.7", 5000, 0, 0)  # as a dual-stack socket reports it
    assert table.bind(bind(s, 1), addr) == (s, "")
    assert table.from_client(addr) is s


def test_source_key_groups_an_ipv6_host_by_its_64() -> None:
    assert source_key("198.51.100.7") == "198.51.100.7"
    assert source_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::5") != source_key("2001:db8:1:2::5")


def test_refusals_are_counted_in_full_and_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    stats = Stats()
    refusals = Refusals(stats, logging.getLogger("test.sg.refusals"), rate=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.sg.refusals"):
        for _n in range(50):
            refusals.refuse("forged", CLIENT_IP, logging.WARNING, "refused: %s", "forged")
        refusals.refuse("expired", CLIENT_IP, logging.WARNING, "refused: %s", "expired")
        assert stats.refused == {"forged": 50, "expired": 1}
        assert [r.getMessage() for r in caplog.records].count("refused: forged") == 3
        assert stats.log_suppressed["forged"] == 47
        now[0] += 1.0  # the next second: the next line says how many were held back
        refusals.refuse("forged", CLIENT_IP, logging.WARNING, "refused: %s", "forged")
    assert caplog.records[-1].suppressed == 47  # type: ignore[attr-defined]
    assert (caplog.records[-1].client, caplog.records[-1].reason) == (CLIENT_IP, "forged")  # type: ignore[attr-defined]
    assert stats.refused["forged"] == 51


def _squat_below_two_free_ports() -> tuple[socket.socket, int]:
    """A UDP socket bound to port P (below the ephemeral range) where P+1 and P+2 are free."""
    rng = random.SystemRandom()
    for _attempt in range(100):
        base = rng.randrange(20000, 32000)
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            squatter.bind(("127.0.0.1", base))
            for port in (base + 1, base + 2):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            squatter.close()
            continue
        return squatter, base
    raise AssertionError("no three consecutive free UDP ports")


def test_port_pool_skips_ports_held_elsewhere_and_reuses_freed_ports_last() -> None:
    squatter, base = _squat_below_two_free_ports()
    pool = PortPool(range(base, base + 3))
    agent = ("127.0.0.1", 9)  # connect() on UDP sends nothing
    with squatter:
        first = pool.open("127.0.0.1", agent)
        assert first is not None and first[1] == base + 1  # base is held by another socket
        second = pool.open("127.0.0.1", agent)
        assert second is not None and second[1] == base + 2
        assert second[0].getpeername() == agent
        for sock, _port in (first, second):
            sock.close()
        pool.release(first[1])
        third = pool.open("127.0.0.1", agent)
        assert third is not None and third[1] == base + 1  # base is still held; base+1 was freed first
        third[0].close()


def test_a_bind_that_finds_no_agent_port_changes_nothing() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    addr = (CLIENT_IP, 5000)
    assert table.bind(bind(s, 1), addr, lambda _s: False) == (None, "agent-ports-exhausted")
    assert s.client_addr is None and s.counter == 0 and table.from_client(addr) is None
    assert table.bind(bind(s, 1), addr) == (s, "")  # the client's retry, once a port is free


class _ClientSide:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


async def test_agent_side_sockets_are_opened_at_the_first_bind_and_counted_once_when_none_is_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    stats = Stats()
    relay = UdpRelay(UdpTable(), stats, range(base, base + 1))
    relay.loop = asyncio.get_running_loop()
    client_side = _ClientSide()
    relay.client_side = client_side  # type: ignore[assignment]
    agent = ("127.0.0.1", 9)
    a = relay.open("a", "127.0.0.1", "g1.tag-a", "127.0.0.1", agent)
    b = relay.open("b", "127.0.0.1", "g1.tag-b", "127.0.0.1", agent)
    assert relay.pool.in_use() == 0 and a.sock is None and b.sock is None  # no bind, no socket
    relay.from_clients([(bind(a, 1), ("127.0.0.1", 1111))])
    assert a.sock is not None and relay.pool.in_use() == 1
    assert client_side.sent == [(linechan.bind_ack(a.key, a.key_id, 1), ("127.0.0.1", 1111))]
    for _n in range(3):  # b's binds (a client retrying): dropped unanswered, counted once per session
        relay.from_clients([(bind(b, 1), ("127.0.0.1", 2222))])
    assert b.sock is None and b.client_addr is None and len(client_side.sent) == 1
    assert stats.udp_ports_exhausted == 1 and stats.udp_dropped["agent-ports-exhausted"] == 3
    relay.remove(a)
    assert relay.pool.in_use() == 0
    relay.from_clients([(bind(b, 1), ("127.0.0.1", 2222))])  # a's port is free again
    assert b.sock is not None and b.client_addr == ("127.0.0.1", 2222) and relay.pool.in_use() == 1
    relay.remove(b)
    assert relay.pool.in_use() == 0 and b.sock is None


FORWARDER = ("10.10.0.5", 41000)


def test_through_a_forwarder_the_header_address_is_checked_and_replies_go_to_the_forwarder() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    # The forwarder's own address is not the client's: refused as from any other address.
    assert table.bind(bind(s, 1), FORWARDER) == (None, "bind-wrong-client")
    # A header naming another client: refused exactly as a direct datagram from it.
    assert table.bind(bind(s, 1), FORWARDER, client=("203.0.113.9", 5000)) == (None, "bind-wrong-client")
    assert table.bind(bind(s, 1), FORWARDER, client=(CLIENT_IP, 5000)) == (s, "")
    assert s.client_addr == (FORWARDER, (CLIENT_IP, 5000)) and s.reply_addr == FORWARDER
    # Never bound as the forwarder's plain address, nor as the client's own.
    assert table.from_client(FORWARDER) is None and table.from_client((CLIENT_IP, 5000)) is None
    assert table.from_client((FORWARDER, (CLIENT_IP, 5000))) is s
    # The same bind again (lost ack) changes nothing; a direct replay from the client's address
    # is a replay.
    assert table.bind(bind(s, 1), FORWARDER, client=(CLIENT_IP, 5000)) == (s, "")
    assert table.bind(bind(s, 1), (CLIENT_IP, 5000)) == (None, "bind-replayed")
    table.remove(s)
    assert table.from_client((FORWARDER, (CLIENT_IP, 5000))) is None
