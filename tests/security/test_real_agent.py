"""A desktop with a real PCoIP agent: the strict real-format agent fixture behind the hardened stack.

The fixture plays a real agent as an operator registers one: its own certificate (not from the
deployment CA), the real launch-session format held to ``tests/fixtures/pcoip-agent`` (anything
else gets the real refusal), and a record of every request body it received. The tests show that
the CM completes an allocation with it, and that the user's password reaches only an agent whose
certificate the CM verified (a pinned SHA-256 or the desktop's own CA), never an unverified one,
and appears in no log. A hostile answer is refused before it becomes a grant.
"""

from __future__ import annotations

import hashlib
import socket
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pki as pkimod
import pytest
import slowhttp
import stack as hardened
from agent_format import REQUEST, shape
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import _mac_address
from gatehouse.config import parse_kv

ADDRESS = "127.0.0.5"
DESKTOP = "desk-real"


@pytest.fixture(scope="module")
def st(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    s = hardened.build(pki, Path(tmp_path_factory.mktemp("real-agent")))
    yield s
    s.stop()


@dataclass
class RealAgent:
    """What the fixture received, and how it answers (``tag`` is the session-tag it hands out)."""

    port: int
    cert_sha256: str
    own_ca_pem: str
    received: list[bytes] = field(default_factory=list)
    tag: str = "UGgT2fB5l0w2dC4P2q9Lr8s3X0nYc1tZkE7mQ4aVb6M="

    def launches(self) -> list[p.LaunchSession]:
        out = []
        for body in self.received:
            message = p.parse(body, "pcoip-agent")
            assert isinstance(message, p.LaunchSession)
            out.append(message)
        return out


@pytest.fixture
async def real_agent(tmp_path: Path) -> AsyncIterator[RealAgent]:
    own = pkimod.TestPKI(tmp_path / "desktop-ca")  # the desktop's own CA, unknown to the deployment
    leaf = own.issue("desk-real", [ADDRESS])
    der = x509.load_pem_x509_certificate(leaf.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    agent = RealAgent(0, hashlib.sha256(der).hexdigest(), own.ca.read_text())

    async def launch(request: web.Request) -> web.Response:
        body = await request.read()
        agent.received.append(body)
        if shape(body) != shape(REQUEST):
            answer = p.LaunchSessionResp(p.E_MALFORMED, "the request is not a launch-session")
        else:
            launch = ET.fromstring(body)[0]
            info = p.SessionInfo(ADDRESS, 4172, str(uuid.uuid4()), agent.tag, DESKTOP)
            assert launch.findtext("session-log-id")
            answer = p.LaunchSessionResp(p.LAUNCH_OK, "", info)
        return web.Response(body=p.render("pcoip-agent", answer), content_type="application/xml")

    app = web.Application()
    app.router.add_post(p.PATH_AGENT, launch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, ADDRESS, 0, ssl_context=tls.server_context(leaf.cert, leaf.key, "agent"))
    await site.start()
    agent.port = runner.addresses[0][1]
    try:
        yield agent
    finally:
        await runner.cleanup()


def register(st: hardened.Stack, agent: RealAgent, **settings: str) -> None:
    st.admin(
        "PUT",
        f"/desktops/{DESKTOP}",
        {
            "address": ADDRESS,
            "hostname": "desk-real.corp.example",
            "agent_port": agent.port,
            "agent_ca_pem": "",
            "agent_cert_sha256": "",
            "logon": p.LOGON_WINDOWS_PASSWORD,
            **settings,
        },
    )
    st.admin("PUT", f"/entitlements/user/CORP/{hardened.OTHER}/desktop/{DESKTOP}")


async def allocate(st: hardened.Stack) -> str:
    """bob's allocation of the real desktop: "" when it succeeded, else the client's error text."""
    report = await st.session(hardened.OTHER, hardened.OTHER_PW, resource=DESKTOP, connect=False)
    step = report.step("allocate-resource")
    assert step is not None
    return "" if step.ok else step.detail


async def cm_failures(st: hardened.Stack, kind: str) -> float:
    admin = parse_kv(st.procs["cm"].config_path.read_text())["AdminPort"]
    values = await slowhttp.scrape(f"http://127.0.0.1:{admin}")
    return values[f'gatehouse_cm_upstream_failures_total{{kind="{kind}",upstream="agent"}}']


async def test_the_password_reaches_only_a_verified_real_agent(
    st: hardened.Stack, real_agent: RealAgent
) -> None:
    agent_error = "Error occurred while communicating with agent"
    # 1. Registered without a pin or CA: the CM checks the agent against the deployment CA, the
    #    handshake fails, and no request (so no password) is sent.
    register(st, real_agent)
    assert await allocate(st) == agent_error
    # 2. A pin of another certificate: refused right after the handshake, before the request.
    register(st, real_agent, agent_cert_sha256="ab" * 32)
    assert await allocate(st) == agent_error
    assert real_agent.received == []

    # 3. The right pin (as openssl prints it, with colons): an allocation with the real format.
    pin = ":".join(real_agent.cert_sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    register(st, real_agent, agent_cert_sha256=pin)
    assert await allocate(st) == ""
    (sent,) = real_agent.launches()
    assert shape(real_agent.received[0]) == shape(REQUEST)
    assert (sent.username, sent.domain, sent.password) == (hardened.OTHER, "CORP", hardened.OTHER_PW)
    assert (sent.ip_address, sent.hostname) == (ADDRESS, "desk-real.corp.example")
    assert sent.client_ip == "127.0.0.1" and len(sent.session_log_id) == 36
    # What the client reported in hello: its host name and (when it has a real one) its MAC.
    assert (sent.client_name, sent.client_mac) == (socket.gethostname()[:64], _mac_address())
    assert sent.session_log_id in st.logs()["cm"]  # one id follows the session

    # 4. The desktop's own CA instead of a pin (chain and host name verified).
    register(st, real_agent, agent_ca_pem=real_agent.own_ca_pem)
    assert await allocate(st) == ""
    assert real_agent.launches()[-1].password == hardened.OTHER_PW

    # 5. A desktop that needs no credentials (pre-logged-on, kiosk) is sent none.
    register(st, real_agent, agent_cert_sha256=pin, logon=p.LOGON_NONE)
    assert await allocate(st) == ""
    last = real_agent.launches()[-1]
    assert last.password == "" and last.username == hardened.OTHER

    assert len(real_agent.received) == 3
    st.assert_no_secrets_logged()
    hardened.assert_session_ok(await st.session())


@pytest.mark.parametrize(
    "tag", ["tag with spaces", "x" * 600, "tag\r\nCONNECT someone-else"], ids=["spaces", "long", "crlf"]
)
async def test_a_hostile_answer_is_refused_and_counted(
    st: hardened.Stack, real_agent: RealAgent, tag: str
) -> None:
    real_agent.tag = tag
    register(st, real_agent, agent_cert_sha256=real_agent.cert_sha256)
    before = await cm_failures(st, "invalid")
    assert await allocate(st) == "Error occurred while communicating with agent"
    assert await cm_failures(st, "invalid") == before + 1
    assert len(real_agent.received) == 1
    hardened.assert_session_ok(await st.session())
