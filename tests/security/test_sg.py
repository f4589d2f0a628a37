"""Attacks on the security gateway, against the real processes of the hardened stack.

Each test runs the attack, shows it is stopped, and runs a whole legitimate session (TCP and UDP
echo through the CM and the SG) during and after it. Where an attack needs sessions of its own,
the test plays the CM (launch-session to the agent with the stack's CM identity, a grant sealed
with the CM/SG secret), so that it holds the connect-tags an attacker would have for its own
sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pki as pkimod
import pytest
import sg_helpers
import stack as hardened
from services import ServiceProcess, free_port
from sg_helpers import CLIENT, client_ctx, read_line, wait_for

from gatehouse import linechan, protocol
from gatehouse.grant import GrantSealer, decode_secret
from gatehouse.sg import _mmsg

REQUEST_TIMEOUT = 2.0  # the SG's RequestTimeout here: handshake + CONNECT line
PER_SOURCE = 8  # the SG's MaxConnectionsPerSource here
REFUSAL_LOG_RATE = 10  # gatehouse.sg.settings.REFUSAL_LOG_RATE
SEEN: list[str] = []  # connect-tags and session-tags the tests handled; never in a log
T = TypeVar("T")


@pytest.fixture(scope="module")
def st(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    s = hardened.build(
        pki,
        Path(tmp_path_factory.mktemp("sg")),
        sg={"MaxConnectionsPerSource": PER_SOURCE, "RequestTimeout": REQUEST_TIMEOUT},
    )
    yield s
    s.stop()


# ---------------------------------------------------------------- helpers


def metrics(st: hardened.Stack) -> dict[str, float]:
    return sg_helpers.metrics(st.sg_admin_port)


def refused(m: dict[str, float], reason: str) -> float:
    return m.get(f'gatehouse_sg_sessions_refused_total{{reason="{reason}"}}', 0.0)


def dropped(m: dict[str, float], reason: str) -> float:
    return m.get(f'gatehouse_sg_udp_datagrams_dropped_total{{reason="{reason}"}}', 0.0)


def grant_for(st: hardened.Stack, desk: str, client_ip: str = CLIENT) -> str:
    """Play the CM: a session-tag from ``desk``'s agent and a grant for the SG (the connect-tag)."""
    address, control, session_port = st.agents[desk]
    sid = str(uuid.uuid4())
    body = protocol.render("pcoip-agent", protocol.LaunchSession(sid, client_ip, hardened.USER, "CORP"))
    ctx = ssl.create_default_context(cafile=str(st.pki.ca))
    ctx.load_cert_chain(st.identities["cm"].cert, st.identities["cm"].key)
    req = urllib.request.Request(
        f"https://{address}:{control}/pcoip-agent/xml",
        data=body,
        method="POST",
        headers={"Content-Type": protocol.CONTENT_TYPE},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        msg = protocol.parse(resp.read(), "pcoip-agent")
    assert isinstance(msg, protocol.LaunchSessionResp) and msg.session_info is not None, msg
    tag = msg.session_info.session_tag
    grant = GrantSealer(decode_secret(hardened.SECRET)).mint(sid, address, session_port, tag, client_ip)
    SEEN.extend([tag, grant])
    return grant


def open_channel(st: hardened.Stack, grant: str, source: str = CLIENT) -> tuple[ssl.SSLSocket, bytes]:
    return sg_helpers.connect(st.sg_port, grant, source)


def udp_socket(source: str = CLIENT) -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((source, 0))
    udp.settimeout(3)
    return udp


def bind(st: hardened.Stack, udp: socket.socket, grant: str, counter: int = 1) -> bytes:
    return sg_helpers.udp_bind(udp, grant, st.sg_port, counter)


def received(udp: socket.socket, wait: float = 0.5) -> list[bytes]:
    """Everything that reaches ``udp`` within ``wait`` seconds."""
    got = []
    udp.settimeout(wait)
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(udp.recvfrom(4096)[0])
    udp.settimeout(3)
    return got


async def during(st: hardened.Stack, attack: Callable[[], T]) -> T:
    """Run the (blocking) attack in a thread while a legitimate session runs; both must end."""
    result, report = await asyncio.gather(asyncio.to_thread(attack), st.session())
    hardened.assert_session_ok(report)
    return result


def after(st: hardened.Stack) -> None:
    st.assert_no_secrets_logged(*SEEN)


# ---------------------------------------------------------------- 1. UDP misdelivery


async def test_udp_sessions_on_one_desktop_get_only_their_own_datagrams(st: hardened.Stack) -> None:
    """Two sessions from one client IP to one multi-session desktop; a third socket of that IP
    spoofs, forges and replays. Before the fix the SG matched datagrams by IP and replies by "last
    sender", so the sessions received each other's echoes and any datagram moved the downstream."""
    before = metrics(st)

    def attack() -> None:
        grant_a, grant_b = grant_for(st, "desk-b"), grant_for(st, "desk-b")
        chan_a, answer_a = open_channel(st, grant_a)
        chan_b, answer_b = open_channel(st, grant_b)
        with chan_a, chan_b, udp_socket() as ua, udp_socket() as ub, udp_socket() as mallory:
            assert (answer_a, answer_b) == (linechan.OK, linechan.OK)
            bind_a = bind(st, ua, grant_a)
            bind(st, ub, grant_b)
            sg = ("127.0.0.1", st.sg_port)
            for i in range(5):
                ua.sendto(b"A-%d" % i, sg)
                ub.sendto(b"B-%d" % i, sg)
            assert sorted(received(ua)) == [b"A-%d" % i for i in range(5)]
            assert sorted(received(ub)) == [b"B-%d" % i for i in range(5)]

            # Spoofed: same IP, another port, no valid bind. Nothing is relayed, nothing moves.
            mallory.sendto(b"take over", sg)
            # Forged: a's key-id with a wrong MAC; and a bind under a made-up tag.
            key_a, id_a = linechan.udp_bind_key(grant_a)
            forged = bytearray(linechan.bind_datagram(key_a, id_a, 99))
            forged[-1] ^= 1
            mallory.sendto(bytes(forged), sg)
            mallory.sendto(linechan.bind_datagram(*linechan.udp_bind_key("g1.guessed"), 1), sg)
            # Replayed: a's bind datagram as seen on the path, sent again from another port.
            mallory.sendto(bind_a, sg)
            ua.sendto(b"A-after", sg)
            ub.sendto(b"B-after", sg)
            assert received(mallory) == []
            assert received(ua) == [b"A-after"]
            assert received(ub) == [b"B-after"]

    await during(st, attack)
    m = metrics(st)
    assert dropped(m, "unbound") - dropped(before, "unbound") >= 1
    assert dropped(m, "bind-forged") - dropped(before, "bind-forged") == 1
    assert dropped(m, "bind-unknown") - dropped(before, "bind-unknown") == 1
    assert dropped(m, "bind-replayed") - dropped(before, "bind-replayed") == 1
    hardened.assert_session_ok(await st.session())
    after(st)


async def test_rebinding_needs_a_higher_counter(st: hardened.Stack) -> None:
    """NAT rebinding: a new address with a higher counter moves the session; the old one is dead."""

    def attack() -> None:
        grant = grant_for(st, "desk-a")
        chan, answer = open_channel(st, grant)
        with chan, udp_socket() as first, udp_socket() as second:
            assert answer == linechan.OK
            sg = ("127.0.0.1", st.sg_port)
            bind(st, first, grant, counter=1)
            bind(st, second, grant, counter=2)
            first.sendto(b"old address", sg)
            second.sendto(b"new address", sg)
            assert received(first) == []
            assert received(second) == [b"new address"]

    await during(st, attack)
    hardened.assert_session_ok(await st.session())
    after(st)


async def test_a_udp_flood_leaves_other_sessions_relaying(st: hardened.Stack) -> None:
    """One client floods, as fast as one core sends, through its own bound session (to its agent,
    which echoes it all back) and from an unbound address; the SG reads one batch per socket per
    wake of its loop, so the flood takes turns with everyone else and a legitimate session's TCP
    and UDP still complete beside it."""
    payload = [b"x" * 1200] * 32
    before = metrics(st)

    def attack() -> int:
        grant = grant_for(st, "desk-a")
        chan, answer = open_channel(st, grant)
        with chan, udp_socket() as bound, udp_socket() as unbound:
            assert answer == linechan.OK
            bind(st, bound, grant)
            sg = ("127.0.0.1", st.sg_port)
            sent = 0
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                sent += _mmsg.send(bound.fileno(), payload, sg)[0]
                sent += _mmsg.send(unbound.fileno(), payload, sg)[0]
            return sent

    sent = await during(st, attack)
    m = metrics(st)
    relayed = 'gatehouse_sg_udp_datagrams_relayed_total{direction="to_agent"}'
    assert sent > 20_000  # the flood really ran
    assert m[relayed] - before.get(relayed, 0.0) > 5_000  # ... and really reached the agent
    assert dropped(m, "unbound") - dropped(before, "unbound") > 5_000
    hardened.assert_session_ok(await st.session())
    after(st)


# ---------------------------------------------------------------- 2. connection floods


def hold(source: str, count: int, port: int) -> list[socket.socket]:
    socks = []
    for _n in range(count):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)))
    return socks


def still_open(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


async def test_idle_sockets_from_one_source_are_capped_and_closed_by_the_deadline(
    st: hardened.Stack,
) -> None:
    """40 TCP sockets from one source that never start TLS (slowloris on the handshake)."""
    before = metrics(st)

    def attack() -> tuple[int, float]:
        socks = hold("127.0.0.5", 40, st.sg_port)
        try:
            time.sleep(0.3)
            gauge = metrics(st)["gatehouse_sg_connections_handshaking"]
            alive = sum(still_open(s, 0.05) for s in socks)
            # The deadline (RequestTimeout from accept) closes those that were let in.
            wait_for(lambda: not any(still_open(s, 0.01) for s in socks), "the deadline", 3 * REQUEST_TIMEOUT)
            return alive, gauge
        finally:
            for s in socks:
                s.close()

    alive, handshaking = await during(st, attack)
    assert alive == PER_SOURCE
    assert handshaking >= PER_SOURCE  # handshaking sockets are counted (against MaxConnections too)
    m = metrics(st)
    assert refused(m, "per-source") - refused(before, "per-source") == 40 - PER_SOURCE
    assert refused(m, "timeout") - refused(before, "timeout") >= PER_SOURCE
    assert m["gatehouse_sg_connections_open"] <= 1
    hardened.assert_session_ok(await st.session())
    after(st)


async def test_tls_up_but_no_connect_line_is_closed_by_the_deadline(st: hardened.Stack) -> None:
    def attack() -> int:
        socks = [client_ctx().wrap_socket(s) for s in hold("127.0.0.6", PER_SOURCE, st.sg_port)]
        started = time.monotonic()
        try:
            # While they are held, one more from that source is closed at accept.
            with socket.create_connection(("127.0.0.1", st.sg_port), 5, ("127.0.0.6", 0)) as extra:
                assert not still_open(extra, 1.0)
            for s in socks:
                s.settimeout(3 * REQUEST_TIMEOUT)
                assert read_line(s) == linechan.FORBIDDEN  # refused: timeout
            assert time.monotonic() - started < 2 * REQUEST_TIMEOUT
            return len(socks)
        finally:
            for s in socks:
                s.close()

    assert await during(st, attack) == PER_SOURCE
    hardened.assert_session_ok(await st.session())
    after(st)


async def test_a_flood_of_bad_connect_lines_is_counted_in_full_and_logged_at_a_bounded_rate(
    st: hardened.Stack,
) -> None:
    before = metrics(st)
    sources = [f"127.0.0.{20 + i}" for i in range(6)]
    per_source = 30
    bad = "g1." + "A" * 80  # well-formed, but no CM sealed it

    def flood(source: str) -> None:
        for _n in range(per_source):
            raw = socket.create_connection(("127.0.0.1", st.sg_port), timeout=10, source_address=(source, 0))
            with client_ctx().wrap_socket(raw) as sock:
                sock.sendall(linechan.connect_line(bad))
                assert read_line(sock) == linechan.FORBIDDEN

    offset = len(st.procs["sg"].logs())

    def attack() -> float:
        started = time.monotonic()
        threads = [threading.Thread(target=flood, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return time.monotonic() - started

    elapsed = await during(st, attack)
    total = len(sources) * per_source
    m = metrics(st)
    assert refused(m, "forged") - refused(before, "forged") == total  # the counter has them all
    await asyncio.sleep(0.3)  # let the log reach the file
    lines = [
        json.loads(line)
        for line in st.procs["sg"].logs()[offset:].splitlines()
        if '"refused: forged"' in line
    ]
    # At most REFUSAL_LOG_RATE lines for each second the flood lasted (a partial second at each end).
    assert len(lines) <= REFUSAL_LOG_RATE * (int(elapsed) + 2), (len(lines), elapsed)
    assert len(lines) < total
    assert m['gatehouse_sg_log_lines_suppressed_total{reason="forged"}'] > 0
    assert any(line.get("suppressed") for line in lines) or len(lines) <= REFUSAL_LOG_RATE * 2
    hardened.assert_session_ok(await st.session())
    after(st)


# ---------------------------------------------------------------- 2b. global caps (a small SG)

SMALL_MAX_CONNECTIONS = 6
SMALL_UDP_PORTS = 2


def free_port_pair() -> int:
    """A port P with P and P+1 free for UDP on 127.0.0.1 (a two-port AgentUdpSourcePort range)."""
    for _n in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free consecutive ports")


@pytest.fixture(scope="module")
def small(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    """A stack whose SG has room for SMALL_MAX_CONNECTIONS connections and SMALL_UDP_PORTS
    agent-side UDP ports, so that the global caps can be reached from a test."""
    s = hardened.build(
        pki,
        Path(tmp_path_factory.mktemp("sg-small")),
        sg={
            "MaxConnections": SMALL_MAX_CONNECTIONS,
            "AgentUdpSourcePort": free_port_pair(),
            "AgentUdpPortCount": SMALL_UDP_PORTS,
            "RequestTimeout": REQUEST_TIMEOUT,
        },
    )
    yield s
    s.stop()


def tcp_echo(chan: ssl.SSLSocket, payload: bytes) -> bool:
    chan.sendall(payload)
    return sg_helpers.read_exactly(chan, len(payload)) == payload


def udp_echo(st: hardened.Stack, udp: socket.socket, payload: bytes) -> bool:
    udp.sendto(payload, ("127.0.0.1", st.sg_port))
    return received(udp) == [payload]


async def test_sessions_beyond_the_agent_udp_port_range_relay_tcp_only(small: hardened.Stack) -> None:
    """AgentUdpPortCount exhaustion: relayed sessions that never bind hold no agent-side port (a
    whole session with UDP completes while more of them are open than there are ports); once
    every port is held, a further session relays TCP and its binds go unanswered, the sessions
    holding ports are unaffected, and a whole session completes once a port is free again."""
    before = metrics(small)
    grant_l = grant_for(small, "desk-a")  # a user's session, holding a port throughout
    chan_l, answer_l = open_channel(small, grant_l)
    udp_l = udp_socket()
    try:
        assert answer_l == linechan.OK
        bind(small, udp_l, grant_l)
        grants = [grant_for(small, "desk-b") for _n in range(SMALL_UDP_PORTS + 1)]
        chans = []
        try:
            for grant in grants:  # more relayed sessions than ports, none bound yet
                chan, answer = open_channel(small, grant)
                chans.append(chan)
                assert answer == linechan.OK
            assert metrics(small)["gatehouse_sg_udp_agent_ports_in_use"] == 1
            hardened.assert_session_ok(await small.session())  # binds the second port, then frees it
            wait_for(
                lambda: metrics(small)["gatehouse_sg_udp_agent_ports_in_use"] == 1, "that port to be freed"
            )

            def attack() -> None:
                with udp_socket() as holder, udp_socket() as beyond:
                    bind(small, holder, grants[0])  # the last free port
                    key, key_id = linechan.udp_bind_key(grants[1])
                    for _n in range(3):  # no port left: unanswered, however often it is sent
                        beyond.sendto(linechan.bind_datagram(key, key_id, 1), ("127.0.0.1", small.sg_port))
                    assert received(beyond) == []
                    assert tcp_echo(chans[1], b"tcp still relayed")  # that session relays TCP only
                    m = metrics(small)
                    assert m["gatehouse_sg_udp_agent_ports_in_use"] == SMALL_UDP_PORTS
                    # The sessions holding ports are unaffected.
                    assert tcp_echo(chan_l, b"user tcp") and udp_echo(small, udp_l, b"user udp")
                    assert udp_echo(small, holder, b"holder udp")

            await asyncio.to_thread(attack)
        finally:
            for chan in chans:
                chan.close()
        m = metrics(small)
        exhausted = "gatehouse_sg_udp_agent_ports_exhausted_total"
        assert m[exhausted] - before.get(exhausted, 0.0) == 1  # once per session
        assert dropped(m, "agent-ports-exhausted") - dropped(before, "agent-ports-exhausted") == 3
        wait_for(lambda: metrics(small)["gatehouse_sg_udp_agent_ports_in_use"] == 1, "the ports to be freed")
        hardened.assert_session_ok(await small.session())
        assert tcp_echo(chan_l, b"user tcp") and udp_echo(small, udp_l, b"user udp")
    finally:
        udp_l.close()
        chan_l.close()
    small.assert_no_secrets_logged(*SEEN)


async def test_handshaking_sockets_from_many_sources_are_held_to_max_connections(
    small: hardened.Stack,
) -> None:
    """A handshake flood from several sources (each under MaxConnectionsPerSource) fills
    MaxConnections: the sockets beyond it are closed at accept, those let in are closed by the
    deadline, a relayed session keeps its TCP and UDP throughout, and a whole session completes
    afterwards. (While the cap is full, new connections are refused: that is the cap.)"""
    wait_for(lambda: metrics(small)["gatehouse_sg_connections_open"] == 0, "earlier connections to close")
    before = metrics(small)
    grant = grant_for(small, "desk-a")
    chan, answer = open_channel(small, grant)
    udp = udp_socket()
    try:
        assert answer == linechan.OK
        bind(small, udp, grant)
        room = SMALL_MAX_CONNECTIONS - 1
        sources = [f"127.0.0.{40 + i}" for i in range(3)]

        def attack() -> tuple[int, dict[str, float]]:
            socks = [s for source in sources for s in hold(source, 4, small.sg_port)]
            try:
                time.sleep(0.3)
                gauges = metrics(small)
                alive = sum(still_open(s, 0.05) for s in socks)
                # The relayed session is unaffected while the cap is full.
                assert tcp_echo(chan, b"during the flood") and udp_echo(small, udp, b"during the flood")
                wait_for(
                    lambda: not any(still_open(s, 0.01) for s in socks), "the deadline", 3 * REQUEST_TIMEOUT
                )
                return alive, gauges
            finally:
                for s in socks:
                    s.close()

        alive, gauges = await asyncio.to_thread(attack)
        assert alive == room
        assert gauges["gatehouse_sg_connections_handshaking"] == room
        assert gauges["gatehouse_sg_connections_open"] == SMALL_MAX_CONNECTIONS
        m = metrics(small)
        assert refused(m, "busy") - refused(before, "busy") == 3 * 4 - room
        assert refused(m, "timeout") - refused(before, "timeout") == room
        wait_for(lambda: metrics(small)["gatehouse_sg_connections_open"] == 1, "the slots to be free")
        assert tcp_echo(chan, b"after the flood") and udp_echo(small, udp, b"after the flood")
    finally:
        udp.close()
        chan.close()
    hardened.assert_session_ok(await small.session())
    small.assert_no_secrets_logged(*SEEN)


# ---------------------------------------------------------------- 3. the agent's certificate


@dataclass
class RogueAgent:
    """A TLS server on an address the grant names, recording whatever reaches it."""

    address: str
    port: int
    received: list[bytes]
    thread: threading.Thread


@contextlib.contextmanager
def rogue_agent(cert: pkimod.CertFiles, address: str) -> Iterator[RogueAgent]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    got: list[bytes] = []
    listener = socket.create_server((address, 0))
    listener.settimeout(15)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _peer = listener.accept()
            with contextlib.suppress(OSError, ssl.SSLError), ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                while data := tls.recv(4096):
                    got.append(data)
                    tls.sendall(linechan.OK)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield RogueAgent(address, listener.getsockname()[1], got, thread)
    finally:
        listener.close()
        thread.join(15)


async def test_an_agent_not_signed_by_the_ca_or_not_for_its_address_gets_502(
    st: hardened.Stack, tmp_path: Path
) -> None:
    """Someone answering on an agent's address (ARP/DNS spoofing, a rogue host) must not receive
    the session-tag: the SG verifies the agent certificate against AgentCaCert and the address."""
    other_ca = pkimod.TestPKI(tmp_path / "other-ca")
    before = metrics(st)
    sealer = GrantSealer(decode_secret(hardened.SECRET))
    cases = [
        ("foreign CA", other_ca.issue("rogue", ["127.0.0.9"], role="agent")),
        ("another desktop's certificate", st.identities["desk-a"]),  # the CA's, for 127.0.0.2
    ]

    def attack() -> None:
        for _what, cert in cases:
            tag = "rogue-session-tag-" + uuid.uuid4().hex
            with rogue_agent(cert, "127.0.0.9") as rogue:
                grant = sealer.mint(str(uuid.uuid4()), rogue.address, rogue.port, tag, CLIENT)
                SEEN.extend([tag, grant])
                chan, answer = open_channel(st, grant)
                with chan:
                    assert answer == linechan.BAD_GATEWAY
            assert rogue.received == []  # no session-tag reached it

    await during(st, attack)
    m = metrics(st)
    assert refused(m, "agent-certificate") - refused(before, "agent-certificate") == len(cases)
    logs = st.procs["sg"].logs()
    assert "certificate refused" in logs
    # The verified agents work: the legitimate session above, and one more now.
    hardened.assert_session_ok(await st.session())
    after(st)


# ---------------------------------------------------------------- 4./5. admin port and limits


def test_admin_port_is_loopback_only_by_default_and_fd_limit_is_raised(
    st: hardened.Stack, tmp_path: Path
) -> None:
    """/metrics and /health are not reachable from other addresses unless AdminAddress says so;
    the SG starts with a low soft open-file limit (inherited) and raises it to the hard limit."""
    admin, port = free_port(), free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))  # inherited by the child
    proc = ServiceProcess(
        "sg",
        tmp_path / "sg-default-admin",
        {
            "ListenAddress": "127.0.0.1",
            "Port": port,
            "AgentUdpSourcePort": free_port(),
            "SslCert": st.identities["sg"].cert,
            "SslKey": st.identities["sg"].key,
            "AgentCaCert": st.pki.ca,
            "AdminPort": admin,
        },
        config_name="SecurityGateway.conf",
        env_file={"GATEHOUSE_GRANTSECRET": hardened.SECRET},
    )
    try:
        proc.start()  # no health_url: returns right after the fork
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        proc.health_url = f"http://127.0.0.1:{admin}/health"
        proc.wait_healthy()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", admin), timeout=2).close()
        assert proc.proc is not None
        limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        proc.stop()
    assert hardened.SECRET not in proc.logs()
