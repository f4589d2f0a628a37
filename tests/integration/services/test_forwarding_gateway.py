"""Double-hop DMZ: client → forwarding SG (outer) → inner SG → agent, as real processes on loopback.

The CM hands out the forwarder's address; the forwarder passes the client's TLS through with a
PROXY v2 header (TCP and each UDP datagram) naming the client, and the inner SG checks the grant
against that address. Forwarders reach the inner SG from 127.0.0.1 (the kernel's source address
for loopback), so the clients here use other loopback addresses: 127.0.0.4 is the user,
127.0.0.5 holds a stolen grant, 127.0.0.7 is an attacker on the internet reaching the inner SG
directly, 127.0.0.8 opens idle and half-open sockets.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pki as pkimod
import pytest
from services import (
    ServiceProcess,
    broker_admin,
    cm_config,
    cm_identity,
    free_port,
    start_agent,
    start_broker,
    start_cm,
    start_forwarder,
    start_sg,
)
from sg_helpers import client_ctx, closed_by_peer, metrics, read_line, wait_for

from gatehouse import linechan, protocol, tls
from gatehouse.client.flow import SessionReport, run_session
from gatehouse.grant import GrantSealer, decode_secret, generate_secret
from gatehouse.sg import proxyproto

ADMIN_TOKEN = "admin-token-" + "f0e1d2c3b4a5968778695a4b"
ALICE_PW = "Alice-DMZ-pw!1"
SECRET = generate_secret()
USER_IP = "127.0.0.4"
THIEF_IP = "127.0.0.5"
ATTACKER_IP = "127.0.0.7"
IDLE_IP = "127.0.0.8"
REQUEST_TIMEOUT = 2.0
PER_SOURCE = 6
SEEN: list[str] = []  # grants and session-tags the tests handled; never in a log


@dataclass
class Dmz:
    pki: pkimod.TestPKI
    cm_url: str
    agent: tuple[str, int, int]  # address, control port, session port
    inner_port: int
    outer_port: int
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def outer_metrics(self) -> dict[str, float]:
        return metrics(int(str(self.procs["outer"].config["AdminPort"])))

    def inner_metrics(self) -> dict[str, float]:
        return metrics(int(str(self.procs["inner"].config["AdminPort"])))

    async def session(self, source: str = USER_IP) -> SessionReport:
        return await run_session(
            self.cm_url,
            "alice",
            ALICE_PW,
            domain="CORP",
            resource="desk-a",
            ssl_context=self.ctx,
            tcp_bytes=100_000,
            udp_datagrams=5,
            source_address=source,
        )


def _port(proc: ServiceProcess, key: str) -> int:
    return int(str(proc.config[key]))


@pytest.fixture(scope="module")
def dmz(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dmz]:
    root = tmp_path_factory.mktemp("dmz")
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["broker"] = start_broker(pki, root / "broker", "dmz-broker", ADMIN_TOKEN)
        broker_url = f"https://127.0.0.1:{_port(procs['broker'], 'ListenPort')}"
        procs["agent"] = start_agent(pki, root / "agent", "dmz-agent", "desk-a", "127.0.0.2", broker_url)
        agent = ("127.0.0.2", _port(procs["agent"], "ControlPort"), _port(procs["agent"], "SessionPort"))
        # The inner SG of the second perimeter: PROXY v2 required from the forwarder's address.
        procs["inner"] = start_sg(
            pki,
            root / "inner",
            "dmz-inner",
            SECRET,
            ProxyProtocolSources="127.0.0.1/32",
            RequestTimeout=REQUEST_TIMEOUT,
        )
        inner_port = _port(procs["inner"], "Port")
        # The outer SG in the DMZ: the first inner SG listed is down (failover to the second).
        procs["outer"] = start_forwarder(
            root / "outer",
            [("127.0.0.1", free_port()), ("127.0.0.1", inner_port)],
            RequestTimeout=REQUEST_TIMEOUT,
            MaxConnectionsPerSource=PER_SOURCE,
        )
        outer_port = _port(procs["outer"], "Port")
        cm_certs = pki.issue("dmz-cm", ["localhost", "127.0.0.1"])
        procs["cm"] = start_cm(
            root / "cm",
            cm_config(
                pki,
                cm_certs,
                broker_url,
                SecurityGatewayEnabled=True,
                ExternalPcoipIp="127.0.0.1",  # the forwarder's external address
                SecurityGatewayPort=outer_port,
            ),
            SECRET,
        )
        st = Dmz(
            pki, f"https://127.0.0.1:{_port(procs['cm'], 'ListenPort')}", agent, inner_port, outer_port, procs
        )
        ctx = st.ctx
        broker_admin(
            broker_url,
            ADMIN_TOKEN,
            ctx,
            "PUT",
            "/desktops/desk-a",
            {
                "address": agent[0],
                "hostname": "desk-a.test",
                "agent_port": agent[1],
                "session_port": agent[2],
            },
        )
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", "/users/CORP/alice", {"password": ALICE_PW})
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", "/entitlements/user/CORP/alice/desktop/desk-a")
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


# ---------------------------------------------------------------- helpers


def refused(m: dict[str, float], reason: str) -> float:
    return m.get(f'gatehouse_sg_sessions_refused_total{{reason="{reason}"}}', 0.0)


def dropped(m: dict[str, float], reason: str) -> float:
    return m.get(f'gatehouse_sg_udp_datagrams_dropped_total{{reason="{reason}"}}', 0.0)


def assert_session_ok(report: SessionReport) -> None:
    assert report.ok, [s for s in report.steps if not s.ok]
    assert [s.name for s in report.steps][-4:] == ["connect", "tcp-echo", "udp-echo", "bye"]


def grant_for(st: Dmz, client_ip: str) -> str:
    """Play the CM: a session-tag from the agent and a grant bound to ``client_ip``."""
    address, control, session_port = st.agent
    sid = str(uuid.uuid4())
    body = protocol.render("pcoip-agent", protocol.LaunchSession(sid, client_ip, "alice", "CORP"))
    identity = cm_identity(st.pki)
    ctx = ssl.create_default_context(cafile=str(st.pki.ca))
    ctx.load_cert_chain(identity.cert, identity.key)
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
    grant = GrantSealer(decode_secret(SECRET)).mint(sid, address, session_port, tag, client_ip)
    SEEN.extend([tag, grant])
    return grant


def tls_through(port: int, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return client_ctx().wrap_socket(raw)


def udp_from(source: str) -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((source, 0))
    udp.settimeout(1.5)
    return udp


def bind_answer(udp: socket.socket, grant: str, port: int) -> bytes | None:
    """Send the grant's bind datagram to 127.0.0.1:``port``; the ack, or None."""
    key, key_id = linechan.udp_bind_key(grant)
    udp.sendto(linechan.bind_datagram(key, key_id, 1), ("127.0.0.1", port))
    try:
        return udp.recvfrom(2048)[0]
    except TimeoutError:
        return None


# ---------------------------------------------------------------- the session


async def test_full_session_through_the_forwarder(dmz: Dmz) -> None:
    report = await dmz.session()
    assert_session_ok(report)
    assert report.target == f"127.0.0.1:{dmz.outer_port}"  # the forwarder, not the inner SG
    inner_logs = dmz.procs["inner"].logs()
    relaying = [
        line for line in inner_logs.splitlines() if '"msg": "relaying"' in line and report.session_id in line
    ]
    assert relaying and f'"client": "{USER_IP}"' in relaying[0]  # the real client, not the forwarder
    outer = dmz.outer_metrics()
    assert outer["gatehouse_sg_sessions_accepted_total"] >= 1
    assert outer['gatehouse_sg_udp_datagrams_relayed_total{direction="to_agent"}'] >= 5
    assert outer['gatehouse_sg_udp_datagrams_relayed_total{direction="to_client"}'] >= 5
    # The outer logged the dead inner SG it skipped, and never a session id, grant or tag.
    outer_logs = dmz.procs["outer"].logs()
    assert report.session_id not in outer_logs


def test_a_grant_through_the_forwarder_from_another_address_is_refused(dmz: Dmz) -> None:
    before = dmz.inner_metrics()
    grant = grant_for(dmz, USER_IP)
    # Held by a thief at another address: 403 from the inner SG, through the forwarder.
    with tls_through(dmz.outer_port, THIEF_IP) as sock:
        sock.sendall(linechan.connect_line(grant))
        assert read_line(sock) == linechan.FORBIDDEN
    assert refused(dmz.inner_metrics(), "wrong-client") - refused(before, "wrong-client") == 1
    # The user's own address still gets it (the refusal did not spend the grant) ...
    with (
        tls_through(dmz.outer_port, USER_IP) as sock,
        udp_from(USER_IP) as mine,
        udp_from(THIEF_IP) as theirs,
    ):
        sock.sendall(linechan.connect_line(grant))
        assert read_line(sock) == linechan.OK
        # ... and the UDP bind from the thief's address (with a TCP connection of its own open
        # through the forwarder) is refused by the inner SG's check of the header's address.
        with tls_through(dmz.outer_port, THIEF_IP):
            assert bind_answer(theirs, grant, dmz.outer_port) is None
            key, key_id = linechan.udp_bind_key(grant)
            assert bind_answer(mine, grant, dmz.outer_port) == linechan.bind_ack(key, key_id, 1)
    assert dropped(dmz.inner_metrics(), "bind-wrong-client") - dropped(before, "bind-wrong-client") == 1


async def test_a_proxy_header_from_an_untrusted_source_is_refused(dmz: Dmz) -> None:
    """An attacker reaching the inner SG directly claims the user's address in a PROXY header."""
    grant = grant_for(dmz, USER_IP)
    header = proxyproto.build((USER_IP, 40000), ("127.0.0.1", dmz.inner_port))
    raw = socket.create_connection(("127.0.0.1", dmz.inner_port), timeout=5, source_address=(ATTACKER_IP, 0))
    raw.sendall(header)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with client_ctx().wrap_socket(raw) as sock:  # the header is no TLS: the handshake fails
            sock.sendall(linechan.connect_line(grant))
            assert read_line(sock) == b""
    # Without the header the grant is for another address: refused as always.
    with tls_through(dmz.inner_port, ATTACKER_IP) as sock:
        sock.sendall(linechan.connect_line(grant))
        assert read_line(sock) == linechan.FORBIDDEN
    # The same in UDP: a header in a datagram from an untrusted source binds nothing.
    key, key_id = linechan.udp_bind_key(grant)
    with udp_from(ATTACKER_IP) as udp:
        udp.sendto(
            proxyproto.build((USER_IP, 40000), ("127.0.0.1", dmz.inner_port), proxyproto.DGRAM)
            + linechan.bind_datagram(key, key_id, 1),
            ("127.0.0.1", dmz.inner_port),
        )
        with pytest.raises(TimeoutError):
            udp.recvfrom(2048)
    assert_session_ok(await dmz.session())


def test_the_forwarder_without_a_valid_header_is_dropped(dmz: Dmz) -> None:
    """The inner SG requires the header from its ProxyProtocolSources: TLS straight from the
    forwarder's address is closed, and so is a silent connection after RequestTimeout."""
    before = dmz.inner_metrics()
    raw = socket.create_connection(("127.0.0.1", dmz.inner_port), timeout=5)  # from 127.0.0.1
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with client_ctx().wrap_socket(raw):
            pass
    silent = socket.create_connection(("127.0.0.1", dmz.inner_port), timeout=REQUEST_TIMEOUT + 3)
    started = time.monotonic()
    with silent:
        assert silent.recv(1) == b""
    assert REQUEST_TIMEOUT - 0.5 <= time.monotonic() - started <= REQUEST_TIMEOUT + 2
    m = dmz.inner_metrics()
    assert refused(m, "proxy-malformed") - refused(before, "proxy-malformed") == 1
    assert refused(m, "proxy-timeout") - refused(before, "proxy-timeout") == 1
    # A truncated header, then silence: dropped at the same deadline.
    with socket.create_connection(("127.0.0.1", dmz.inner_port), timeout=REQUEST_TIMEOUT + 3) as cut:
        cut.sendall(proxyproto.build((USER_IP, 1), ("127.0.0.1", 1))[:20])
        assert cut.recv(1) == b""


def test_silent_connections_from_a_forwarder_wait_at_most_max_connections_and_briefly(
    pki: pkimod.TestPKI, tmp_path: Path
) -> None:
    """A forwarder (or who took its address) opening connections that never send a header: at most
    MaxConnections of them wait for their header, the rest are closed at once, every waiter is
    closed at RequestTimeout, and then a real header and TLS handshake are served."""
    limit = 8
    inner = start_sg(
        pki,
        tmp_path / "inner",
        "dmz-flooded",
        SECRET,
        ProxyProtocolSources="127.0.0.1/32",
        RequestTimeout=REQUEST_TIMEOUT,
        MaxConnections=limit,
    )
    port = _port(inner, "Port")
    admin = _port(inner, "AdminPort")
    silent: list[socket.socket] = []
    try:
        silent = [
            socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 3) for _n in range(limit)
        ]
        started = time.monotonic()
        for _n in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 3) as extra:
                assert closed_by_peer(extra)
        assert time.monotonic() - started < REQUEST_TIMEOUT  # refused at accept, not at the deadline
        for sock in silent:
            assert closed_by_peer(sock)
        assert time.monotonic() - started <= REQUEST_TIMEOUT + 2
        m = metrics(admin)
        assert refused(m, "proxy-busy") == 4
        assert refused(m, "proxy-timeout") == limit
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(proxyproto.build((USER_IP, 40000), ("127.0.0.1", port)))
            with client_ctx().wrap_socket(raw) as conn:
                assert conn.version() is not None  # handshake done for the client the header names
    finally:
        for sock in silent:
            sock.close()
        inner.stop()
    assert "proxy-busy" in inner.logs()


def test_the_forwarder_holds_no_secret_and_refuses_one(dmz: Dmz, tmp_path: Path) -> None:
    outer = dmz.procs["outer"]
    assert outer.env_path is None  # no cmsg.env at all
    text = outer.config_path.read_text()
    assert "GrantSecret" not in text and "SslKey" not in text and "AgentCaCert" not in text
    assert SECRET not in text
    proc = ServiceProcess(
        "sg",
        tmp_path,
        {**outer.config, "Port": free_port(), "AdminPort": free_port()},
        config_name="SecurityGateway.conf",
        env_file={"GATEHOUSE_GRANTSECRET": SECRET},
    ).start()
    assert proc.proc is not None and proc.proc.wait(20) == 2
    proc.stop()
    assert "a forwarder holds no grant secret" in proc.logs()
    assert SECRET not in proc.logs()


def test_idle_half_open_and_non_tls_connections_to_the_forwarder_hold_no_slot(dmz: Dmz) -> None:
    before = dmz.outer_metrics()
    socks = []
    try:
        for _n in range(PER_SOURCE):
            socks.append(
                socket.create_connection(
                    ("127.0.0.1", dmz.outer_port), timeout=5, source_address=(IDLE_IP, 0)
                )
            )
        # Over MaxConnectionsPerSource: closed at once.
        extra = socket.create_connection(
            ("127.0.0.1", dmz.outer_port), timeout=5, source_address=(IDLE_IP, 0)
        )
        with extra:
            assert closed_by_peer(extra)
        # Half-open: the first byte of a TLS record, then nothing.
        socks[0].sendall(b"\x16")
        started = time.monotonic()
        for sock in socks:
            sock.settimeout(REQUEST_TIMEOUT + 3)
            assert closed_by_peer(sock)
        assert time.monotonic() - started <= REQUEST_TIMEOUT + 2
    finally:
        for sock in socks:
            sock.close()
    with socket.create_connection(
        ("127.0.0.1", dmz.outer_port), timeout=5, source_address=(IDLE_IP, 0)
    ) as http:
        http.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS: closed before any inner SG is asked
        assert closed_by_peer(http)
    wait_for(lambda: dmz.outer_metrics()["gatehouse_sg_connections_open"] == 0, "the forwarder's slots back")
    m = dmz.outer_metrics()
    assert refused(m, "per-source") - refused(before, "per-source") == 1
    assert refused(m, "timeout") - refused(before, "timeout") == PER_SOURCE
    assert refused(m, "not-tls") - refused(before, "not-tls") == 1


def test_udp_to_the_forwarder_needs_a_tcp_connection_of_that_address(dmz: Dmz) -> None:
    before = dmz.outer_metrics()
    with udp_from(ATTACKER_IP) as udp:
        for n in range(5):
            udp.sendto(b"spray-%d" % n, ("127.0.0.1", dmz.outer_port))
        with contextlib.suppress(TimeoutError):
            assert udp.recvfrom(2048) is None
    m = dmz.outer_metrics()
    assert dropped(m, "no-tcp") - dropped(before, "no-tcp") == 5
    assert m["gatehouse_sg_udp_agent_ports_in_use"] == 0  # no flow (socket) was opened


def test_no_grant_or_tag_in_any_log(dmz: Dmz) -> None:
    for name, proc in dmz.procs.items():
        logs = proc.logs()
        for secret in [SECRET, *SEEN]:
            assert secret not in logs, name


def test_a_forwarder_behind_a_halb_takes_the_client_address_from_its_header(dmz: Dmz, tmp_path: Path) -> None:
    """HAProxy in front of the forwarder (send-proxy-v2, here played from 127.0.0.9): the forwarder
    reads the HALB's header and passes the client's address on; without it, the HALB's connection
    is refused."""
    halb_ip = "127.0.0.9"
    fwd = start_forwarder(
        tmp_path / "outer-halb",
        [("127.0.0.1", dmz.inner_port)],
        ProxyProtocolSources=f"{halb_ip}/32",
        RequestTimeout=REQUEST_TIMEOUT,
    )
    try:
        port = _port(fwd, "Port")
        grant = grant_for(dmz, USER_IP)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(halb_ip, 0))
        raw.sendall(proxyproto.build((USER_IP, 45000), ("127.0.0.1", port)))
        with client_ctx().wrap_socket(raw) as sock:
            sock.sendall(linechan.connect_line(grant))
            assert read_line(sock) == linechan.OK
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(halb_ip, 0))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with client_ctx().wrap_socket(raw):  # TLS without the header: refused
                pass
        m = metrics(_port(fwd, "AdminPort"))
        assert refused(m, "proxy-malformed") == 1
    finally:
        fwd.stop()
