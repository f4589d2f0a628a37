"""Security gateway and agent stand-in as real processes with real TLS on loopback.

A test plays the CM: it gets a real session-tag from the agent with a launch-session POST and
mints the grant with the secret of the SG's cmsg.env, then plays the client against the SG.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pki import TestPKI as PKI
from services import ServiceProcess, free_port
from sg_helpers import (
    CLIENT,
    client_ctx,
    closed_by_peer,
    connect,
    echo_both_ways,
    metrics,
    open_tls,
    read_exactly,
    read_line,
    udp_bind,
    wait_for,
)

from gatehouse import linechan, protocol
from gatehouse.grant import PREFIX, GrantSealer, decode_secret, generate_secret
from gatehouse.linechan import BAD_GATEWAY, FORBIDDEN, OK, connect_line

OTHER_CLIENT = "127.0.0.2"  # on Linux all of 127/8 is loopback
# Every grant, session-tag and grant secret a test handles; checked against all logs afterwards.
SEEN_SECRETS: list[str] = []


@dataclass
class Agent:
    proc: ServiceProcess
    control_port: int
    session_port: int
    cm_ctx: ssl.SSLContext  # launch-session is accepted from a CM's certificate only
    admin_port: int = 0  # management listener: /health and /metrics (plain HTTP, loopback)

    def launch(self, client_ip: str = CLIENT) -> tuple[str, str]:
        sid = str(uuid.uuid4())
        body = protocol.render("pcoip-agent", protocol.LaunchSession(sid, client_ip, "alice", "CORP"))
        msg = protocol.parse(self.post(body), "pcoip-agent")
        assert isinstance(msg, protocol.LaunchSessionResp)
        assert msg.result_id == protocol.LAUNCH_OK
        assert msg.session_info is not None
        assert msg.session_info.session_id == sid
        assert msg.session_info.ip_address == "127.0.0.1"
        assert msg.session_info.port == self.session_port
        assert msg.session_info.sni == "desk-01"
        SEEN_SECRETS.append(msg.session_info.session_tag)
        return sid, msg.session_info.session_tag

    def post(self, body: bytes) -> bytes:
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.control_port}/pcoip-agent/xml",
            data=body,
            method="POST",
            headers={"Content-Type": protocol.CONTENT_TYPE},
        )
        with urllib.request.urlopen(req, context=self.cm_ctx, timeout=10) as resp:
            return resp.read()


@dataclass
class Gateway:
    proc: ServiceProcess
    port: int
    admin_port: int
    sealer: GrantSealer
    secret: str

    def mint(self, agent: Agent, sid: str, tag: str, client_ip: str = CLIENT, **kw: float) -> str:
        grant = self.sealer.mint(sid, "127.0.0.1", agent.session_port, tag, client_ip, **kw)
        SEEN_SECRETS.append(grant)
        return grant

    def open(self, source: str = CLIENT, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        return open_tls(self.port, source, ctx)

    def connect(self, grant: str, source: str = CLIENT) -> tuple[ssl.SSLSocket, bytes]:
        return connect(self.port, grant, source)

    def metrics(self) -> dict[str, float]:
        return metrics(self.admin_port)


def start_agent(pki: PKI, tmp: Path, processes: list[ServiceProcess], **extra: object) -> Agent:
    cert = pki.issue("agent")
    control, session, admin = free_port(), free_port(), free_port()
    config: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "ControlPort": control,
        "SessionPort": session,
        "AdminPort": admin,
        "SslCert": cert.cert,
        "SslKey": cert.key,
        "Hostname": "desk-01",
        "AdvertiseAddress": "127.0.0.1",
        "ClientCaCert": pki.ca,
        "LogLevel": "debug",
    }
    config.update(extra)
    proc = ServiceProcess(
        "agent", tmp / f"agent-{control}", config, health_url=f"https://127.0.0.1:{control}/health"
    )
    processes.append(proc)
    proc.start()
    cm = pki.issue("sg-test-cm", role="cm")
    cm_ctx = client_ctx()
    cm_ctx.load_cert_chain(cm.cert, cm.key)
    return Agent(proc, control, session, cm_ctx, admin)


def start_sg(pki: PKI, tmp: Path, processes: list[ServiceProcess], **extra: object) -> Gateway:
    cert = pki.issue("sg")
    port, admin, udp_source = free_port(), free_port(), free_port()
    secret = generate_secret()
    config: dict[str, object] = {
        "ListenAddress": "127.0.0.1",
        "Port": port,
        "AgentUdpSourcePort": udp_source,
        "SslCert": cert.cert,
        "SslKey": cert.key,
        "AgentCaCert": pki.ca,
        "AdminAddress": "127.0.0.1",
        "AdminPort": admin,
        "LogLevel": "debug",
    }
    config.update(extra)
    SEEN_SECRETS.append(secret)
    proc = ServiceProcess(
        "sg",
        tmp / f"sg-{port}",
        config,
        config_name="SecurityGateway.conf",
        env_file={"GATEHOUSE_GRANTSECRET": secret},
        health_url=f"http://127.0.0.1:{admin}/health",
    )
    processes.append(proc)
    proc.start()
    return Gateway(proc, port, admin, GrantSealer(decode_secret(secret)), secret)


@pytest.fixture
def agent(pki: PKI, tmp_path: Path, processes: list[ServiceProcess]) -> Agent:
    return start_agent(pki, tmp_path, processes)


@pytest.fixture
def sg(pki: PKI, tmp_path: Path, processes: list[ServiceProcess]) -> Gateway:
    return start_sg(pki, tmp_path, processes)


@pytest.fixture(autouse=True)
def no_secrets_in_logs(processes: list[ServiceProcess]) -> Iterator[None]:
    """After each test: no grant, session-tag or grant secret in any service's log."""
    SEEN_SECRETS.clear()
    yield
    for proc in processes:
        proc.stop()  # flush and close the log
        logs = proc.logs()
        for secret in SEEN_SECRETS:
            assert secret not in logs, f"a secret leaked into the {proc.service} log"


def good_session(sg: Gateway, agent: Agent, payload: bytes = b"ping") -> None:
    sid, tag = agent.launch()
    sock, answer = sg.connect(sg.mint(agent, sid, tag))
    with sock:
        assert answer == OK
        sock.sendall(payload)
        assert read_exactly(sock, len(payload)) == payload


# ---------------------------------------------------------------- the session


def test_tcp_and_udp_echo_end_to_end_through_the_sg(sg: Gateway, agent: Agent) -> None:
    sid, tag = agent.launch()
    grant = sg.mint(agent, sid, tag)
    sock, answer = sg.connect(grant)
    with sock:
        assert answer == OK
        payload = bytes(range(256)) * 1024  # 256 KiB: exercises flow control both ways
        assert echo_both_ways(sock, payload) == payload

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((CLIENT, 0))
            udp.settimeout(5)
            udp_bind(udp, grant, sg.port)
            for i in range(3):
                udp.sendto(b"datagram %d" % i, ("127.0.0.1", sg.port))
                data, source = udp.recvfrom(2048)
                assert data == b"datagram %d" % i
                assert source == ("127.0.0.1", sg.port)

        # Another address that has not bound itself gets nothing relayed.
        before = sg.metrics()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind((OTHER_CLIENT, 0))
            stranger.sendto(b"let me in", ("127.0.0.1", sg.port))
        wait_for(
            lambda: sg.metrics().get('gatehouse_sg_udp_datagrams_dropped_total{reason="unbound"}', 0) >= 1,
            "the stranger's datagram to be dropped",
        )
        after = sg.metrics()
        relayed = 'gatehouse_sg_udp_datagrams_relayed_total{direction="to_agent"}'
        assert after[relayed] == before[relayed] == 3

        m = sg.metrics()
        assert m["gatehouse_sg_sessions_active"] == 1
        assert m["gatehouse_sg_udp_agent_ports_in_use"] == 1
        assert m["gatehouse_sg_udp_binds_total"] == 1
        assert m["gatehouse_sg_sessions_accepted_total"] == 1
        assert m['gatehouse_sg_bytes_relayed_total{direction="to_agent"}'] == len(payload)

    wait_for(lambda: sg.metrics()["gatehouse_sg_sessions_active"] == 0, "the session to close")
    assert "relaying" in sg.proc.logs() and sid in sg.proc.logs()
    # Once the TCP channel is gone the client's datagrams and binds are dropped too.
    assert sg.metrics()["gatehouse_sg_udp_agent_ports_in_use"] == 0
    dropped = 'gatehouse_sg_udp_datagrams_dropped_total{reason="unbound"}'
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((CLIENT, 0))
        udp.sendto(b"late", ("127.0.0.1", sg.port))
        key, key_id = linechan.udp_bind_key(grant)
        udp.sendto(linechan.bind_datagram(key, key_id, 2), ("127.0.0.1", sg.port))
    wait_for(lambda: sg.metrics().get(dropped, 0) >= 2, "the late datagram to be dropped")
    wait_for(
        lambda: sg.metrics().get('gatehouse_sg_udp_datagrams_dropped_total{reason="bind-unknown"}', 0) == 1,
        "the late bind to be dropped",
    )
    assert sg.metrics()[relayed] == 3


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_flow_control_stops_a_client_that_does_not_read(sg: Gateway, agent: Agent) -> None:
    """The agent echoes; a client that never reads must be paused, not buffered in the SG."""
    assert sg.proc.proc is not None
    rss_before = rss_kib(sg.proc.proc.pid)
    sid, tag = agent.launch()
    sock, answer = sg.connect(sg.mint(agent, sid, tag))
    total = 256 * 1024 * 1024
    sent = 0
    chunk = b"z" * 65536
    with sock:
        assert answer == OK
        sock.settimeout(3)  # no progress for 3 s: the back-pressure reached us
        try:
            while sent < total:
                sent += sock.send(chunk)
        except TimeoutError:
            pass
        assert sent < total
        # What is stuck is in kernel socket buffers, not in the SG's memory.
        assert rss_kib(sg.proc.proc.pid) - rss_before < 32 * 1024
        # Reading drains everything in order; the write that timed out is then retried with the
        # same bytes, as TLS requires, and arrives too.
        sock.settimeout(20)
        got = 0
        while got < sent:
            data = sock.recv(1 << 20)
            assert data and set(data) == {ord("z")}
            got += len(data)
        sock.sendall(chunk)
        while got < sent + len(chunk):
            data = sock.recv(1 << 20)
            assert data and set(data) == {ord("z")}
            got += len(data)
        assert got == sent + len(chunk)
        sock.sendall(b"end")
        assert read_exactly(sock, 3) == b"end"


# ---------------------------------------------------------------- refusals (each followed by a good session)


def flip_byte(grant: str) -> str:
    body = grant[len(PREFIX) :]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[len(raw) // 2] ^= 0x40
    return PREFIX + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_bad_grants_get_403_before_reaching_the_agent(sg: Gateway, agent: Agent) -> None:
    sid, tag = agent.launch()
    first = sg.mint(agent, sid, tag)
    sock, answer = sg.connect(first)
    with sock:
        assert answer == OK

    def refused(grant: str, source: str = CLIENT) -> None:
        SEEN_SECRETS.append(grant)
        sock, answer = sg.connect(grant, source)
        with sock:
            assert answer == FORBIDDEN
            assert closed_by_peer(sock)
        good_session(sg, agent)

    refused(first)  # replayed
    sid, tag = agent.launch()
    refused(sg.mint(agent, sid, tag, now=time.time() - 120))  # expired
    sid, tag = agent.launch()
    refused(flip_byte(sg.mint(agent, sid, tag)))  # forged
    other = GrantSealer(decode_secret(generate_secret()))
    refused(other.mint(sid, "127.0.0.1", agent.session_port, tag, CLIENT))  # another CM's secret
    sid, tag = agent.launch()
    refused(sg.mint(agent, sid, tag, client_ip=CLIENT), source=OTHER_CLIENT)  # wrong client
    refused("not-a-grant")  # malformed

    for line in (b"HELLO\r\n", b"CONNECT\r\n", b"x" * 5000):
        sock = sg.open()
        with sock:
            sock.sendall(line)
            assert read_line(sock) == FORBIDDEN
        good_session(sg, agent)

    m = sg.metrics()
    for reason, count in {
        "replayed": 1,
        "expired": 1,
        "forged": 2,
        "wrong-client": 1,
        "malformed": 4,
    }.items():
        assert m[f'gatehouse_sg_sessions_refused_total{{reason="{reason}"}}'] == count, reason
    assert m["gatehouse_sg_sessions_accepted_total"] == 1 + 9
    # The agent saw only the good sessions: nothing of a refused grant reached it.
    assert agent.proc.logs().count("session channel up") == 1 + 9
    assert "refused: wrong-client" in sg.proc.logs()


def test_expired_by_waiting(sg: Gateway, agent: Agent) -> None:
    sid, tag = agent.launch()
    grant = sg.mint(agent, sid, tag, ttl=1)
    expiry = time.time() + 1.1
    wait_for(lambda: time.time() > expiry, "the grant to expire")
    sock, answer = sg.connect(grant)
    with sock:
        assert answer == FORBIDDEN
    good_session(sg, agent)


def test_idle_client_is_dropped_without_pinning_a_slot(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess], agent: Agent
) -> None:
    sg = start_sg(pki, tmp_path, processes, MaxConnections=1)
    idle = sg.open()  # TLS up, never sends its CONNECT line
    with idle:
        idle.settimeout(30)
        assert read_line(idle) == FORBIDDEN
    assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="timeout"}'] == 1
    good_session(sg, agent)


def test_sockets_in_the_tls_handshake_count_against_max_connections(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess], agent: Agent
) -> None:
    sg = start_sg(pki, tmp_path, processes, MaxConnections=2, RequestTimeout=1)
    idle = [
        socket.create_connection(("127.0.0.1", sg.port), timeout=10) for _n in range(2)
    ]  # never say hello
    try:
        wait_for(lambda: sg.metrics()["gatehouse_sg_connections_handshaking"] == 2, "both to be accepted")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            sg.open().close()  # full: closed at accept
        assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="busy"}'] == 1
        for sock in idle:  # the deadline from accept closes them
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: sg.metrics()["gatehouse_sg_connections_open"] == 0, "the slots to be free")
    assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="timeout"}'] == 2
    good_session(sg, agent)


def test_max_connections(pki: PKI, tmp_path: Path, processes: list[ServiceProcess], agent: Agent) -> None:
    sg = start_sg(pki, tmp_path, processes, MaxConnections=2)
    held = []
    for _held in range(2):
        sid, tag = agent.launch()
        sock, answer = sg.connect(sg.mint(agent, sid, tag))
        assert answer == OK
        held.append(sock)
    sid, tag = agent.launch()
    third = sg.mint(agent, sid, tag)
    # Full: the connection is closed at accept, before any TLS work.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        sg.open().close()
    assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="busy"}'] == 1
    assert sg.metrics()["gatehouse_sg_connections_open"] == 2
    # The sessions in place still relay.
    held[0].sendall(b"still here")
    assert read_exactly(held[0], 10) == b"still here"
    held.pop().close()
    wait_for(lambda: sg.metrics()["gatehouse_sg_sessions_active"] == 1, "a slot to free up")
    sock, answer = sg.connect(third)
    with sock:
        assert answer == OK
    held[0].close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_tls_versions_are_refused(sg: Gateway, agent: Agent) -> None:
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx = client_ctx()
        ctx.minimum_version = version
        ctx.maximum_version = version
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client even offer the old protocol
        with pytest.raises(ssl.SSLError) as refused:
            sg.open(ctx=ctx).close()
        # The SG's protocol_version alert, not this client failing to offer the old version.
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", (version, refused.value)
    # TLS 1.2 with a cipher outside the seed's list is refused too.
    ctx = client_ctx()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-RSA-CHACHA20-POLY1305")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        sg.open(ctx=ctx).close()
    assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="tls-handshake"}'] == 3
    # The seed's first choice is negotiated for TLS 1.2.
    ctx = client_ctx()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with sg.open(ctx=ctx) as sock:
        assert sock.version() == "TLSv1.2"
        assert sock.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    good_session(sg, agent)


@pytest.mark.parametrize("verify", [True, False])
def test_sg_refuses_an_agent_with_a_weak_key_before_sending_the_tag(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess], verify: bool
) -> None:
    # Verified (the default): the chain check refuses the key; unverified: the key-size check does.
    sg = start_sg(pki, tmp_path, processes, AgentTlsVerify=verify)
    weak = pki.issue("weak-agent", key_size=1024)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(weak.cert, weak.key)
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _peer = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(10)
                    while data := tls.recv(4096):
                        received.append(data)
            except (OSError, ssl.SSLError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        sid = str(uuid.uuid4())
        grant = sg.sealer.mint(sid, "127.0.0.1", port, "tag-for-a-weak-agent", CLIENT)
        SEEN_SECRETS.extend([grant, "tag-for-a-weak-agent"])
        sock, answer = sg.connect(grant)
        with sock:
            assert answer == BAD_GATEWAY
        thread.join(15)
    assert received == []
    logs = sg.proc.logs()
    assert ("certificate refused" if verify else "1024 bits is too weak") in logs and sid in logs
    assert "tag-for-a-weak-agent" not in logs
    assert sg.metrics()['gatehouse_sg_sessions_refused_total{reason="agent-certificate"}'] == 1
    assert ("AgentTlsVerify=false" in logs) is not verify


# ---------------------------------------------------------------- start-up and shutdown


def test_weak_sg_certificate_refused_at_start(pki: PKI, tmp_path: Path) -> None:
    weak = pki.issue("weak-sg", key_size=1024)
    proc = ServiceProcess(
        "sg",
        tmp_path / "weak",
        {
            "SslCert": weak.cert,
            "SslKey": weak.key,
            "AgentCaCert": pki.ca,
            "Port": free_port(),
            "AdminPort": free_port(),
        },
        config_name="SecurityGateway.conf",
        env_file={"GATEHOUSE_GRANTSECRET": generate_secret()},
    ).start()
    try:
        assert proc.proc is not None
        assert proc.proc.wait(30) != 0
    finally:
        proc.stop()
    logs = proc.logs()
    assert "2048" in logs and "1024" in logs
    assert "Traceback" not in logs


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "GrantSecret is required"), ({"GATEHOUSE_GRANTSECRET": "c2hvcnQ="}, "32 bytes")],
)
def test_sg_needs_a_valid_grant_secret(
    pki: PKI, tmp_path: Path, env: dict[str, object], message: str
) -> None:
    cert = pki.issue("sg")
    proc = ServiceProcess(
        "sg",
        tmp_path / "nosecret",
        {
            "SslCert": cert.cert,
            "SslKey": cert.key,
            "AgentCaCert": pki.ca,
            "Port": free_port(),
            "AdminPort": free_port(),
        },
        config_name="SecurityGateway.conf",
        env_file=env,
    ).start()
    try:
        assert proc.proc is not None
        assert proc.proc.wait(30) == 2
    finally:
        proc.stop()
    assert message in proc.logs()
    assert "Traceback" not in proc.logs()


def test_sigterm_closes_sessions_and_exits_zero(sg: Gateway, agent: Agent) -> None:
    sid, tag = agent.launch()
    sock, answer = sg.connect(sg.mint(agent, sid, tag))
    with sock:
        assert answer == OK
        sock.settimeout(20)
        assert sg.proc.proc is not None
        sg.proc.proc.terminate()
        assert closed_by_peer(sock)
        assert sg.proc.proc.wait(20) == 0
    assert "stopped" in sg.proc.logs()
    with pytest.raises(OSError):
        sg.open()


# ---------------------------------------------------------------- the agent on its own


def test_agent_session_tag_is_single_use(agent: Agent) -> None:
    _sid, tag = agent.launch()

    def channel(tag: str) -> tuple[ssl.SSLSocket, bytes]:
        raw = socket.create_connection(("127.0.0.1", agent.session_port), timeout=10)
        sock = client_ctx().wrap_socket(raw)
        sock.sendall(connect_line(tag))
        return sock, read_line(sock)

    sock, answer = channel(tag)
    with sock:
        assert answer == OK
        sock.sendall(b"echo me")
        assert read_exactly(sock, 7) == b"echo me"
        sock2, answer2 = channel(tag)
        with sock2:
            assert answer2 == FORBIDDEN
            assert closed_by_peer(sock2)
    sock, answer = channel("never-issued-" + "x" * 40)
    with sock:
        assert answer == FORBIDDEN
    assert agent.proc.stop() == 0  # SIGTERM: clean exit
    logs = agent.proc.logs()
    assert tag not in logs
    assert "stopped" in logs


def test_agent_session_tag_expires(pki: PKI, tmp_path: Path, processes: list[ServiceProcess]) -> None:
    agent = start_agent(pki, tmp_path, processes, SessionTagTtl=0.5)
    _sid, tag = agent.launch()
    expiry = time.time() + 0.6
    wait_for(lambda: time.time() > expiry, "the tag to expire")
    raw = socket.create_connection(("127.0.0.1", agent.session_port), timeout=10)
    with client_ctx().wrap_socket(raw) as sock:
        sock.sendall(connect_line(tag))
        assert read_line(sock) == FORBIDDEN


def test_agent_udp_echo_only_for_live_channels(agent: Agent) -> None:
    _sid, tag = agent.launch()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((CLIENT, 0))
        udp.settimeout(5)
        raw = socket.create_connection(("127.0.0.1", agent.session_port), timeout=10)
        with client_ctx().wrap_socket(raw) as sock:
            sock.sendall(connect_line(tag))
            assert read_line(sock) == OK
            udp.sendto(b"hello", ("127.0.0.1", agent.session_port))
            assert udp.recvfrom(100)[0] == b"hello"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind((OTHER_CLIENT, 0))
            stranger.sendto(b"nobody", ("127.0.0.1", agent.session_port))

    def dropped() -> bool:
        url = f"http://127.0.0.1:{agent.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 'gatehouse_agent_udp_datagrams_total{outcome="dropped"} 1.0' in resp.read().decode()

    wait_for(dropped, "the stranger's datagram to be dropped")


def test_agent_answers_malformed_requests_as_a_real_agent_does(agent: Agent) -> None:
    good = protocol.render(
        "pcoip-agent", protocol.LaunchSession(str(uuid.uuid4()), "127.0.0.9", "alice", "CORP")
    )
    for body, result in [
        (b"<?xml version='1.0' encoding='UTF-8'?>", protocol.E_MALFORMED),
        (b"<pcoip-agent version='1.0'><bye/></pcoip-agent>", protocol.E_UNKNOWN),
        (b"<pcoip-agent><launch-session/></pcoip-agent>", protocol.E_VERSION),
        (
            b"<pcoip-agent version='1.0'><launch-session><session-id>nope</session-id>"
            b"</launch-session></pcoip-agent>",
            protocol.E_MALFORMED,
        ),
        # The CM's old format, and one element renamed, added or dropped: each is refused.
        (
            good.replace(b"<client-name />", b"<client-name /><session-id>x</session-id>"),
            protocol.E_MALFORMED,
        ),
        (good.replace(b"session-log-id", b"session-id"), protocol.E_MALFORMED),
        (good.replace(b"<license-path />", b""), protocol.E_MALFORMED),
        (good.replace(b'method="windows-password"', b'bypass="false"'), protocol.E_MALFORMED),
    ]:
        assert body != good
        msg = protocol.parse(agent.post(body), "pcoip-agent")
        assert isinstance(msg, protocol.LaunchSessionResp) and msg.session_info is None, body
        assert msg.result_id == result and msg.fail_reason, body
    agent.launch()  # still serving


# ---------------------------------------------------------------- load reports


class _Sink(BaseHTTPRequestHandler):
    reports: list[tuple[str, dict[str, object]]]
    status = 204

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        # The agent authenticates with its certificate (role agent), never a header.
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        roles = sorted(v for k, v in (peer or {}).get("subjectAltName", ()) if k == "URI")
        entry = {"auth": self.headers.get("Authorization"), "cert_uris": roles, **body}
        type(self).reports.append((self.path, entry))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def report_sink(pki: PKI) -> Iterator[tuple[int, type[_Sink]]]:
    """A TLS HTTP server on loopback that records what the agent posts (a fixture, not a broker)."""
    cert = pki.issue("sink", hosts=["127.0.0.1", "localhost"])
    handler = type("Sink", (_Sink,), {"reports": [], "status": 204})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_agent_sends_load_reports(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess], report_sink: tuple[int, type[_Sink]]
) -> None:
    port, sink = report_sink
    identity = pki.issue("report-agent", ["desk-01", "127.0.0.1"], role="agent")
    agent = start_agent(
        pki,
        tmp_path,
        processes,
        BrokerUrl=f"https://127.0.0.1:{port}",
        BrokerCaCert=pki.ca,
        IdentityCert=identity.cert,
        IdentityKey=identity.key,
        ReportInterval=0.3,
        Capacity=7,
    )
    wait_for(lambda: len(sink.reports) >= 1, "the first report")
    path, first = sink.reports[0]
    assert path == "/api/v1/agents/report"
    assert first == {
        "auth": None,
        "cert_uris": ["urn:gatehouse:role:agent"],
        "hostname": "desk-01",
        "address": "127.0.0.1",
        "agent_port": agent.control_port,
        "session_port": agent.session_port,
        "active_sessions": 0,
        "capacity": 7,
    }
    _sid, tag = agent.launch()
    raw = socket.create_connection(("127.0.0.1", agent.session_port), timeout=10)
    with client_ctx().wrap_socket(raw) as sock:
        sock.sendall(connect_line(tag))
        assert read_line(sock) == OK
        wait_for(lambda: sink.reports[-1][1]["active_sessions"] == 1, "a report with the session")

    # A refusal is logged at warn, saying what the broker checks, and retried.
    sink.status = 403
    count = len(sink.reports)
    wait_for(lambda: len(sink.reports) >= count + 2, "retries after a refusal")
    wait_for(
        lambda: "load report" in agent.proc.logs() and "IdentityCert" in agent.proc.logs(), "the warning"
    )
    sink.status = 204
