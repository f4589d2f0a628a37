"""Tenants on one shared CM + SG (docs/tenants.md), as real processes on loopback with real TLS.

Two tenants, a.example and b.example, each with its own broker and desktop agent; both brokers
know a user ``alice`` (with different passwords: two people) entitled to a desktop ``desk``. The
client reaches the CM and the SG at 127.0.0.1 and asks for a tenant's name in TLS (SNI) and
Host, as a client does whose DNS resolves every tenant's name to one VIP.

Isolation: each alice sees and reaches only her tenant's desk; a grant of tenant A is refused by
the SG under tenant B's name, and so is a grant sealed with A's key that names B's desktop; A's
cookie on B's name is refused; unknown names are refused. Adding tenant C and removing tenant B
(TenantsFile rewritten, SIGHUP) keeps A's running session.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pki as pkimod
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from services import ServiceProcess, broker_admin, cm_config, start_agent, start_broker, start_cm, start_sg

from gatehouse import linechan, tls
from gatehouse import protocol as p
from gatehouse.client.flow import CmConnection, Holding, run_session
from gatehouse.grant import GrantSealer, decode_secret, generate_secret

ADMIN_TOKEN = "admin-token-" + "f1e2d3c4b5a69788"
PASSWORDS = {"a": "Alice-of-A-pw!1", "b": "Alice-of-B-pw#2"}
AGENT_ADDRESS = {"a": "127.0.0.2", "b": "127.0.0.3"}
SECRET = generate_secret()
ENVELOPE = "pcoip-client"


@dataclass
class Stack:
    pki: pkimod.TestPKI
    cm_url: str
    sg_port: int
    tenants_file: Path
    broker_urls: dict[str, str]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    # Tenant b presents its own certificate (b.example only); a and c the shared one.
    own_certs: dict[str, pkimod.CertFiles] = field(default_factory=dict)

    @property
    def ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    @property
    def any_name_ctx(self) -> ssl.SSLContext:
        """Verifies the chain but not the name: to ask for names no certificate carries."""
        ctx = self.ctx
        ctx.check_hostname = False
        return ctx

    def tenants(self, *names: str) -> list[dict[str, object]]:
        """The tenants file's entries; tenant c (added at run time) uses b's broker process."""
        brokers = {"a": "a", "b": "b", "c": "b"}
        entries: list[dict[str, object]] = []
        for name in names:
            entry: dict[str, object] = {
                "name": name,
                "host_names": [f"{name}.example"],
                "broker_url": self.broker_urls[brokers[name]],
                "agent_networks": [f"{AGENT_ADDRESS[brokers[name]]}/32"],
            }
            if name in self.own_certs:
                entry.update(ssl_cert=str(self.own_certs[name].cert), ssl_key=str(self.own_certs[name].key))
            entries.append(entry)
        return entries


def _port(proc: ServiceProcess, key: str) -> int:
    return int(str(proc.config[key]))


@pytest.fixture(scope="module")
def stack(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tenants")
    procs: dict[str, ServiceProcess] = {}
    try:
        brokers: dict[str, str] = {}
        for tenant in ("a", "b"):
            procs[f"broker-{tenant}"] = start_broker(
                pki, root / f"broker-{tenant}", f"tenants-broker-{tenant}", ADMIN_TOKEN
            )
            brokers[tenant] = f"https://127.0.0.1:{_port(procs[f'broker-{tenant}'], 'ListenPort')}"
            # The same desktop name on both sides, on each tenant's own address.
            agent = procs[f"agent-{tenant}"] = start_agent(
                pki,
                root / f"agent-{tenant}",
                f"tenants-agent-{tenant}",
                "desk",
                AGENT_ADDRESS[tenant],
                brokers[tenant],
            )
            ctx = tls.client_context(pki.ca, verify=True, role="sg")
            desk = {
                "address": AGENT_ADDRESS[tenant],
                "hostname": "desk.test",
                "agent_port": _port(agent, "ControlPort"),
                "session_port": _port(agent, "SessionPort"),
            }
            for path, body in (
                ("/desktops/desk", desk),
                ("/users/CORP/alice", {"password": PASSWORDS[tenant]}),
                ("/entitlements/user/CORP/alice/desktop/desk", None),
            ):
                broker_admin(brokers[tenant], ADMIN_TOKEN, ctx, "PUT", path, body)
        tenants_file = root / "tenants.json"
        st = Stack(pki, "", 0, tenants_file, brokers, procs)
        st.own_certs["b"] = pki.issue("tenants-b-own", ["b.example"], role="sg")
        tenants_file.write_text(json.dumps(st.tenants("a", "b")), encoding="utf-8")
        # One certificate with every tenant's name, on the CM and on the SG (docs/tenants.md).
        names = ["a.example", "b.example", "c.example", "localhost", "127.0.0.1"]
        sg_certs = pki.issue("tenants-sg-shared", names, role="sg")
        procs["sg"] = start_sg(
            pki,
            root / "sg",
            "tenants-sg",
            SECRET,
            SslCert=sg_certs.cert,
            SslKey=sg_certs.key,
            TenantsFile=tenants_file,
        )
        st.sg_port = _port(procs["sg"], "Port")
        cm_certs = pki.issue("tenants-cm", names)
        procs["cm"] = start_cm(
            root / "cm",
            cm_config(
                pki,
                cm_certs,
                "",  # no BrokerUrl: every client belongs to a tenant
                SecurityGatewayEnabled=True,
                ExternalPcoipIp="127.0.0.1",
                SecurityGatewayPort=st.sg_port,
                TenantsFile=tenants_file,
            ),
            SECRET,
        )
        st.cm_url = f"https://127.0.0.1:{_port(procs['cm'], 'ListenPort')}"
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


# ---------------------------------------------------------------- helpers


def connection(stack: Stack, server_name: str | None) -> CmConnection:
    known = server_name is None or server_name.startswith(("a.", "b.", "c."))
    ctx = stack.ctx if known else stack.any_name_ctx
    return CmConnection(stack.cm_url, ctx, server_name=server_name, timeout=30)


async def send(
    cm: CmConnection, message: p.Message, headers: dict[str, str] | None = None
) -> tuple[int, p.Message]:
    status, body = await cm.post_raw(p.render(ENVELOPE, message), headers)
    return status, p.parse(body, ENVELOPE)


async def login(cm: CmConnection, tenant: str) -> None:
    _status, hello = await send(cm, p.Hello(client_info=p.ClientInfo(product_name="Gatehouse Test")))
    assert isinstance(hello, p.HelloResp), hello
    _status, auth = await send(cm, p.Authenticate("alice", PASSWORDS[tenant], "CORP"))
    assert isinstance(auth, p.AuthenticateResp) and auth.result_id == p.AUTH_OK, auth


async def allocate(cm: CmConnection) -> p.Target:
    _status, listed = await send(cm, p.GetResourceList())
    assert isinstance(listed, p.GetResourceListResp) and listed.result_id == p.LIST_OK, listed
    assert [r.name for r in listed.resources] == ["desk"]
    desk = listed.resources[0]
    _status, reply = await send(cm, p.AllocateResource(desk.resource_id, desk.resource_type))
    assert isinstance(reply, p.AllocateResourceResp) and reply.result_id == p.ALLOC_OK, reply
    assert reply.target is not None
    return reply.target


async def present(stack: Stack, server_name: str, connect_tag: str) -> bytes:
    """``CONNECT <tag>`` on the SG under ``server_name``; the SG's first answer line."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", stack.sg_port, ssl=stack.any_name_ctx, server_hostname=server_name
    )
    try:
        writer.write(linechan.connect_line(connect_tag))
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def wait_for_log(proc: ServiceProcess, text: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.logs().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{proc.service}: {text!r} not logged {count} time(s):\n{proc.logs()[-3000:]}")


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize("tenant", ["a", "b"])
async def test_each_alice_gets_her_own_tenants_desk(stack: Stack, tenant: str) -> None:
    """alice@A and alice@B each see one ``desk`` and run a full session (TCP + UDP echo through
    the SG) on their own tenant's agent; the other agent never hears of it."""
    report = await run_session(
        stack.cm_url,
        "alice",
        PASSWORDS[tenant],
        domain="CORP",
        ssl_context=stack.ctx,
        server_name=f"{tenant}.example",
        udp_datagrams=3,
    )
    assert report.ok, report.to_dict()
    assert report.resources == ["desk"]
    other = "b" if tenant == "a" else "a"
    assert report.session_id in stack.procs[f"agent-{tenant}"].logs()
    assert report.session_id not in stack.procs[f"agent-{other}"].logs()
    assert report.session_id not in stack.procs[f"broker-{other}"].logs()


async def test_same_name_in_two_tenants_is_two_people(stack: Stack) -> None:
    """alice@A's password does not open alice@B's account: each tenant's broker checks its own."""
    cm = connection(stack, "b.example")
    try:
        await send(cm, p.Hello(client_info=p.ClientInfo(product_name="Gatehouse Test")))
        _status, auth = await send(cm, p.Authenticate("alice", PASSWORDS["a"], "CORP"))
        assert isinstance(auth, p.AuthenticateResp) and auth.result_id == p.AUTH_FAILED
    finally:
        await cm.close()


async def test_grant_of_a_is_refused_for_b(stack: Stack) -> None:
    """Tenant A's grant under B's name: 403 (wrong-tenant), and the grant is not spent by it;
    a grant sealed with A's key naming B's desktop: 403 (wrong-tenant-agent); under an unknown
    name: 403 (unknown-tenant). The genuine grant then passes under A's name."""
    cm = connection(stack, "a.example")
    try:
        await login(cm, "a")
        target = await allocate(cm)
        assert target.sni == "a.example" and target.connect_tag.startswith("g1t.a.")
        assert await present(stack, "b.example", target.connect_tag) == linechan.FORBIDDEN
        assert await present(stack, "zz.example", target.connect_tag) == linechan.FORBIDDEN
        sealer = GrantSealer(decode_secret(SECRET), tenant="a")
        desk_b = stack.procs["agent-b"]
        forged = sealer.mint(
            target.session_id, AGENT_ADDRESS["b"], _port(desk_b, "SessionPort"), "tag", "127.0.0.1"
        )
        assert await present(stack, "a.example", forged) == linechan.FORBIDDEN
        tenantless = GrantSealer(decode_secret(SECRET)).mint(
            target.session_id, AGENT_ADDRESS["a"], 1, "tag", "127.0.0.1"
        )
        assert await present(stack, "a.example", tenantless) == linechan.FORBIDDEN
        assert await present(stack, "a.example", target.connect_tag) == linechan.OK
    finally:
        await send(cm, p.Bye())
        await cm.close()
    logs = stack.procs["sg"].logs()
    for reason in ("wrong-tenant", "unknown-tenant", "wrong-tenant-agent"):
        assert f"refused: {reason}" in logs, reason
    assert target.connect_tag not in logs


async def test_an_invitation_of_a_is_no_code_on_b(stack: Stack) -> None:
    """alice@A's collaboration code, redeemed by alice@B on b.example: an unknown invitation."""
    cm_b = connection(stack, "b.example")
    results: list[str] = []

    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code is not None
        await login(cm_b, "b")
        _status, reply = await send(cm_b, p.RedeemInvitation(code))
        assert isinstance(reply, p.RedeemInvitationResp), reply
        results.append(reply.result_id)

    try:
        report = await run_session(
            stack.cm_url,
            "alice",
            PASSWORDS["a"],
            domain="CORP",
            ssl_context=stack.ctx,
            server_name="a.example",
            hold=hold,
        )
        assert report.ok, report.to_dict()
        assert results == [p.JOIN_UNKNOWN]
    finally:
        await send(cm_b, p.Bye())
        await cm_b.close()


async def test_cookie_of_a_is_refused_on_b(stack: Stack) -> None:
    """A's session cookie presented on B's name: 421 and an error-resp; A's session is untouched."""
    cm_a = connection(stack, "a.example")
    cm_b = connection(stack, "b.example")
    try:
        await login(cm_a, "a")
        cookie = next(c.value for c in cm_a.http.cookie_jar if c.key == "JSESSIONID")
        for message in (p.GetResourceList(), p.Hello(client_info=p.ClientInfo(product_name="x")), p.Bye()):
            status, reply = await send(cm_b, message, {"Cookie": f"JSESSIONID={cookie}"})
            assert status == 421 and isinstance(reply, p.ErrorResp), (message.tag, reply)
            assert "another host name" in reply.result_str
        await allocate(cm_a)  # still alive and authenticated on A
    finally:
        await send(cm_a, p.Bye())
        await cm_a.close()
        await cm_b.close()


@pytest.mark.parametrize(
    ("server_name", "host", "why"),
    [
        ("zz.example", None, "unknown host name"),
        (None, None, "connect with a tenant's host name"),
        ("a.example", "b.example", "name different tenants"),
    ],
)
async def test_unknown_or_mismatched_name_is_refused(
    stack: Stack, server_name: str | None, host: str | None, why: str
) -> None:
    cm = connection(stack, server_name)
    try:
        headers = {"Host": host} if host else None
        status, reply = await send(cm, p.Hello(client_info=p.ClientInfo(product_name="x")), headers)
        assert status == 421 and isinstance(reply, p.ErrorResp), reply
        assert why in reply.result_str
    finally:
        await cm.close()


def peer_certificate(port: int, server_name: str, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as conn:
            return conn.getpeercert(binary_form=True) or b""


@pytest.mark.parametrize("service", ["cm", "sg"])
def test_a_tenant_with_its_own_certificate_gets_it_by_name(stack: Stack, service: str) -> None:
    """SNI b.example: b's own certificate (b.example only); a.example: the shared one."""
    port = _port(stack.procs["cm"], "ListenPort") if service == "cm" else stack.sg_port
    own = x509.load_pem_x509_certificate(Path(stack.own_certs["b"].cert).read_bytes())
    assert peer_certificate(port, "b.example", stack.ctx) == own.public_bytes(serialization.Encoding.DER)
    shared = x509.load_der_x509_certificate(peer_certificate(port, "a.example", stack.ctx))
    names = shared.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "c.example" in names.get_values_for_type(x509.DNSName)


# ---------------------------------------------------------------- add and remove tenants


async def test_adding_c_and_removing_b_keeps_a_running(stack: Stack) -> None:
    """With alice@A's channel up, TenantsFile becomes a + c and CM and SG get SIGHUP: A's channel
    still echoes and her CM session still answers; b.example is refused and c.example served."""
    cm_b = connection(stack, "b.example")
    await login(cm_b, "b")  # a B session at the time of the change: it ends with B

    async def hold(owner: Holding) -> None:
        stack.tenants_file.write_text(json.dumps(stack.tenants("a", "c")), encoding="utf-8")
        for name in ("cm", "sg"):
            proc = stack.procs[name]
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_log, proc, "tenants reloaded", 1)
        assert await owner.echo(65536, 2, 30.0, "-after-reload")
        # Her CM session is still there, authenticated and on its desktop: it may invite.
        assert await owner.invite() is not None

    try:
        report = await run_session(
            stack.cm_url,
            "alice",
            PASSWORDS["a"],
            domain="CORP",
            ssl_context=stack.ctx,
            server_name="a.example",
            hold=hold,
        )
        assert report.ok, report.to_dict()
        assert report.step("tcp-echo-after-reload") is not None
        status, reply = await send(cm_b, p.GetResourceList())
        assert status == 421 and isinstance(reply, p.ErrorResp), reply
        c_report = await run_session(
            stack.cm_url,
            "alice",
            PASSWORDS["b"],
            domain="CORP",
            ssl_context=stack.ctx,
            server_name="c.example",
        )
        assert c_report.ok, c_report.to_dict()
        assert "sessions_ended" in stack.procs["cm"].logs()
    finally:
        await cm_b.close()
        stack.tenants_file.write_text(json.dumps(stack.tenants("a", "b")), encoding="utf-8")
