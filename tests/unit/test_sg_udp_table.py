"""The SG's UDP admission and reply mapping."""

from __future__ import annotations

from gatehouse.sg.udp_table import UdpSession, UdpTable, norm_ip

AGENT = ("10.0.0.5", 4172)


def session(client_ip: str = "198.51.100.7", agent: tuple[str, int] = AGENT, sid: str = "s1") -> UdpSession:
    return UdpSession(sid, client_ip, agent)


def test_unknown_client_is_dropped() -> None:
    table = UdpTable()
    table.add(session())
    assert table.from_client(("198.51.100.8", 5000)) is None
    assert table.from_agent(AGENT) is None  # no client port known yet


def test_client_binds_and_replies_go_back_to_its_port() -> None:
    table = UdpTable()
    table.add(session())
    s = table.from_client(("198.51.100.7", 5000))
    assert s is not None and s.agent_addr == AGENT
    back = table.from_agent(AGENT)
    assert back is s and back.client_addr == ("198.51.100.7", 5000)


def test_new_source_port_binds_to_the_newest_session_of_that_ip() -> None:
    table = UdpTable()
    old, new = session(sid="old", agent=("10.0.0.5", 4172)), session(sid="new", agent=("10.0.0.6", 4172))
    table.add(old)
    table.add(new)
    assert table.from_client(("198.51.100.7", 6000)) is new
    # The port changes (NAT rebinding): replies follow the new port.
    assert table.from_client(("198.51.100.7", 6001)) is new
    reply = table.from_agent(("10.0.0.6", 4172))
    assert reply is not None and reply.client_addr == ("198.51.100.7", 6001)


def test_removed_session_stops_relaying() -> None:
    table = UdpTable()
    s = session()
    table.add(s)
    assert table.from_client(("198.51.100.7", 5000)) is s
    table.remove(s)
    assert table.from_client(("198.51.100.7", 5000)) is None
    assert table.from_agent(AGENT) is None
    assert len(table) == 0
    table.remove(s)  # idempotent


def test_agent_shared_by_two_clients_answers_the_last_sender() -> None:
    table = UdpTable()
    a, b = session("198.51.100.1", sid="a"), session("198.51.100.2", sid="b")
    table.add(a)
    table.add(b)
    table.from_client(("198.51.100.1", 1111))
    assert table.from_agent(AGENT) is a
    table.from_client(("198.51.100.2", 2222))
    assert table.from_agent(AGENT) is b
    table.remove(b)
    assert table.from_agent(AGENT) is a  # the other session takes the replies over


def test_mapped_ipv4_matches_plain_ipv4() -> None:
    assert norm_ip("::ffff:198.51.100.7") == "198.51.100.7"
    assert norm_ip("fe80::1%eth0") == "fe80::1"
    table = UdpTable()
    s = session("::ffff:198.51.100.7", agent=("::ffff:10.0.0.5", 4172))
    table.add(s)
    assert table.from_client(("198.51.100.7", 5000)) is s
    assert table.from_agent(("10.0.0.5", 4172)) is s
