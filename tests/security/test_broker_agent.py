"""Attacks on the broker and the agents, against real processes (tests/security/stack.py).

Each test runs the attack, shows it is stopped, shows a legitimate session (TCP and UDP echo)
completes during and after it, and that nothing secret reached a log:

- password guessing through the CM from attacker addresses: progressive delay, then lockout per
  (account, source) and for the account from unknown sources; alice still logs in from her address;
- the delay growing per (account, source), and password spraying from one address locking that source;
- a login flood against the bounded password-hashing pool: "busy" answers, the broker stays responsive;
- one desktop's certificate reporting load for another desktop, or for addresses that are no desktop;
- launch-session at an agent and the broker protocol at the broker without a CM certificate (and
  an agent whose verification is switched off says so).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pki as pkimod
import pytest
import stack as hardened
from services import start_agent

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import CmConnection, SessionReport

ATTACKERS = ("127.0.0.50", "127.0.0.51", "127.0.0.52")
# Small numbers so the test sees every stage within seconds; the defaults are in docs/security.md.
THROTTLE = {
    "LoginDelayAfterFailures": 2,
    "LoginMaxDelay": 0.5,
    "LoginLockoutAfterFailures": 3,
    # Reached exactly when all three attacker sources are locked: 3 x 3.
    "LoginAccountLockoutAfterFailures": 9,
    "LoginSourceLockoutAfterFailures": 40,
    "LoginLockoutSeconds": 300,
    "LoginFailureWindow": 300,
}


# ---------------------------------------------------------------- helpers


def _config(st: hardened.Stack, name: str) -> dict[str, str]:
    proc = st.procs[name]
    values = {}
    for line in proc.config_path.read_text().splitlines():
        key, _sep, value = line.partition("=")
        values[key] = value
    return values


def metrics(st: hardened.Stack, name: str) -> dict[str, float]:
    """A service's metrics: from its management listener (AdminPort), else its public port."""
    cfg = _config(st, name)
    urls = [f"http://{cfg.get('AdminAddress', '127.0.0.1')}:{cfg['AdminPort']}/metrics"]
    if name == "broker":
        urls.append(f"{st.broker_url}/metrics")
    else:
        urls.append(f"https://{cfg['ListenAddress']}:{cfg['ControlPort']}/metrics")
    last: Exception | None = None
    for url in urls:
        try:
            with urllib.request.urlopen(url, context=tls.client_context(st.pki.ca), timeout=5) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            continue
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _sep, value = line.rpartition(" ")
                values[key] = float(value)
        if any(k.startswith("gatehouse_") for k in values):
            return values
    raise AssertionError(f"no metrics for {name}: {last}")


def peer_ctx(st: hardened.Stack, identity: pkimod.CertFiles | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(st.pki.ca))
    ctx.check_hostname = False
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


def post(url: str, body: bytes, ctx: ssl.SSLContext, content_type: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def guess(st: hardened.Stack, source: str, user: str, password: str) -> tuple[str, str]:
    """One login attempt through the CM from ``source``: (result-id, result-str)."""
    conn = CmConnection(st.cm_url, st.client_ctx(), source_address=source, timeout=15)
    try:
        hello = await conn.send(p.Hello())
        if isinstance(hello, p.ErrorResp):
            return hello.result_id, hello.result_str
        reply = await conn.send(p.Authenticate(user, password, "CORP"))
        assert isinstance(reply, p.AuthenticateResp | p.ErrorResp), reply
        await conn.send(p.Bye())
        return reply.result_id, reply.result_str
    finally:
        await conn.close()


async def session_retrying_busy(st: hardened.Stack, within: float) -> SessionReport:
    """A legitimate session that, like a real client, tries again after a 'busy' answer."""
    deadline = time.monotonic() + within
    while True:
        report = await st.session()
        busy = any(s.result == p.E_BUSY for s in report.steps)
        if report.ok or not busy or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.2)


@pytest.fixture
def make_stack(pki: pkimod.TestPKI, tmp_path: Path) -> Iterator:
    stacks: list[hardened.Stack] = []

    def build(**broker: object) -> hardened.Stack:
        st = hardened.build(pki, tmp_path / f"stack{len(stacks)}", broker=broker)
        stacks.append(st)
        return st

    yield build
    for st in stacks:
        st.stop()


# ---------------------------------------------------------------- 1. password guessing


async def test_password_guessing_is_throttled_and_the_user_still_logs_in(make_stack) -> None:
    st = make_stack(**THROTTLE)
    # alice has logged in from her address before: it is a known source of her account.
    hardened.assert_session_ok(await st.session())
    loop = asyncio.get_running_loop()
    guesses: list[str] = []

    done = asyncio.Event()

    async def attacker(source: str) -> list[tuple[str, str]]:
        answers = []
        until = loop.time() + 15.0
        n = after_done = 0
        while loop.time() < until and n < 60 and after_done < 3:
            password = f"Guess-{source}-{n}!"
            guesses.append(password)
            answers.append(await guess(st, source, hardened.USER, password))
            n += 1
            after_done += done.is_set()
            await asyncio.sleep(0.1)
        return answers

    async def watcher() -> None:
        # The attack goes on until the account lockout has started (bounded by the attackers' clock).
        key = 'gatehouse_broker_login_lockouts_total{scope="account"}'
        for _poll in range(100):
            if (await asyncio.to_thread(metrics, st, "broker")).get(key, 0) >= 1:
                break
            await asyncio.sleep(0.2)
        done.set()

    async def legit_during() -> SessionReport:
        await asyncio.sleep(1.5)
        return await st.session()

    before = metrics(st, "broker")
    *attacks, _watched, during = await asyncio.gather(
        *(attacker(a) for a in ATTACKERS), watcher(), legit_during()
    )
    hardened.assert_session_ok(during)

    # Every guess got the wrong-password answer: throttled or checked, nothing tells them apart.
    answers = {a for answers in attacks for a in answers}
    assert len(answers) == 1 and next(iter(answers))[0] == p.AUTH_FAILED, answers
    after = metrics(st, "broker")

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    # Each source got exactly LoginLockoutAfterFailures checked guesses, the rest cost no scrypt.
    assert delta('gatehouse_broker_login_lockouts_total{scope="account_source"}') == 3
    assert delta('gatehouse_broker_authentications_total{result="failure"}') == 9
    assert delta('gatehouse_broker_login_throttled_total{reason="delay"}') >= 1
    assert delta('gatehouse_broker_login_throttled_total{reason="lockout"}') >= 3
    # 9 failures from all sources reached LoginAccountLockoutAfterFailures: unknown sources are out.
    assert delta('gatehouse_broker_login_lockouts_total{scope="account"}') == 1
    assert sum(len(a) for a in attacks) > 9

    # The right password from an attacker's address, or from a new address, is refused now...
    assert (await guess(st, ATTACKERS[0], hardened.USER, hardened.USER_PW))[0] == p.AUTH_FAILED
    assert (await guess(st, "127.0.0.60", hardened.USER, hardened.USER_PW))[0] == p.AUTH_FAILED
    # ...while alice, from her address, logs in and runs her session; bob is untouched.
    hardened.assert_session_ok(await st.session())
    hardened.assert_session_ok(await st.session(hardened.OTHER, hardened.OTHER_PW, resource="desk-b"))

    # Unknown users are throttled the same way, with the same answer.
    unknown = [await guess(st, "127.0.0.53", "no-such-user", f"Nope-{i}!") for i in range(8)]
    assert set(unknown) == answers
    final = metrics(st, "broker")
    assert (
        final['gatehouse_broker_login_throttled_total{reason="delay"}']
        > after['gatehouse_broker_login_throttled_total{reason="delay"}']
        or final['gatehouse_broker_login_throttled_total{reason="lockout"}']
        > after['gatehouse_broker_login_throttled_total{reason="lockout"}']
    )

    # Logged with user name and source, never the password.
    st.stop()
    broker_log = st.logs()["broker"]
    lockouts = [json.loads(line) for line in broker_log.splitlines() if "login lockout started" in line]
    assert {(e["user"], e["client_ip"], e["scope"]) for e in lockouts} >= {
        (hardened.USER, a, "account_source") for a in ATTACKERS
    }
    assert any(e["scope"] == "account" for e in lockouts)
    assert "authentication throttled" in broker_log
    st.assert_no_secrets_logged(*guesses)


# ---------------------------------------------------------------- 1a. growing delay, spraying

SPRAY = {
    "LoginDelayAfterFailures": 2,
    "LoginMaxDelay": 8,
    "LoginLockoutAfterFailures": 4,
    "LoginSourceLockoutAfterFailures": 6,
    "LoginAccountLockoutAfterFailures": 50,
    "LoginLockoutSeconds": 300,
    "LoginFailureWindow": 300,
}
FAILED = 'gatehouse_broker_authentications_total{result="failure"}'
DELAYED = 'gatehouse_broker_login_throttled_total{reason="delay"}'


async def test_delays_grow_per_pair_and_password_spraying_locks_the_source(make_stack) -> None:
    st = make_stack(**SPRAY)
    hardened.assert_session_ok(await st.session())
    guesses: list[str] = []

    async def attempt(source: str, user: str, wait: float = 0.0) -> tuple[float, float]:
        """One wrong password after ``wait`` s: (checked failures, delay refusals) it added."""
        await asyncio.sleep(wait)
        before = await asyncio.to_thread(metrics, st, "broker")
        guesses.append(f"Guess-{source}-{len(guesses)}!")
        assert (await guess(st, source, user, guesses[-1]))[0] == p.AUTH_FAILED
        after = await asyncio.to_thread(metrics, st, "broker")
        return after[FAILED] - before[FAILED], after[DELAYED] - before[DELAYED]

    # One (account, source): 2 failures start a 1 s delay, the 3rd a 2 s delay, the 4th the lockout.
    # An attempt inside the delay is not checked; the next one after it is.
    guesser = "127.0.0.91"
    steps = [await attempt(guesser, hardened.OTHER) for _n in range(2)]
    steps.append(await attempt(guesser, hardened.OTHER))  # at once: inside the 1 s delay
    steps.append(await attempt(guesser, hardened.OTHER, 1.3))  # the 1 s delay has passed
    steps.append(await attempt(guesser, hardened.OTHER, 1.3))  # inside the 2 s delay now
    steps.append(await attempt(guesser, hardened.OTHER, 1.1))  # 2.4 s after the 3rd failure
    assert steps == [(1, 0), (1, 0), (0, 1), (1, 0), (0, 1), (1, 0)], steps
    assert (await guess(st, guesser, hardened.OTHER, hardened.OTHER_PW))[0] == p.AUTH_FAILED  # locked

    # Spraying: one wrong password each for many accounts from one client address. The source is
    # locked after LoginSourceLockoutAfterFailures, whichever accounts; others are not affected.
    sprayer = "127.0.0.90"
    before = metrics(st, "broker")

    async def spray() -> None:
        for i in range(10):
            guesses.append(f"Spray-{i}!")
            user = (hardened.USER, hardened.OTHER)[i] if i < 2 else f"user{i}"
            assert (await guess(st, sprayer, user, guesses[-1]))[0] == p.AUTH_FAILED

    _sprayed, during = await asyncio.gather(spray(), st.session())
    hardened.assert_session_ok(during)
    after = metrics(st, "broker")
    assert after[FAILED] - before[FAILED] == 6
    assert after['gatehouse_broker_login_throttled_total{reason="source_lockout"}'] == 4
    assert after['gatehouse_broker_login_lockouts_total{scope="source"}'] == 1
    # The right password from the sprayer's address is refused; alice and bob log in from theirs.
    assert (await guess(st, sprayer, hardened.USER, hardened.USER_PW))[0] == p.AUTH_FAILED
    hardened.assert_session_ok(await st.session())
    hardened.assert_session_ok(await st.session(hardened.OTHER, hardened.OTHER_PW, resource="desk-b"))
    st.stop()
    lockouts = [
        json.loads(line) for line in st.logs()["broker"].splitlines() if "login lockout started" in line
    ]
    assert {(e["client_ip"], e["scope"]) for e in lockouts} == {
        (guesser, "account_source"),
        (sprayer, "source"),
    }
    st.assert_no_secrets_logged(*guesses)


# ---------------------------------------------------------------- 1b. hashing flood


async def test_a_login_flood_gets_busy_answers_and_the_broker_stays_responsive(make_stack) -> None:
    st = make_stack(PasswordHashWorkers=1, PasswordHashQueue=1)
    hardened.assert_session_ok(await st.session())
    loop = asyncio.get_running_loop()
    results: list[str] = []

    async def flooder(source: str, lane: int) -> None:
        until = loop.time() + 4.0
        n = 0
        while loop.time() < until and n < 60:
            # A new user name each time: no per-pair throttle, every attempt wants a scrypt.
            results.append((await guess(st, source, f"flood-{source}-{lane}-{n}", "x"))[0])
            n += 1

    async def health_latency() -> float:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await asyncio.to_thread(
            urllib.request.urlopen, f"{st.broker_url}/health", None, 5, context=tls.client_context(st.pki.ca)
        )
        return time.monotonic() - started

    async def legit_during() -> SessionReport:
        await asyncio.sleep(1.0)
        return await session_retrying_busy(st, within=15.0)

    sources = [f"127.0.0.{70 + i}" for i in range(4)]
    *_floods, latency, during = await asyncio.gather(
        *(flooder(s, lane) for s in sources for lane in range(3)), health_latency(), legit_during()
    )
    hardened.assert_session_ok(during)
    assert p.E_BUSY in results, set(results)
    assert set(results) <= {p.E_BUSY, p.AUTH_FAILED}
    assert latency < 1.0  # hashing runs off the event loop and its queue is short
    m = metrics(st, "broker")
    assert m["gatehouse_broker_password_hash_busy_total"] >= 1
    assert m['gatehouse_broker_authentications_total{result="busy"}'] >= 1
    hardened.assert_session_ok(await st.session())
    st.stop()
    st.assert_no_secrets_logged()


# ---------------------------------------------------------------- 2 and 5. load reports


async def test_a_desktop_cannot_report_for_another_or_fill_the_report_table(make_stack) -> None:
    st = make_stack()
    hardened.assert_session_ok(await st.session(resource="desk-b"))
    report_url = f"{st.broker_url}/api/v1/agents/report"
    desk_a = peer_ctx(st, st.identities["desk-a"])
    b_address, b_control, b_session = st.agents["desk-b"]
    steal = {
        "hostname": "desk-b.test",
        "address": b_address,
        "agent_port": b_control,
        "session_port": b_session,
        "active_sessions": 0,
        "capacity": 0,
    }
    as_json = "application/json"

    def attack() -> list[int]:
        statuses = [post(report_url, json.dumps(steal).encode(), desk_a, as_json)[0]]
        # desk-a's own address on desk-b's port, and a flood of addresses that are no desktop.
        wrong_port = {**steal, "address": st.agents["desk-a"][0], "hostname": "desk-a.test"}
        statuses.append(post(report_url, json.dumps(wrong_port).encode(), desk_a, as_json)[0])
        for i in range(150):
            junk = {**steal, "address": f"10.{i // 250}.{i % 250}.1", "hostname": f"ghost{i}.test"}
            statuses.append(post(report_url, json.dumps(junk).encode(), desk_a, as_json)[0])
        # Without a certificate, with a CM's, with the admin token: no report either.
        for ctx in (peer_ctx(st, None), peer_ctx(st, st.identities["cm"])):
            statuses.append(post(report_url, json.dumps(steal).encode(), ctx, as_json)[0])
        req = urllib.request.Request(
            report_url,
            data=json.dumps(steal).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {hardened.ADMIN_TOKEN}", "Content-Type": as_json},
        )
        try:
            urllib.request.urlopen(req, context=peer_ctx(st, None), timeout=10)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
        return statuses

    statuses, during = await asyncio.gather(asyncio.to_thread(attack), st.session(resource="desk-b"))
    assert set(statuses) == {403} and len(statuses) == 155
    hardened.assert_session_ok(during)

    # The real agents report every ReportInterval (2 s); a report sent before the stack registered
    # its desktop was refused, so wait for one accepted report of each (bounded), then count rows.
    deadline = time.monotonic() + 30
    agents = st.admin("GET", "/agents")["agents"]
    while {a["desktop"] for a in agents} != {"desk-a", "desk-b"} and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        agents = st.admin("GET", "/agents")["agents"]
    assert sorted(a["desktop"] for a in agents) == ["desk-a", "desk-b"]  # one row per desktop, no more
    assert all(a["capacity"] == 50 for a in agents)
    m = metrics(st, "broker")
    assert m['gatehouse_broker_agent_reports_refused_total{reason="address_not_in_certificate"}'] >= 151
    assert m['gatehouse_broker_agent_reports_refused_total{reason="unknown_desktop"}'] >= 1
    assert m['gatehouse_broker_agent_reports_refused_total{reason="no_agent_certificate"}'] >= 3
    assert m["gatehouse_broker_agent_reports_total"] >= 2  # the real agents keep reporting
    hardened.assert_session_ok(await st.session(resource="desk-b"))
    st.stop()
    st.assert_no_secrets_logged()


# ---------------------------------------------------------------- 3. who may launch and broker


async def test_only_a_cm_certificate_launches_sessions_or_speaks_to_the_broker(
    make_stack, tmp_path: Path
) -> None:
    st = make_stack()
    hardened.assert_session_ok(await st.session())
    address, control, _session_port = st.agents["desk-a"]
    launch_url = f"https://{address}:{control}{p.PATH_AGENT}"
    launch = p.render(
        "pcoip-agent", p.LaunchSession("0b3c1d9e-8f1a-4d4e-9a51-2b6a3f0c7d11", "127.0.0.9", "x", "CORP")
    )
    hello = p.render("pcoip-broker", p.Hello(pcm_info=p.PcmInfo("s-1", "198.51.100.1")))
    rogue = pkimod.TestPKI(tmp_path / "rogue").issue("rogue-cm", ["localhost", "127.0.0.1"], role="cm")

    def attack() -> list[tuple[str, int | str, bytes]]:
        seen = []
        for who, identity in (
            ("none", None),
            ("agent", st.identities["desk-b"]),
            ("sg", st.identities["sg"]),
        ):
            ctx = peer_ctx(st, identity)
            status, body = post(launch_url, launch, ctx, p.CONTENT_TYPE)
            seen.append((f"launch/{who}", status, body))
            status, body = post(f"{st.broker_url}{p.PATH_BROKER}", hello, ctx, p.CONTENT_TYPE)
            seen.append((f"broker/{who}", status, body))
        # A certificate naming role cm from another CA does not pass the handshake.
        for url, body in ((launch_url, launch), (f"{st.broker_url}{p.PATH_BROKER}", hello)):
            try:
                status, answer = post(url, body, peer_ctx(st, rogue), p.CONTENT_TYPE)
                seen.append(("rogue", status, answer))
            except (urllib.error.URLError, ssl.SSLError, ConnectionError) as exc:
                seen.append(("rogue", "tls-refused", str(exc).encode()))
        return seen

    seen, during = await asyncio.gather(asyncio.to_thread(attack), st.session())
    hardened.assert_session_ok(during)
    for who, status, body in seen:
        if who == "rogue":
            assert status == "tls-refused", (who, status, body)
            continue
        assert status == 403, (who, status, body)
        if who.startswith("launch"):
            # The agent refuses as a real agent does: launch-session-resp, a FAILED_ id, no session-info.
            reply = p.parse(body, "pcoip-agent")
            assert isinstance(reply, p.LaunchSessionResp) and reply.session_info is None, (who, reply)
        else:
            reply = p.parse(body, "pcoip-broker")
            assert isinstance(reply, p.ErrorResp), (who, reply)
        assert reply.result_id == p.E_USER_AUTH, (who, reply)
        assert b"session-tag" not in body and b"Set-Cookie" not in body

    agent_m = metrics(st, "desk-a")
    assert agent_m["gatehouse_agent_launch_refused_peers_total"] == 3
    assert metrics(st, "broker")['gatehouse_broker_peers_refused_total{endpoint="broker"}'] == 3
    hardened.assert_session_ok(await st.session())
    st.stop()
    st.assert_no_secrets_logged()
    assert "launch-session refused" in st.logs()["desk-a"]


def test_an_agent_without_client_verification_says_so(pki: pkimod.TestPKI, tmp_path: Path) -> None:
    """ClientTlsVerify=false (a lab without the deployment CA): any caller launches, and the agent warns."""
    agent = start_agent(
        pki,
        tmp_path / "agent",
        "open-agent",
        "desk-open",
        "127.0.0.4",
        "",
        ClientTlsVerify=False,
        ClientCaCert="",
    )
    try:
        launch = p.render(
            "pcoip-agent", p.LaunchSession("5f0c1d9e-8f1a-4d4e-9a51-2b6a3f0c7d12", "127.0.0.9", "x", "CORP")
        )
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.check_hostname = False
        url = f"https://127.0.0.4:{agent.config['ControlPort']}{p.PATH_AGENT}"
        status, body = post(url, launch, ctx, p.CONTENT_TYPE)  # no client certificate
        reply = p.parse(body, "pcoip-agent")
        assert status == 200 and isinstance(reply, p.LaunchSessionResp) and reply.result_id == p.LAUNCH_OK
    finally:
        agent.stop()
    warnings = [json.loads(line) for line in agent.logs().splitlines() if '"warn' in line]
    assert any("ClientTlsVerify is false" in w["msg"] for w in warnings), warnings
