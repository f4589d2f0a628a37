"""The SG's batched datagram I/O (gatehouse.sg._mmsg) and the relay's batches over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gatehouse import linechan
from gatehouse.sg import _mmsg
from gatehouse.sg.stats import Stats
from gatehouse.sg.udp import UdpRelay
from gatehouse.sg.udp_table import UdpTable

_SO_NO_CHECK = 11  # asm-generic/socket.h


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    receiver.bind((host, 0))
    receiver.setblocking(False)
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.bind((host, 0))
    return receiver, sender


def _wait_readable(sock: socket.socket) -> None:
    sock.settimeout(2)
    sock.recv(1, socket.MSG_PEEK)
    sock.setblocking(False)


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_recv_takes_a_batch_in_order_with_the_socket_modules_addresses(family: int, host: str) -> None:
    receiver, sender = _pair(family, host)
    with receiver, sender:
        assert _mmsg.recv(receiver.fileno(), _mmsg.BATCH) == []
        for n in range(_mmsg.BATCH + 5):
            sender.sendto(b"d%d" % n, receiver.getsockname())
        _wait_readable(receiver)
        first = _mmsg.recv(receiver.fileno(), _mmsg.BATCH)
        rest = _mmsg.recv(receiver.fileno(), 100)  # more than BATCH asked: BATCH at most
        assert [data for data, _a in first + rest] == [b"d%d" % n for n in range(_mmsg.BATCH + 5)]
        assert {addr for _d, addr in first + rest} == {sender.getsockname()}
        assert _mmsg.recv(receiver.fileno(), 1) == []


def test_a_dual_stack_socket_reports_ipv4_clients_as_the_socket_module_does() -> None:
    receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    receiver.bind(("::", 0))
    with receiver, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"one", ("127.0.0.1", receiver.getsockname()[1]))
        sender.sendto(b"two", ("127.0.0.1", receiver.getsockname()[1]))
        _wait_readable(receiver)
        _data, expected = receiver.recvfrom(16)
        ((data, addr),) = _mmsg.recv(receiver.fileno(), 4)
        assert (data, addr) == (b"two", expected) and addr[0] == "::ffff:127.0.0.1"
        # Replies go back to that address through the same socket.
        assert _mmsg.send(receiver.fileno(), [b"back"], addr) == (1, 0, 0, 0)
        sender.settimeout(2)
        assert sender.recv(16) == b"back"


def test_the_largest_datagram_arrives_whole() -> None:
    receiver, sender = _pair(socket.AF_INET, "127.0.0.1")
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    with receiver, sender:
        big = bytes(range(256)) * 255 + b"x" * 27  # 65,307 bytes
        sender.sendto(big, receiver.getsockname())
        _wait_readable(receiver)
        assert _mmsg.recv(receiver.fileno(), 1) == [(big, sender.getsockname())]


def test_send_keeps_the_order_to_an_address_and_to_the_connected_peer() -> None:
    receiver, sender = _pair(socket.AF_INET, "127.0.0.1")
    with receiver, sender:
        datagrams = [b"%d" % n for n in range(3 * _mmsg.BATCH + 1)]  # more than one sendmmsg
        assert _mmsg.send(sender.fileno(), datagrams, receiver.getsockname()) == (len(datagrams), 0, 0, 0)
        sender.connect(receiver.getsockname())
        assert _mmsg.send(sender.fileno(), [b"c1", b"c2"]) == (2, 0, 0, 0)
        _wait_readable(receiver)
        got = []
        while batch := _mmsg.recv(receiver.fileno(), _mmsg.BATCH):
            got += [data for data, _a in batch]
        assert got == [*datagrams, b"c1", b"c2"]


def test_a_refused_datagram_is_counted_and_the_rest_still_go() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        closed = gone.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(closed)
        assert _mmsg.send(sock.fileno(), [b"a"]) == (1, 0, 0, 0)  # an ICMP port unreachable comes back
        time.sleep(0.2)  # ... and is the socket's pending error: the next datagram meets it
        assert _mmsg.send(sock.fileno(), [b"b", b"c", b"d"]) == (2, 0, 1, 0)


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_segmented_sends_arrive_as_the_same_datagrams_in_order(family: int, host: str) -> None:
    """Runs of equal sizes (a shorter last one ends a run) go as UDP_SEGMENT sends; the receiver
    sees exactly the datagrams of the list, in order, however the runs fall."""
    receiver, sender = _pair(family, host)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # 70 x 100 B: more than 64 segments; 56 x 1,200 B: more than 65,000 bytes in one send.
    sizes = [100] * 70 + [1200] * 56 + [500, 1200, 1200, 1, 3000, 3000, 0, 7, 7, 8, 65000, 1200, 1200]
    datagrams = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    with receiver, sender:
        assert _mmsg.send(sender.fileno(), datagrams, receiver.getsockname(), True) == (len(sizes), 0, 0, 0)
        sender.connect(receiver.getsockname())
        assert _mmsg.send(sender.fileno(), datagrams[:5], None, True) == (5, 0, 0, 0)
        _wait_readable(receiver)
        got = []
        while batch := _mmsg.recv(receiver.fileno(), _mmsg.BATCH):
            got += [data for data, _a in batch]
        assert got == datagrams + datagrams[:5]


def test_a_path_that_refuses_segmentation_gets_the_datagrams_one_by_one() -> None:
    receiver, sender = _pair(socket.AF_INET, "127.0.0.1")
    # No UDP checksum on the sender's datagrams: Linux refuses to segment them (EINVAL).
    sender.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)
    datagrams = [b"%04d" % n for n in range(40)]
    with receiver, sender:
        assert _mmsg.send(sender.fileno(), datagrams, receiver.getsockname(), True) == (40, 0, 0, 1)
        _wait_readable(receiver)
        got = []
        while batch := _mmsg.recv(receiver.fileno(), _mmsg.BATCH):
            got += [data for data, _a in batch]
        assert got == datagrams


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="not a numeric IP address"):
            _mmsg.send(sock.fileno(), [b"x"], ("example.org", 4172))
        with pytest.raises(TypeError):
            _mmsg.send(sock.fileno(), ["text"], ("127.0.0.1", 4172))
        with pytest.raises(OverflowError):
            _mmsg.send(sock.fileno(), [b"x"], ("127.0.0.1", 70000))
    with pytest.raises(OSError):
        _mmsg.recv(-1, 1)


async def test_the_relay_passes_a_burst_both_ways_whole_and_in_order() -> None:
    """One session bound over real sockets: 300 datagrams each way arrive whole and in order."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    stats = Stats()
    relay = UdpRelay(UdpTable(), stats, range(base, base + 1))
    agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    agent.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    for sock in (agent, client):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    await relay.start("127.0.0.1", 0)
    assert relay.client_side is not None
    sg = relay.client_side.getsockname()
    try:
        s = relay.open("s1", "127.0.0.1", "g1.tag-burst", "127.0.0.1", agent.getsockname())
        client.sendto(linechan.bind_datagram(s.key, s.key_id, 1), sg)
        client.settimeout(2)
        assert await loop.run_in_executor(None, client.recv, 64) == linechan.bind_ack(s.key, s.key_id, 1)
        count = 300  # small datagrams: well within the 416 KiB receive buffer a default rmem_max allows
        for n in range(count):
            client.sendto(b"up-%d" % n, sg)
        agent.settimeout(5)
        up = [await loop.run_in_executor(None, agent.recvfrom, 64) for _n in range(count)]
        assert [data for data, _a in up] == [b"up-%d" % n for n in range(count)]
        relay_port = up[0][1]
        assert relay_port[1] == base  # from the session's own agent-side port
        for n in range(count):
            agent.sendto(b"down-%d" % n, relay_port)
        down = [await loop.run_in_executor(None, client.recvfrom, 64) for _n in range(count)]
        assert [data for data, _a in down] == [b"down-%d" % n for n in range(count)]
        assert {addr for _d, addr in down} == {sg}
        assert stats.udp_relayed == {"to_agent": count, "to_client": count}
        assert not stats.udp_dropped
    finally:
        relay.close()
        agent.close()
        client.close()
