"""End to end: broker, two agents, SG and CMs as real processes on loopback with real TLS.

A full session (gateway and direct mode, TCP and UDP echo) succeeds through the client's
``run_session``; every bad input gets its specific answer and the CM keeps serving the next
client; secrets never reach any service's log, and log lines about a session carry its id.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pki as pkimod
import pytest
from aiohttp import web
from services import (
    ServiceProcess,
    broker_admin,
    cm_config,
    free_port,
    start_agent,
    start_broker,
    start_cm,
    start_sg,
)
from tls_probe import assert_probe_offers, handshake, probe_context

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import CmConnection, SessionReport, run_session, session_channel
from gatehouse.grant import generate_secret

ADMIN_TOKEN = "admin-token-" + "a1b2c3d4e5f6a7b8c9d0"
ALICE_PW = "Alice-S3cret-pw!"
BOB_PW = "Bob-S3cret-pw#2"
CAROL_PW = "Carol-S3cret-pw$3"
SECRET = generate_secret()
ENV = "pcoip-client"
SEED_PROBE = (
    b"POST /pcoip-broker/xml HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Content-type: text/xml; charset=UTF-8\r\n"
    b"Content-Length: 39\r\n"
    b"\r\n"
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
)


@dataclass
class Stack:
    pki: pkimod.TestPKI
    broker_url: str
    gateway_cm: str
    direct_cm: str
    sg_port: int
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    resource_ids: dict[str, str] = field(default_factory=dict)

    @property
    def ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def admin(self, method: str, path: str, body: object | None = None) -> dict:
        return broker_admin(self.broker_url, ADMIN_TOKEN, self.ctx, method, path, body)

    def all_logs(self) -> dict[str, str]:
        return {name: proc.logs() for name, proc in self.procs.items()}


def cm_url(proc: ServiceProcess) -> str:
    return f"https://127.0.0.1:{_port(proc)}"


def _port(proc: ServiceProcess, key: str = "ListenPort") -> int:
    return int(str(proc.config[key]))


def cm_admin_url(proc: ServiceProcess) -> str:
    """The CM's management listener (/health and /metrics; /metrics is not on the public port)."""
    return f"http://127.0.0.1:{_port(proc, 'AdminPort')}"


@pytest.fixture(scope="module")
def stack(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("session")
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["broker"] = start_broker(
            pki, root / "broker", "session-broker", ADMIN_TOKEN, Domains="CORP,LAB"
        )
        broker_url = f"https://127.0.0.1:{_port(procs['broker'])}"
        agents: dict[str, tuple[str, int, int]] = {}
        for name, address in (("desk-a", "127.0.0.2"), ("desk-b", "127.0.0.3")):
            procs[name] = start_agent(pki, root / name, f"session-{name}", name, address, broker_url)
            agents[name] = (address, _port(procs[name], "ControlPort"), _port(procs[name], "SessionPort"))
        procs["sg"] = start_sg(pki, root / "sg", "session-sg", SECRET)
        sg_port = _port(procs["sg"], "Port")
        cm_certs = pki.issue("session-cm", ["localhost", "127.0.0.1"])
        procs["cm-gateway"] = start_cm(
            root / "cm-gateway",
            cm_config(
                pki,
                cm_certs,
                broker_url,
                SecurityGatewayEnabled=True,
                ExternalPcoipIp="127.0.0.1",
                SecurityGatewayPort=sg_port,
            ),
            SECRET,
        )
        procs["cm-direct"] = start_cm(root / "cm-direct", cm_config(pki, cm_certs, broker_url), SECRET)
        st = Stack(pki, broker_url, cm_url(procs["cm-gateway"]), cm_url(procs["cm-direct"]), sg_port, procs)
        seed_broker(st, agents)
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def seed_broker(st: Stack, agents: dict[str, tuple[str, int, int]]) -> None:
    for name, (address, control, session_port) in agents.items():
        st.admin(
            "PUT",
            f"/desktops/{name}",
            {
                "address": address,
                "hostname": f"{name}.test",
                "agent_port": control,
                "session_port": session_port,
            },
        )
    # An agent that is down: nothing listens on its control port.
    st.admin(
        "PUT", "/desktops/desk-dead", {"address": "127.0.0.1", "agent_port": free_port(), "session_port": 9}
    )
    for user, pw in (("alice", ALICE_PW), ("bob", BOB_PW), ("carol", CAROL_PW)):
        st.admin("PUT", f"/users/CORP/{user}", {"password": pw})
    for user, desktop in (
        ("alice", "desk-a"),
        ("alice", "desk-b"),
        ("bob", "desk-b"),
        ("carol", "desk-dead"),
    ):
        st.admin("PUT", f"/entitlements/user/CORP/{user}/desktop/{desktop}")


# ---------------------------------------------------------------- helpers


class Client:
    """A raw client of the CM's XML endpoint with its own cookie jar."""

    def __init__(self, url: str, ctx: ssl.SSLContext, cookies: bool = True) -> None:
        self.url = url + p.PATH_BROKER
        jar = aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=30)
        )
        self.last_headers: dict[str, str] = {}
        self.last_set_cookies: list[str] = []

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def raw(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, p.Message]:
        async with self.http.post(self.url, data=body, headers=headers or {}) as resp:
            self.last_headers = dict(resp.headers)
            self.last_set_cookies = resp.headers.getall("Set-Cookie", [])
            data = await resp.read()
            assert resp.headers["Content-Type"] == p.CONTENT_TYPE
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert b"Traceback" not in data
            return resp.status, p.parse(data, ENV)

    async def send(self, message: p.Message, headers: dict[str, str] | None = None) -> p.Message:
        return (await self.raw(p.render(ENV, message), headers))[1]

    async def hello(self, product: str = "Gatehouse Test") -> p.Message:
        return await self.send(p.Hello(client_info=p.ClientInfo(product_name=product)))

    async def login(self, user: str, password: str) -> None:
        assert isinstance(await self.hello(), p.HelloResp)
        reply = await self.send(p.Authenticate(user, password, "CORP"))
        assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK, reply

    async def resources(self) -> dict[str, str]:
        reply = await self.send(p.GetResourceList())
        assert isinstance(reply, p.GetResourceListResp) and reply.result_id == p.LIST_OK, reply
        return {r.name: r.resource_id for r in reply.resources}

    def cookie(self) -> str:
        for cookie in self.http.cookie_jar:
            if cookie.key == "JSESSIONID":
                return cookie.value
        return ""


def error_of(message: p.Message) -> tuple[str, str]:
    assert isinstance(message, p.ErrorResp), message
    return message.result_id, message.result_str


async def assert_serving(url: str, ctx: ssl.SSLContext) -> None:
    """The CM still answers the next client: a fresh hello gets a hello-resp."""
    async with Client(url, ctx) as client:
        assert isinstance(await client.hello(), p.HelloResp)


def assert_session_ok(report: SessionReport) -> None:
    failed = [s for s in report.steps if not s.ok]
    assert report.ok, f"failed steps: {failed}"
    names = [s.name for s in report.steps]
    assert names == [
        "hello",
        "authenticate",
        "get-resource-list",
        "allocate-resource",
        "connect",
        "tcp-echo",
        "udp-echo",
        "bye",
    ]
    assert len(report.session_id) == 36


# ---------------------------------------------------------------- full sessions


async def test_full_session_through_the_gateway(stack: Stack) -> None:
    report = await run_session(
        stack.gateway_cm,
        "alice",
        ALICE_PW,
        domain="CORP",
        resource="desk-a",
        ssl_context=stack.ctx,
        tcp_bytes=200_000,
        udp_datagrams=5,
    )
    assert_session_ok(report)
    assert report.target == f"127.0.0.1:{stack.sg_port}"  # the SG, not the agent
    assert f'session_id": "{report.session_id}' in stack.procs["sg"].logs()


async def test_a_dual_stack_gateway_serves_ipv6_and_ipv4_clients(stack: Stack, tmp_path: Path) -> None:
    """EnableIpv6 as the cmsg module renders it: the SG on "::" (TCP and UDP, both families), the CM
    on both, ExternalPcoipIp with both addresses. An IPv6 client is sent to the SG's IPv6 address and
    an IPv4 client (a v4-mapped peer on the same sockets) to its IPv4 one; both relay TCP and UDP."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    sg_cert = stack.pki.issue("session-sg6", hosts, role="sg")
    sg = start_sg(
        stack.pki,
        tmp_path / "sg6",
        "session-sg6",
        SECRET,
        ListenAddress="::",
        SslCert=sg_cert.cert,
        SslKey=sg_cert.key,
    )
    cm_config_6 = cm_config(
        stack.pki,
        stack.pki.issue("session-cm6", hosts),
        stack.broker_url,
        ListenAddress="0.0.0.0",
        EnableIpv6=True,
        SecurityGatewayEnabled=True,
        ExternalPcoipIp="127.0.0.1,::1",
        SecurityGatewayPort=_port(sg, "Port"),
    )
    cm = start_cm(tmp_path / "cm6", cm_config_6, SECRET)
    try:
        for url, prefer_ipv6, target in (
            (f"https://[::1]:{_port(cm)}", True, "::1"),
            (f"https://127.0.0.1:{_port(cm)}", False, "127.0.0.1"),
        ):
            report = await run_session(
                url,
                "alice",
                ALICE_PW,
                domain="CORP",
                resource="desk-a",
                ssl_context=stack.ctx,
                udp_datagrams=3,
                prefer_ipv6=prefer_ipv6,
            )
            assert_session_ok(report)
            assert report.target == f"{target}:{_port(sg, 'Port')}"
        sessions = [json.loads(line) for line in sg.logs().splitlines() if '"msg": "relaying"' in line]
        assert {s.get("client") for s in sessions} == {"::1", "127.0.0.1"}, sessions
    finally:
        cm.stop()
        sg.stop()


async def test_full_session_in_direct_mode(stack: Stack) -> None:
    report = await run_session(
        stack.direct_cm, "bob", BOB_PW, domain="CORP", ssl_context=stack.ctx, tcp_bytes=100_000
    )
    assert_session_ok(report)
    assert report.resource == "desk-b"
    assert report.target.startswith("127.0.0.3:")  # the agent itself


async def test_establishment_only(stack: Stack) -> None:
    report = await run_session(stack.gateway_cm, "bob", BOB_PW, ssl_context=stack.ctx, connect=False)
    assert report.ok, report.steps
    assert [s.name for s in report.steps] == [
        "hello",
        "authenticate",
        "get-resource-list",
        "allocate-resource",
        "bye",
    ]
    failed = await run_session(stack.gateway_cm, "bob", "wrong", ssl_context=stack.ctx, connect=False)
    assert not failed.ok
    assert [(s.name, s.ok) for s in failed.steps] == [("hello", True), ("authenticate", False), ("bye", True)]


async def test_session_with_client_log_id_and_no_cookies(stack: Stack) -> None:
    report = await run_session(
        stack.gateway_cm,
        "alice",
        ALICE_PW,
        domain="CORP",
        resource="desk-b",
        ssl_context=stack.ctx,
        use_cookie=False,
        tcp_bytes=10_000,
    )
    assert_session_ok(report)


async def test_concurrent_sessions_keep_their_own_broker_sessions(stack: Stack) -> None:
    """Many clients share the CM's upstream pool; each keeps its own user, list and target."""

    async def one(i: int) -> tuple[str, SessionReport]:
        user, pw = ("alice", ALICE_PW) if i % 2 else ("bob", BOB_PW)
        report = await run_session(
            stack.gateway_cm, user, pw, domain="CORP", ssl_context=stack.ctx, tcp_bytes=2048, udp_datagrams=0
        )
        return user, report

    results = await asyncio.gather(*(one(i) for i in range(16)))
    for user, report in results:
        assert report.ok, (user, report.steps)
        # bob is entitled to desk-b only; alice's first resource is desk-a.
        assert report.resource == ("desk-a" if user == "alice" else "desk-b")
    assert len({report.session_id for _user, report in results}) == 16


async def test_hello_sets_a_secure_cookie_but_a_probe_does_not(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        assert isinstance(await client.hello(p.QUERY_PRODUCT), p.HelloResp)
        assert client.last_set_cookies == []
        assert client.cookie() == ""
        # A probe makes no session: the next message is out of state.
        assert error_of(await client.send(p.Authenticate("alice", ALICE_PW, "CORP")))[0] == p.E_OUT_OF_STATE
        assert isinstance(await client.hello(), p.HelloResp)
        (set_cookie,) = client.last_set_cookies
        assert set_cookie.startswith("JSESSIONID=")
        assert "Secure" in set_cookie and "HttpOnly" in set_cookie
        assert len(client.cookie()) >= 32


async def test_a_new_hello_restarts_the_session(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        await client.login("alice", ALICE_PW)
        first = client.cookie()
        assert isinstance(await client.hello(), p.HelloResp)
        assert client.cookie() != first
        # Back at the start: listing needs authentication again.
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH
        await client.login("alice", ALICE_PW)
        assert "desk-a" in await client.resources()


async def test_bye_resets_the_session_from_any_state(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        await client.login("alice", ALICE_PW)
        await client.resources()
        assert isinstance(await client.send(p.Bye()), p.ByeResp)
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH
        assert isinstance(await client.send(p.Bye()), p.ByeResp)  # bye without a session is harmless


async def test_client_log_id_stands_in_for_the_cookie(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx, cookies=False) as client:
        mine = {"Client-Log-Id": "log-" + "7" * 20}
        other = {"Client-Log-Id": "log-" + "8" * 20}
        assert isinstance(await client.send(p.Hello(), mine), p.HelloResp)
        assert client.last_set_cookies  # offered, but this client keeps no cookies
        reply = await client.send(p.Authenticate("alice", ALICE_PW, "CORP"), mine)
        assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK
        assert error_of(await client.send(p.GetResourceList(), other))[0] == p.E_USER_AUTH
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH
        listing = await client.send(p.GetResourceList(), mine)
        assert isinstance(listing, p.GetResourceListResp) and listing.result_id == p.LIST_OK


async def test_idle_sessions_expire(
    stack: Stack, pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    certs = pki.issue("session-cm-idle", ["localhost", "127.0.0.1"])
    cm = await asyncio.to_thread(
        start_cm, tmp_path, cm_config(pki, certs, stack.broker_url, SessionIdleTimeout=1), SECRET
    )
    processes.append(cm)
    async with Client(cm_url(cm), tls.client_context(pki.ca)) as client:
        await client.login("alice", ALICE_PW)
        await asyncio.sleep(2.5)  # past SessionIdleTimeout: the session is forgotten
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH


# ---------------------------------------------------------------- bad input


BAD_BODIES = [
    (b"<pcoip-client version='2.1'><hello></pcoip-client>", 400, p.E_MALFORMED, "malformed XML"),
    (b"not xml at all", 400, p.E_MALFORMED, "malformed XML"),
    (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><pcoip-client version="2.1"><hello>&lol3;</hello></pcoip-client>',
        400,
        p.E_MALFORMED,
        "DTD",
    ),
    (b'<pcoip-broker version="2.1"><hello/></pcoip-broker>', 400, p.E_ENVELOPE, "pcoip-client"),
    (b'<pcoip-client version="3.0"><hello/></pcoip-client>', 400, p.E_VERSION, "version"),
    (b"<pcoip-client><hello/></pcoip-client>", 400, p.E_VERSION, "version"),
    (b'<pcoip-client version="2.1"><hello/><bye/></pcoip-client>', 400, p.E_ENVELOPE, "exactly one"),
    (b'<pcoip-client version="2.1"><frobnicate/></pcoip-client>', 400, p.E_UNKNOWN, "frobnicate"),
    (b'<pcoip-client version="2.1"><hello-resp/></pcoip-client>', 200, p.E_UNKNOWN, "not a request"),
]


@pytest.mark.parametrize(("body", "status", "result_id", "text"), BAD_BODIES)
async def test_bad_requests_get_their_error(
    stack: Stack, body: bytes, status: int, result_id: str, text: str
) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        got_status, reply = await client.raw(body)
        got_id, got_text = error_of(reply)
        assert (got_status, got_id) == (status, result_id)
        assert text in got_text
    await assert_serving(stack.gateway_cm, stack.ctx)


async def test_body_over_the_cap_is_refused_by_length_and_while_reading(stack: Stack) -> None:
    big = b'<pcoip-client version="2.1"><hello>' + b"x" * (p.MAX_BODY + 10) + b"</hello></pcoip-client>"
    async with Client(stack.gateway_cm, stack.ctx) as client:
        status, reply = await client.raw(big)
        assert status == 413 and error_of(reply)[0] == p.E_TOO_LARGE

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked upload
            for offset in range(0, len(big), 8192):
                yield big[offset : offset + 8192]

        status, reply = await client.raw(chunks())  # type: ignore[arg-type]
        assert status == 413 and error_of(reply)[0] == p.E_TOO_LARGE
    await assert_serving(stack.gateway_cm, stack.ctx)


async def test_out_of_state_messages(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        assert error_of(await client.send(p.Authenticate("alice", ALICE_PW)))[0] == p.E_OUT_OF_STATE
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH
        assert isinstance(await client.hello(), p.HelloResp)
        assert error_of(await client.send(p.AllocateResource("d-1")))[0] == p.E_USER_AUTH
        assert error_of(await client.send(p.GetResourceList()))[0] == p.E_USER_AUTH
        reply = await client.send(p.Authenticate("alice", ALICE_PW, "CORP"))
        assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK
        assert error_of(await client.send(p.Authenticate("alice", ALICE_PW, "CORP")))[0] == p.E_OUT_OF_STATE
        assert "desk-a" in await client.resources()
    await assert_serving(stack.gateway_cm, stack.ctx)


async def test_unknown_user_and_wrong_password_get_the_same_answer_and_may_retry(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        assert isinstance(await client.hello(), p.HelloResp)
        wrong_pw = await client.send(p.Authenticate("alice", "not-the-password", "CORP"))
        unknown = await client.send(p.Authenticate("nobody", "whatever-pw", "CORP"))
        assert isinstance(wrong_pw, p.AuthenticateResp) and isinstance(unknown, p.AuthenticateResp)
        assert wrong_pw.result_id == unknown.result_id == p.AUTH_FAILED
        assert wrong_pw.result_str == unknown.result_str
        # Retry after a failure is allowed.
        ok = await client.send(p.Authenticate("alice", ALICE_PW, "CORP"))
        assert isinstance(ok, p.AuthenticateResp) and ok.result_id == p.AUTH_OK


async def test_allocating_a_resource_the_user_is_not_entitled_to(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as alice:
        await alice.login("alice", ALICE_PW)
        desk_a = (await alice.resources())["desk-a"]
    async with Client(stack.gateway_cm, stack.ctx) as bob:
        await bob.login("bob", BOB_PW)
        assert "desk-a" not in await bob.resources()
        reply = await bob.send(p.AllocateResource(desk_a))
        assert isinstance(reply, p.AllocateResourceResp)
        assert reply.result_id == p.ALLOC_NOT_ENTITLED and reply.target is None
        # The session is still usable: bob's own desktop can be allocated afterwards.
        reply = await bob.send(p.AllocateResource((await bob.resources())["desk-b"]))
        assert isinstance(reply, p.AllocateResourceResp) and reply.result_id == p.ALLOC_OK
        # A second allocation on the same session is out of state.
        assert error_of(await bob.send(p.AllocateResource(desk_a)))[0] == p.E_OUT_OF_STATE


async def test_the_seeds_health_probe_gets_an_error_resp(stack: Stack) -> None:
    def probe() -> bytes:
        ctx = ssl.create_default_context(cafile=str(stack.pki.ca))
        with socket.create_connection(("127.0.0.1", _port(stack.procs["cm-gateway"])), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(SEED_PROBE)
                data = b""
                while b"</pcoip-client>" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data

    answer = await asyncio.to_thread(probe)
    assert b"<error-resp>" in answer
    assert b"Content-Type: application/xml; charset=UTF-8" in answer
    await assert_serving(stack.gateway_cm, stack.ctx)


async def test_plain_http_is_redirected_to_https(stack: Stack) -> None:
    config = stack.procs["cm-gateway"].config_path.read_text()
    redirect = next(
        int(line.split("=")[1]) for line in config.splitlines() if line.startswith("RedirectPort=")
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{redirect}/pcoip-broker/xml", allow_redirects=False) as resp:
            assert resp.status == 301
            assert resp.headers["Location"] == f"{stack.gateway_cm}/pcoip-broker/xml"


async def test_other_methods_get_an_error_resp(stack: Stack) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ctx)) as http:
        async with http.get(f"{stack.gateway_cm}{p.PATH_BROKER}") as resp:
            assert resp.status == 405
            assert error_of(p.parse(await resp.read(), ENV))[0] == p.E_MALFORMED


async def test_tls_1_1_client_is_refused(stack: Stack) -> None:
    port = _port(stack.procs["cm-gateway"])
    # The probe can offer TLS 1.1 (shown against a server that accepts it), so the refusal is the CM's.
    probe = stack.pki.issue("session-tls-probe")
    await asyncio.to_thread(assert_probe_offers, probe.cert, probe.key, [ssl.TLSVersion.TLSv1_1])
    old = probe_context("ALL", ssl.TLSVersion.TLSv1_1)
    assert await asyncio.to_thread(handshake, "127.0.0.1", port, old) is None
    new = probe_context(None, ssl.TLSVersion.TLSv1_2)
    answer = await asyncio.to_thread(handshake, "127.0.0.1", port, new)
    assert answer is not None and answer[0] == "TLSv1.2"
    await assert_serving(stack.gateway_cm, stack.ctx)


# ---------------------------------------------------------------- upstream failures


async def test_agent_down(stack: Stack) -> None:
    async with Client(stack.gateway_cm, stack.ctx) as client:
        await client.login("carol", CAROL_PW)
        reply = await client.send(p.AllocateResource((await client.resources())["desk-dead"]))
        assert isinstance(reply, p.AllocateResourceResp)
        assert reply.result_id == p.ALLOC_FAILED
        assert reply.result_str == "Error occurred while communicating with agent"
        assert reply.target is None
    await assert_serving(stack.gateway_cm, stack.ctx)
    assert "Error occurred while communicating with agent" in stack.procs["cm-gateway"].logs()


async def test_broker_down(pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess]) -> None:
    certs = pki.issue("session-cm-lonely", ["localhost", "127.0.0.1"])
    cm = start_cm(tmp_path, cm_config(pki, certs, f"https://127.0.0.1:{free_port()}"), SECRET)
    processes.append(cm)
    ctx = tls.client_context(pki.ca)
    async with Client(cm_url(cm), ctx) as client:
        result_id, text = error_of(await client.hello())
        assert text == "Error occurred while communicating with broker"
        assert result_id == p.E_INTERNAL
        # The probe does not need the broker.
        assert isinstance(await client.hello(p.QUERY_PRODUCT), p.HelloResp)
    assert "Error occurred while communicating with broker" in cm.logs()


@pytest.fixture
async def slow_server(pki: pkimod.TestPKI) -> AsyncIterator[int]:
    """A TLS server on loopback that never answers in time (a hung broker or agent)."""
    certs = pki.issue("session-slow", ["localhost", "127.0.0.1"])

    async def hang(_request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls.server_context(certs.cert, certs.key))
    await site.start()
    yield port
    await runner.cleanup()


async def test_broker_too_slow(
    pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess], slow_server: int
) -> None:
    certs = pki.issue("session-cm-slow", ["localhost", "127.0.0.1"])
    config = cm_config(pki, certs, f"https://127.0.0.1:{slow_server}", BrokerTimeout=1)
    cm = await asyncio.to_thread(start_cm, tmp_path, config, SECRET)
    processes.append(cm)
    async with Client(cm_url(cm), tls.client_context(pki.ca)) as client:
        result_id, text = error_of(await client.hello())
        assert (result_id, text) == (p.E_INTERNAL, "Timeout occurred while communicating with broker")
        assert isinstance(await client.hello(p.QUERY_PRODUCT), p.HelloResp)  # still serving
    assert "Timeout occurred while communicating with broker" in cm.logs()


async def test_agent_too_slow(stack: Stack, slow_server: int) -> None:
    stack.admin(
        "PUT", "/desktops/desk-slow", {"address": "127.0.0.1", "agent_port": slow_server, "session_port": 9}
    )
    stack.admin("PUT", "/entitlements/user/CORP/carol/desktop/desk-slow")
    async with Client(stack.gateway_cm, stack.ctx) as client:
        await client.login("carol", CAROL_PW)
        # The stack's CMs wait AgentTimeout=5 s for an agent.
        reply = await client.send(p.AllocateResource((await client.resources())["desk-slow"]))
        assert isinstance(reply, p.AllocateResourceResp) and reply.result_id == p.ALLOC_FAILED
        assert reply.result_str == "Timeout occurred while communicating with agent"
    stack.admin("DELETE", "/entitlements/user/CORP/carol/desktop/desk-slow")
    stack.admin("DELETE", "/desktops/desk-slow")


async def test_broker_with_a_weak_key_is_refused(
    pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    weak = pki.issue("session-weak-broker", ["localhost", "127.0.0.1"], key_size=1024)
    reached: list[str] = []

    async def record(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.Response(text="should not be reached")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(weak.cert, weak.key)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        certs = pki.issue("session-cm-weak", ["localhost", "127.0.0.1"])
        config = cm_config(pki, certs, f"https://127.0.0.1:{port}", BrokerTlsVerify=False)
        cm = await asyncio.to_thread(start_cm, tmp_path, config, SECRET)
        processes.append(cm)
        async with Client(cm_url(cm), tls.client_context(pki.ca)) as client:
            assert error_of(await client.hello())[1] == "Error occurred while communicating with broker"
        assert reached == []  # refused after the handshake, before any request was sent
        assert "1024 bits is too weak" in cm.logs()
    finally:
        await runner.cleanup()


def test_cm_refuses_to_start_with_a_weak_key(pki: pkimod.TestPKI, tmp_path: Path) -> None:
    weak = pki.issue("session-weak-cm", ["localhost"], key_size=1024)
    cm = ServiceProcess(
        "cm",
        tmp_path,
        cm_config(pki, weak, "https://127.0.0.1:1"),
        config_name="config.properties",
    )
    cm.start()
    assert cm.proc is not None
    assert cm.proc.wait(20) == 2
    logs = cm.logs()
    assert "1024 bits is too weak" in logs and "Traceback" not in logs
    cm.stop()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"SecurityGatewayEnabled": True}, "ExternalPcoipIp is required"),
        ({"BrokerUrl": "http://broker"}, "BrokerUrl must be an https://"),
        ({"BrokerCaCert": "/nonexistent/ca.pem"}, "BrokerCaCert: cannot load CA bundle"),
        ({"MaxClients": "many"}, "MaxClients must be an integer"),
    ],
)
def test_cm_refuses_a_bad_configuration_with_one_clear_line(
    pki: pkimod.TestPKI, tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    certs = pki.issue("session-cm-badconf", ["localhost"])
    config = cm_config(pki, certs, "https://127.0.0.1:1", **overrides)
    path = tmp_path / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    done = subprocess.run(
        [sys.executable, "-m", "gatehouse.cm", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- limits


async def wait_in_flight(url: str, ctx: ssl.SSLContext, count: int) -> None:
    """Until the CM (``url``: its management listener) reports ``count`` establishments in flight."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        for _attempt in range(200):
            async with http.get(f"{url}/metrics") as resp:
                text = await resp.text()
            if f"gatehouse_cm_establishments_in_flight {float(count)}" in text:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"never {count} establishments in flight")


async def test_limits_answer_server_busy(
    stack: Stack, pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess], slow_server: int
) -> None:
    stack.admin(
        "PUT", "/desktops/desk-slow2", {"address": "127.0.0.1", "agent_port": slow_server, "session_port": 9}
    )
    for user in ("alice", "bob"):
        stack.admin("PUT", f"/entitlements/user/CORP/{user}/desktop/desk-slow2")
    certs = pki.issue("session-cm-limits", ["localhost", "127.0.0.1"])
    config = cm_config(
        pki, certs, stack.broker_url, MaxClients=2, MaxConcurrentEstablishments=1, AgentTimeout=3
    )
    cm = await asyncio.to_thread(start_cm, tmp_path, config, SECRET)
    processes.append(cm)
    url, ctx = cm_url(cm), tls.client_context(pki.ca)
    try:
        async with Client(url, ctx) as a, Client(url, ctx) as b, Client(url, ctx) as c:
            await a.login("alice", ALICE_PW)
            await b.login("bob", BOB_PW)
            # MaxClients=2: a third session is refused at once.
            status, reply = await c.raw(p.render(ENV, p.Hello()))
            assert status == 503 and error_of(reply)[0] == p.E_BUSY
            # A probe is still answered.
            assert isinstance(await c.hello(p.QUERY_PRODUCT), p.HelloResp)
            slow_a = (await a.resources())["desk-slow2"]
            slow_b = (await b.resources())["desk-slow2"]
            # MaxConcurrentEstablishments=1: while a's allocation hangs on the agent, b is refused.
            first = asyncio.create_task(a.send(p.AllocateResource(slow_a)))
            await wait_in_flight(cm_admin_url(cm), ctx, 1)
            status, reply = await b.raw(p.render(ENV, p.AllocateResource(slow_b)))
            assert status == 503 and error_of(reply)[0] == p.E_BUSY
            reply = await first
            assert isinstance(reply, p.AllocateResourceResp)
            assert reply.result_str == "Timeout occurred while communicating with agent"
            # The slot is free again.
            reply = await b.send(p.AllocateResource((await b.resources())["desk-b"]))
            assert isinstance(reply, p.AllocateResourceResp) and reply.result_id == p.ALLOC_OK
            # bye frees a client slot.
            assert isinstance(await a.send(p.Bye()), p.ByeResp)
            assert isinstance(await c.hello(), p.HelloResp)
    finally:
        for user in ("alice", "bob"):
            stack.admin("DELETE", f"/entitlements/user/CORP/{user}/desktop/desk-slow2")
        stack.admin("DELETE", "/desktops/desk-slow2")


# ---------------------------------------------------------------- logs


async def test_no_secret_in_any_log_and_session_lines_carry_the_session_id(stack: Stack) -> None:
    cm = CmConnection(stack.gateway_cm, stack.ctx)
    try:
        assert isinstance(await cm.send(p.Hello()), p.HelloResp)
        auth = await cm.send(p.Authenticate("alice", ALICE_PW, "CORP"))
        assert isinstance(auth, p.AuthenticateResp) and auth.result_id == p.AUTH_OK
        listing = await cm.send(p.GetResourceList())
        assert isinstance(listing, p.GetResourceListResp)
        desk = next(r for r in listing.resources if r.name == "desk-a")
        alloc = await cm.send(p.AllocateResource(desk.resource_id))
        assert isinstance(alloc, p.AllocateResourceResp) and alloc.target is not None
        target = alloc.target
        cookies = [c.value for c in cm.http.cookie_jar if c.key == "JSESSIONID"]
        assert cookies
        report = SessionReport(url=stack.gateway_cm)
        await session_channel(report, target, target.ip_address, stack.ctx, 5000, 2, None, 10.0, None)
        assert all(s.ok for s in report.steps), report.steps
        assert isinstance(await cm.send(p.Bye()), p.ByeResp)
    finally:
        await cm.close()
    await asyncio.sleep(0.5)  # let the services write their last lines
    sid = target.session_id
    secrets = {"password": ALICE_PW, "connect-tag": target.connect_tag, "admin token": ADMIN_TOKEN}
    secrets.update({f"cookie {i}": c for i, c in enumerate(cookies)})
    logs = stack.all_logs()
    for service, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in the {service} log"
    # Broker cookies must not leak either (the CM holds them per client).
    for service, text in logs.items():
        assert "JSESSIONID=" not in text, service
    # Every component logged this session, and every CM line naming this session's user or its
    # messages carries the session id.
    for service in ("cm-gateway", "broker", "desk-a", "sg"):
        lines = [json.loads(line) for line in logs[service].splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("session_id") == sid]
        assert mine, f"no {service} log line carries session id {sid}"
        assert all(len(line["session_id"]) == 36 for line in lines if line.get("session_id"))
    cm_lines = [json.loads(line) for line in logs["cm-gateway"].splitlines() if line.startswith("{")]
    about = [line for line in cm_lines if sid in json.dumps(line)]
    assert {line.get("request") for line in about} >= {
        "hello",
        "authenticate",
        "get-resource-list",
        "allocate-resource",
        "bye",
    }
    assert all(line.get("session_id") == sid for line in about)


# ---------------------------------------------------------------- shutdown and the command line


async def test_sigterm_finishes_requests_in_flight(
    stack: Stack, pki: pkimod.TestPKI, tmp_path: Path, processes: list[ServiceProcess], slow_server: int
) -> None:
    stack.admin(
        "PUT", "/desktops/desk-slow3", {"address": "127.0.0.1", "agent_port": slow_server, "session_port": 9}
    )
    stack.admin("PUT", "/entitlements/user/CORP/alice/desktop/desk-slow3")
    certs = pki.issue("session-cm-drain", ["localhost", "127.0.0.1"])
    cm = await asyncio.to_thread(
        start_cm, tmp_path, cm_config(pki, certs, stack.broker_url, AgentTimeout=2), SECRET
    )
    processes.append(cm)
    url, ctx = cm_url(cm), tls.client_context(pki.ca)
    try:
        async with Client(url, ctx) as client:
            await client.login("alice", ALICE_PW)
            pending = asyncio.create_task(
                client.send(p.AllocateResource((await client.resources())["desk-slow3"]))
            )
            await wait_in_flight(cm_admin_url(cm), ctx, 1)
            assert cm.proc is not None
            cm.proc.send_signal(signal.SIGTERM)
            reply = await pending
            assert isinstance(reply, p.AllocateResourceResp)
            assert reply.result_str == "Timeout occurred while communicating with agent"
        assert await asyncio.to_thread(cm.proc.wait, 20) == 0
        assert "stopping: no new connections" in cm.logs()
        # The client's broker session was closed on the way out.
        cm_lines = [json.loads(line) for line in cm.logs().splitlines() if line.startswith("{")]
        sid = next(line["session_id"] for line in cm_lines if line.get("request") == "hello")
        broker_lines = [json.loads(x) for x in stack.procs["broker"].logs().splitlines() if x.startswith("{")]
        assert any(line.get("session_id") == sid and "bye" in line["msg"] for line in broker_lines)
    finally:
        stack.admin("DELETE", "/entitlements/user/CORP/alice/desktop/desk-slow3")
        stack.admin("DELETE", "/desktops/desk-slow3")


async def test_client_command_line(stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    env["GH_TEST_PASSWORD"] = ALICE_PW
    cmd = [
        sys.executable,
        "-m",
        "gatehouse.client",
        "--url",
        stack.gateway_cm,
        "--user",
        "alice",
        "--domain",
        "CORP",
        "--password-env",
        "GH_TEST_PASSWORD",
        "--resource",
        "desk-a",
        "--ca-cert",
        str(stack.pki.ca),
        "--bytes",
        "4096",
        "--udp",
        "2",
    ]
    done = await asyncio.to_thread(
        subprocess.run, [*cmd, "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and len(report["session_id"]) == 36
    assert [s["name"] for s in report["steps"]][-3:] == ["tcp-echo", "udp-echo", "bye"]
    assert ALICE_PW not in done.stdout + done.stderr
    assert "connect_tag" not in done.stdout and "JSESSIONID" not in done.stdout
    # Human output and a failing run: wrong password → exit 1 with the step that failed.
    password_file = tmp_path / "pw"
    password_file.write_text("wrong-password\n")
    human = [c for c in cmd if c not in ("--password-env", "GH_TEST_PASSWORD")]
    failed = await asyncio.to_thread(
        subprocess.run,
        [*human, "--password-file", str(password_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1
    assert "FAIL authenticate" in failed.stdout and p.AUTH_FAILED in failed.stdout
    assert "wrong-password" not in failed.stdout
