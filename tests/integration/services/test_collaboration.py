"""Collaboration end to end: broker, agent, SG and CMs as real processes on loopback with real TLS.

The owner (alice) runs a session through the SG and keeps its channel open; it creates an
invitation, a collaborator (bob, who is not entitled to the desktop) logs in, redeems the code and
echoes TCP and UDP through the SG on the same agent session while the owner's channel keeps
echoing. Each refusal gets its own result on the wire: collaboration off, unknown (another CM's
code), used, expired, the owner's session ended (bye, or its desktop channel closed), too many
invitations; guessing codes ends the guesser's session while a real code still works.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pki as pkimod
import pytest
from services import (
    ServiceProcess,
    broker_admin,
    cm_config,
    start_agent,
    start_broker,
    start_cm,
    start_sg,
)

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import (
    CmConnection,
    Holding,
    OpenChannel,
    SessionReport,
    join_session,
    open_channel,
    run_session,
)
from gatehouse.grant import generate_secret

ADMIN_TOKEN = "admin-token-" + "c011ab0a7e5f6a7b8c9d"
ALICE_PW = "Alice-Collab-pw!1"
BOB_PW = "Bob-Collab-pw#2"
MALLORY_PW = "Mallory-Collab-pw$3"
SECRET = generate_secret()
COLLABORATOR_IP = "127.0.0.5"  # the collaborator's own address: its grant is bound to it
GUESSER_IP = "127.0.0.6"


@dataclass
class Stack:
    pki: pkimod.TestPKI
    sg_port: int
    cms: dict[str, str]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def metrics(self, cm: str) -> dict[str, float]:
        """The CM's invitation metrics (sample name with labels -> value)."""
        port = self.procs[cm].config["AdminPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("gatehouse_cm_invitation"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def stack(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("collab")
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["broker"] = start_broker(pki, root / "broker", "collab-broker", ADMIN_TOKEN)
        broker_url = f"https://127.0.0.1:{procs['broker'].config['ListenPort']}"
        procs["desk-a"] = start_agent(
            pki, root / "desk-a", "collab-desk-a", "desk-a", "127.0.0.2", broker_url
        )
        procs["sg"] = start_sg(pki, root / "sg", "collab-sg", SECRET)
        sg_port = int(str(procs["sg"].config["Port"]))
        certs = pki.issue("collab-cm", ["localhost", "127.0.0.1"])
        gateway = {
            "SecurityGatewayEnabled": True,
            "ExternalPcoipIp": "127.0.0.1",
            "SecurityGatewayPort": sg_port,
        }
        variants = {
            "cm": {"MaxInvitationsPerSession": 2, "MaxInvitationAttempts": 3},
            "cm-short": {"InvitationTtl": 1},
            "cm-off": {"EnableCollaboration": False},
        }
        for name, extra in variants.items():
            procs[name] = start_cm(root / name, cm_config(pki, certs, broker_url, **gateway, **extra), SECRET)
        cms = {name: f"https://127.0.0.1:{procs[name].config['ListenPort']}" for name in variants}
        st = Stack(pki, sg_port, cms, procs)
        ctx = st.ctx
        broker_admin(
            broker_url,
            ADMIN_TOKEN,
            ctx,
            "PUT",
            "/desktops/desk-a",
            {
                "address": "127.0.0.2",
                "hostname": "desk-a.test",
                "agent_port": procs["desk-a"].config["ControlPort"],
                "session_port": procs["desk-a"].config["SessionPort"],
            },
        )
        for user, pw in (("alice", ALICE_PW), ("bob", BOB_PW), ("mallory", MALLORY_PW)):
            broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", f"/users/CORP/{user}", {"password": pw})
        # Only the owner is entitled to the desktop: the invitation is the collaborator's way in.
        broker_admin(broker_url, ADMIN_TOKEN, ctx, "PUT", "/entitlements/user/CORP/alice/desktop/desk-a")
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def assert_ok(report: SessionReport, names: list[str]) -> None:
    failed = [s for s in report.steps if not s.ok]
    assert report.ok, f"failed steps: {failed}"
    assert [s.name for s in report.steps] == names


def step_result(report: SessionReport, name: str) -> str:
    found = report.step(name)
    assert found is not None, [s.name for s in report.steps]
    return found.result


async def as_owner(stack: Stack, cm: str, hold) -> SessionReport:
    """alice's session on desk-a through the SG, with ``hold`` run while its channel is open."""
    return await run_session(
        stack.cms[cm], "alice", ALICE_PW, domain="CORP", resource="desk-a", ssl_context=stack.ctx, hold=hold
    )


async def join(stack: Stack, cm: str, code: str, user: str = "bob", pw: str = BOB_PW, **kw) -> SessionReport:
    return await join_session(
        stack.cms[cm],
        user,
        pw,
        code,
        domain="CORP",
        ssl_context=stack.ctx,
        source_address=kw.pop("source_address", COLLABORATOR_IP),
        **kw,
    )


class Redeemer:
    """A logged-in collaborator's CM conversation, to redeem codes one by one."""

    def __init__(self, stack: Stack, cm: str, user: str, pw: str, source: str = COLLABORATOR_IP) -> None:
        self.stack, self.user, self.pw = stack, user, pw
        self.conn = CmConnection(stack.cms[cm], stack.ctx, source_address=source)

    async def __aenter__(self) -> Redeemer:
        assert isinstance(await self.conn.send(p.Hello()), p.HelloResp)
        reply = await self.conn.send(p.Authenticate(self.user, self.pw, "CORP"))
        assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK, reply
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def redeem(self, code: str) -> p.Message:
        return await self.conn.send(p.RedeemInvitation(code))


def refusal(reply: p.Message) -> str:
    assert isinstance(reply, p.RedeemInvitationResp), reply
    assert reply.target is None
    return reply.result_id


COLLABORATOR_STEPS = ["hello", "authenticate", "redeem-invitation", "connect", "tcp-echo", "udp-echo", "bye"]


# ---------------------------------------------------------------- the collaboration


async def test_a_collaborator_joins_the_owners_session_through_the_gateway(stack: Stack) -> None:
    before = stack.metrics("cm")
    joined: list[SessionReport] = []
    codes: list[str] = []

    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code is not None, owner.report.steps
        codes.append(code)

        async def while_both_connected(collaborator: OpenChannel) -> None:
            # The owner's channel echoes while the collaborator's is up, and the other way round.
            assert await owner.echo(100_000, 3, 10.0, "-during"), owner.report.steps[-2:]
            await collaborator.tcp_echo(50_000)

        joined.append(
            await join(stack, "cm", code, tcp_bytes=150_000, udp_datagrams=4, hold=while_both_connected)
        )
        assert await owner.echo(100_000, 3, 10.0, "-after")

    owner = await as_owner(stack, "cm", hold)
    assert_ok(
        owner,
        [
            "hello",
            "authenticate",
            "get-resource-list",
            "allocate-resource",
            "connect",
            "tcp-echo",
            "udp-echo",
            "invite",
            "tcp-echo-during",
            "udp-echo-during",
            "tcp-echo-after",
            "udp-echo-after",
            "bye",
        ],
    )
    (collaborator,) = joined
    assert_ok(collaborator, COLLABORATOR_STEPS)
    # Through the SG, as the collaborator's own session (its own id) on the owner's agent session.
    assert collaborator.target == owner.target == f"127.0.0.1:{stack.sg_port}"
    assert len(collaborator.session_id) == 36 and collaborator.session_id != owner.session_id
    await asyncio.sleep(0.5)  # let the services write their last lines
    sg = stack.procs["sg"].logs()
    assert f'"session_id": "{collaborator.session_id}"' in sg
    assert COLLABORATOR_IP in sg
    agent = [json.loads(line) for line in stack.procs["desk-a"].logs().splitlines() if line.startswith("{")]
    admitted = [line for line in agent if line.get("msg") == "collaborator admitted"]
    assert admitted and admitted[-1]["session_id"] == owner.session_id
    assert admitted[-1]["collaborator_session_id"] == collaborator.session_id
    cm = [json.loads(line) for line in stack.procs["cm"].logs().splitlines() if line.startswith("{")]
    redeemed = [line for line in cm if line.get("request") == "redeem-invitation"]
    assert redeemed[-1]["session_id"] == collaborator.session_id
    assert redeemed[-1]["owner_session_id"] == owner.session_id
    after = stack.metrics("cm")
    for name in ("gatehouse_cm_invitations_created_total", "gatehouse_cm_invitations_redeemed_total"):
        assert after[name] == before[name] + 1, name
    # The code is a bearer secret: no service logs it.
    for name, proc in stack.procs.items():
        assert codes[0] not in proc.logs(), name


async def test_a_code_is_single_use_and_invitations_are_capped(stack: Stack) -> None:
    async def hold(owner: Holding) -> None:
        first, second = await owner.invite(), await owner.invite()
        assert first and second and first != second
        # MaxInvitationsPerSession=2: a third waits until one is used or expires.
        assert await owner.invite() is None
        assert owner.report.steps[-1].result == p.INVITE_LIMIT
        assert_ok(await join(stack, "cm", first), COLLABORATOR_STEPS)
        again = await join(stack, "cm", first, "mallory", MALLORY_PW)
        assert step_result(again, "redeem-invitation") == p.JOIN_USED and not again.ok
        assert step_result(again, "bye") == "OK"  # a refusal leaves the session to its client
        assert await owner.invite()  # the used one no longer counts
        assert await owner.echo(20_000, 2, 10.0, "-after")

    owner = await as_owner(stack, "cm", hold)
    assert step_result(owner, "tcp-echo-after") == "OK"
    assert stack.metrics("cm")['gatehouse_cm_invitations_refused_total{reason="used"}'] >= 1


async def test_an_expired_code_is_refused(stack: Stack) -> None:
    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code
        await asyncio.sleep(1.5)  # InvitationTtl=1 on cm-short
        late = await join(stack, "cm-short", code)
        assert step_result(late, "redeem-invitation") == p.JOIN_EXPIRED

    await as_owner(stack, "cm-short", hold)
    assert stack.metrics("cm-short")['gatehouse_cm_invitations_refused_total{reason="expired"}'] == 1


async def test_collaboration_off_refuses_both_sides(stack: Stack) -> None:
    async def hold(owner: Holding) -> None:
        assert await owner.invite() is None
        assert owner.report.steps[-1].result == p.COLLAB_DISABLED
        async with Redeemer(stack, "cm-off", "bob", BOB_PW) as bob:
            reply = await bob.redeem("A" * 32)
            assert refusal(reply) == p.COLLAB_DISABLED
            assert isinstance(reply, p.RedeemInvitationResp) and "EnableCollaboration" in reply.result_str

    await as_owner(stack, "cm-off", hold)
    assert stack.metrics("cm-off")['gatehouse_cm_invitations_refused_total{reason="disabled"}'] == 2


async def test_another_cms_code_is_unknown_here(stack: Stack) -> None:
    """Invitations live on the CM that made them: a code from cm is foreign to cm-short."""

    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code
        foreign = await join(stack, "cm-short", code)
        assert step_result(foreign, "redeem-invitation") == p.JOIN_UNKNOWN
        assert_ok(await join(stack, "cm", code), COLLABORATOR_STEPS)  # still good where it was made

    await as_owner(stack, "cm", hold)


async def test_a_code_dies_with_the_owners_session(stack: Stack) -> None:
    codes: list[str] = []

    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code
        codes.append(code)

    await as_owner(stack, "cm", hold)  # ends with bye
    late = await join(stack, "cm", codes[0])
    assert step_result(late, "redeem-invitation") == p.JOIN_ENDED


async def test_a_code_dies_with_the_owners_desktop_channel(stack: Stack) -> None:
    """The owner's CM session is still up but its channel to the desktop is closed: the agent
    refuses the join and the collaborator is told the session ended."""
    conn = CmConnection(stack.cms["cm"], stack.ctx)
    try:
        assert isinstance(await conn.send(p.Hello()), p.HelloResp)
        assert isinstance(await conn.send(p.Authenticate("alice", ALICE_PW, "CORP")), p.AuthenticateResp)
        listing = await conn.send(p.GetResourceList())
        assert isinstance(listing, p.GetResourceListResp)
        alloc = await conn.send(p.AllocateResource(listing.resources[0].resource_id))
        assert isinstance(alloc, p.AllocateResourceResp) and alloc.target is not None
        channel = await open_channel(alloc.target, alloc.target.ip_address, stack.ctx, None, 10.0)
        await channel.tcp_echo(1000)
        invited = await conn.send(p.CreateInvitation())
        assert isinstance(invited, p.CreateInvitationResp) and invited.result_id == p.INVITE_OK
        assert 0 < invited.expires_in <= 300 and invited.hostname == "localhost"
        await channel.close()
        await asyncio.sleep(0.3)
        late = await join(stack, "cm", invited.invitation_code)
        assert step_result(late, "redeem-invitation") == p.JOIN_ENDED
        assert "ended" in (late.step("redeem-invitation") or late.steps[-1]).detail
    finally:
        await conn.close()


async def test_the_collaborator_must_log_in_and_the_owner_alone_invites(stack: Stack) -> None:
    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code
        anonymous = CmConnection(stack.cms["cm"], stack.ctx)
        try:
            assert isinstance(await anonymous.send(p.Hello()), p.HelloResp)
            reply = await anonymous.send(p.RedeemInvitation(code))
            assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH
        finally:
            await anonymous.close()
        wrong = await join(stack, "cm", code, "bob", "not-bobs-password")
        assert step_result(wrong, "authenticate") == p.AUTH_FAILED
        assert wrong.step("redeem-invitation") is None

        # The code was not spent by the refused attempts; the collaborator cannot invite others.
        conn = CmConnection(stack.cms["cm"], stack.ctx, source_address=COLLABORATOR_IP)
        try:
            assert isinstance(await conn.send(p.Hello()), p.HelloResp)
            assert isinstance(await conn.send(p.Authenticate("bob", BOB_PW, "CORP")), p.AuthenticateResp)
            joined = await conn.send(p.RedeemInvitation(code))
            assert isinstance(joined, p.RedeemInvitationResp) and joined.result_id == p.JOIN_OK
            reply = await conn.send(p.CreateInvitation())
            assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_OUT_OF_STATE
        finally:
            await conn.close()

    await as_owner(stack, "cm", hold)


async def test_guessing_codes_ends_the_guessers_session_while_a_real_code_works(stack: Stack) -> None:
    before = stack.metrics("cm")

    async def hold(owner: Holding) -> None:
        code = await owner.invite()
        assert code
        async with Redeemer(stack, "cm", "mallory", MALLORY_PW, GUESSER_IP) as mallory:
            # MaxInvitationAttempts=3: the third unknown code ends the session.
            for guess in ("A" * 32, "B" * 32, "C" * 32):
                assert refusal(await mallory.redeem(guess)) == p.JOIN_UNKNOWN
            reply = await mallory.redeem(code)
            assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH
        assert_ok(await join(stack, "cm", code), COLLABORATOR_STEPS)

    await as_owner(stack, "cm", hold)
    after = stack.metrics("cm")
    assert after["gatehouse_cm_invitation_attempts_exceeded_total"] == (
        before["gatehouse_cm_invitation_attempts_exceeded_total"] + 1
    )
    unknown = 'gatehouse_cm_invitations_refused_total{reason="unknown"}'
    assert after[unknown] == before[unknown] + 3


async def test_client_command_line_invites_and_joins(stack: Stack) -> None:
    """``--invite`` prints the code once the owner's channel is up and holds the session;
    ``--invitation-code-env`` joins with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    env.update(GH_OWNER_PW=ALICE_PW, GH_COLLAB_PW=BOB_PW)
    common = ["--domain", "CORP", "--ca-cert", str(stack.pki.ca), "--bytes", "4096", "--udp", "2", "--json"]
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatehouse.client",
        "--url",
        stack.cms["cm"],
        "--user",
        "alice",
        "--password-env",
        "GH_OWNER_PW",
        "--resource",
        "desk-a",
        "--invite",
        "--hold",
        "8",
        *common,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert owner.stderr is not None and owner.stdout is not None
    try:
        line = (await asyncio.wait_for(owner.stderr.readline(), 60)).decode()
        assert line.startswith("invitation-code: "), line
        code = line.split(": ", 1)[1].strip()
        env["GH_CODE"] = code
        collaborator = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "gatehouse.client",
                "--url",
                stack.cms["cm"],
                "--user",
                "bob",
                "--password-env",
                "GH_COLLAB_PW",
                "--invitation-code-env",
                "GH_CODE",
                "--source-address",
                COLLABORATOR_IP,
                *common,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert collaborator.returncode == 0, collaborator.stdout + collaborator.stderr
        report = json.loads(collaborator.stdout)
        assert report["ok"] is True
        assert [s["name"] for s in report["steps"]] == COLLABORATOR_STEPS
        assert code not in collaborator.stdout + collaborator.stderr
        # The owner's session ends by itself after --hold, with bye.
        out, _err = await asyncio.wait_for(owner.communicate(), 60)
    finally:
        if owner.returncode is None:
            owner.terminate()
            await owner.wait()
    assert owner.returncode == 0, out
    report = json.loads(out)
    assert report["ok"] is True
    assert [s["name"] for s in report["steps"]][-4:] == ["tcp-echo", "udp-echo", "invite", "bye"]
    assert code not in out.decode()  # the report never holds the code, only the printed line does
