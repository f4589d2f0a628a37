"""Attacks on the connection manager, each against the real processes of the hardened stack.

Every test runs its attack, shows it is stopped, shows a legitimate session (TCP and UDP echo)
completes during and after it, and that no secret reached a log. Attack traffic comes from its own
loopback addresses (127.0.0.x), the legitimate user from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pki as pkimod
import pytest
import slowhttp
import stack as hardened
from services import ServiceProcess, free_port, start_cm

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import CmConnection, join_session, run_session
from gatehouse.config import parse_kv

ENV = "pcoip-client"
REQUEST_TIMEOUT = 3
# Small enough that the flood below overflows it (8 sources x 16 sessions = 128 > 64).
MAX_PRE_AUTH = 64
# The global cap of the CM started by the MaxConnections test (below four sources' per-source caps).
MAX_CONNECTIONS = 40
CM_OVERRIDES: dict[str, object] = {
    "RequestTimeout": REQUEST_TIMEOUT,
    "KeepAliveTimeout": 3,
    "MaxPreAuthSessions": MAX_PRE_AUTH,
    "MaxPreAuthSessionsPerSource": 16,
    "MaxConnectionsPerSource": 64,
    "MaxAuthAttempts": 5,
}


@pytest.fixture(scope="module")
def st(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    s = hardened.build(pki, Path(tmp_path_factory.mktemp("cm-attacks")), cm=CM_OVERRIDES)
    yield s
    s.stop()


def cm_config(st: hardened.Stack) -> dict[str, str]:
    return parse_kv(st.procs["cm"].config_path.read_text())


def admin_url(st: hardened.Stack) -> str:
    return f"http://127.0.0.1:{cm_config(st)['AdminPort']}"


def cm_port(st: hardened.Stack) -> int:
    return int(cm_config(st)["ListenPort"])


async def metrics(st: hardened.Stack) -> dict[str, float]:
    return await slowhttp.scrape(admin_url(st))


@contextlib.asynccontextmanager
async def raw_client(
    st: hardened.Stack, source: str, *, cookies: bool = False
) -> AsyncIterator[aiohttp.ClientSession]:
    jar: aiohttp.abc.AbstractCookieJar = (
        aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
    )
    connector = aiohttp.TCPConnector(ssl=st.client_ctx(), local_addr=(source, 0), limit=32)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        yield http


async def post(
    http: aiohttp.ClientSession, st: hardened.Stack, message: p.Message, headers: dict[str, str] | None = None
) -> tuple[int, p.Message]:
    send = {"Content-Type": p.CONTENT_TYPE, **(headers or {})}
    async with http.post(f"{st.cm_url}{p.PATH_BROKER}", data=p.render(ENV, message), headers=send) as resp:
        return resp.status, p.parse(await resp.read(), ENV)


def result_of(message: p.Message) -> str:
    return getattr(message, "result_id", "") or "OK"


async def session_ok(st: hardened.Stack, **kwargs: object) -> None:
    hardened.assert_session_ok(await st.session(tcp_bytes=8192, **kwargs))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def extra_cm(
    st: hardened.Stack, workdir: Path, **overrides: object
) -> AsyncIterator[tuple[ServiceProcess, str, str]]:
    """Another CM on the same broker and SG with ``overrides``: (process, URL, management URL)."""
    config: dict[str, object] = dict(cm_config(st))
    port, admin_port = free_port(), free_port()
    config.update(ListenPort=port, RedirectPort=free_port(), AdminPort=admin_port, **overrides)
    proc = await asyncio.to_thread(start_cm, workdir, config, hardened.SECRET)
    # With workers the supervisor opens AdminPort once every worker serves its metrics.
    for _attempt in range(300):
        try:
            await slowhttp.scrape(f"http://127.0.0.1:{admin_port}")
            break
        except (OSError, aiohttp.ClientError):
            await asyncio.sleep(0.1)
    try:
        yield proc, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    finally:
        proc.stop()


async def session_via(st: hardened.Stack, url: str) -> None:
    """A whole legitimate session through the CM at ``url`` (and the stack's SG)."""
    report = await run_session(
        url, hardened.USER, hardened.USER_PW, domain="CORP", ssl_context=st.client_ctx(), tcp_bytes=8192
    )
    hardened.assert_session_ok(report)


# ------------------------------------------------------------------ 1. session-table exhaustion


async def test_anonymous_hellos_cannot_exhaust_the_session_table(st: hardened.Stack) -> None:
    per_source = 30
    results: dict[str, int] = {}

    async def flood(source: str) -> None:
        async with raw_client(st, source) as http:
            sem = asyncio.Semaphore(8)

            async def one() -> None:
                async with sem:
                    try:
                        _status, reply = await post(http, st, p.Hello())
                        key = result_of(reply)
                    except (aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                        key = type(exc).__name__
                    results[key] = results.get(key, 0) + 1

            await asyncio.gather(*(one() for _n in range(per_source)))

    # Wave 1: two addresses, 30 hellos each, run into their per-source cap (16), which holds
    # across the CM's workers (32 sessions cannot overflow even one worker's share of the pool).
    await asyncio.gather(*(flood(f"127.0.0.{i}") for i in range(10, 12)))
    assert results == {"OK": 32, p.E_BUSY: 28}, results
    # Wave 2: six more addresses overflow the pool (64): the busiest sources' oldest go first.
    attack = asyncio.gather(*(flood(f"127.0.0.{i}") for i in range(12, 18)))
    await asyncio.sleep(0.2)
    await session_ok(st)  # during the flood
    await attack
    await session_ok(st)  # after it
    m = await metrics(st)
    # Every source hit its own cap; the pool never grew past MaxPreAuthSessions, and the oldest
    # anonymous sessions were evicted (their broker sessions closed) to make room.
    assert results["OK"] >= 32 + 6 * 16, results
    assert m["gatehouse_cm_pre_auth_sessions"] <= MAX_PRE_AUTH
    assert m["gatehouse_cm_pre_auth_evictions_total"] > 0
    assert m['gatehouse_cm_busy_refusals_total{limit="max_pre_auth_sessions_per_source"}'] > 0
    assert "unauthenticated session ended" in st.procs["cm"].logs()
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ 2. slowloris


async def test_slow_and_idle_connections_are_cut_and_capped(st: hardened.Stack) -> None:
    port = cm_port(st)
    ctx = st.client_ctx()
    held: list[slowhttp.Conn] = []
    started = time.monotonic()
    for i, mode in enumerate(slowhttp.MODES):
        for j in range(4):
            source = f"127.0.0.{20 + i * 4 + j}"
            held += await asyncio.gather(
                *(slowhttp.open_slow("127.0.0.1", port, ctx, source, mode, p.PATH_BROKER) for _n in range(25))
            )  # 300 in all
    # The per-source cap: 64 from one address are held, the rest are closed at once. It holds
    # across the CM's workers, and which 64 hold a place is the order the workers accept them in.
    opened_80 = [await slowhttp.try_open("127.0.0.1", port, "127.0.0.40") for _n in range(80)]

    async def cut(conn: slowhttp.Conn | None) -> bool:
        return conn is None or await slowhttp.closed_within(conn[0], 1.0)

    cuts = await asyncio.gather(*(cut(c) for c in opened_80))
    capped = [c for c, was_cut in zip(opened_80, cuts, strict=True) if c is not None and not was_cut]
    assert len(capped) == 64, cuts

    await session_ok(st)  # during: 364 hostile connections are open or being cut

    closed = await asyncio.gather(
        *(slowhttp.closed_within(r, REQUEST_TIMEOUT + 3) for r, _w in held + capped)
    )
    elapsed = time.monotonic() - started
    assert all(closed), f"{closed.count(False)} slow connections still open"
    assert elapsed < REQUEST_TIMEOUT + 8
    slowhttp.close_all([*held, *opened_80])
    await session_ok(st)  # after
    m = await metrics(st)
    assert m['gatehouse_http_request_timeouts_total{listener="public"}'] >= 300
    assert (
        m['gatehouse_http_connections_refused_total{limit="max_connections_per_source",listener="public"}']
        >= 16
    )
    st.assert_no_secrets_logged()


async def test_an_idle_kept_alive_connection_is_closed(st: hardened.Stack) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        cm_port(st),
        ssl=st.client_ctx(),
        server_hostname="localhost",
        local_addr=("127.0.0.41", 0),
    )
    writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    # KeepAliveTimeout is 3 s: the idle connection is closed (a second request never started).
    assert await slowhttp.closed_within(reader, 6)
    writer.close()
    await session_ok(st)


async def test_the_global_connection_cap_holds_and_frees_its_slots(
    st: hardened.Stack, tmp_path: Path
) -> None:
    async with extra_cm(st, tmp_path / "cm-cap", MaxConnections=MAX_CONNECTIONS) as (_proc, url, admin):
        port = int(url.rpartition(":")[2])
        held = [
            await slowhttp.try_open("127.0.0.1", port, f"127.0.0.{60 + i % 4}")
            for i in range(MAX_CONNECTIONS)
        ]
        assert all(c is not None for c in held)
        # The kernel completes a handshake before a worker accepts it; with two workers each
        # accepts its own queue, so a newcomer is only "over" once every held one holds a slot.
        for _attempt in range(50):
            if slowhttp.open_connections(await slowhttp.scrape(admin)) == MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.1)
        # Every slot is taken: a newcomer from any other address is reset at accept...
        over = [await slowhttp.try_open("127.0.0.1", port, f"127.0.0.{64 + i}") for i in range(10)]
        assert all(await asyncio.gather(*(slowhttp.closed_within(c[0], 1.0) for c in over if c is not None)))
        # ... while the management listener, with its own budget, still answers and counts.
        m = await slowhttp.scrape(admin)
        assert slowhttp.open_connections(m) == MAX_CONNECTIONS
        assert slowhttp.refused(m, "max_connections") >= 10
        # RequestTimeout frees the slots; then a legitimate session completes through this CM.
        closed = await asyncio.gather(*(slowhttp.closed_within(c[0], REQUEST_TIMEOUT + 3) for c in held if c))
        assert all(closed)
        slowhttp.close_all([*held, *over])
        await session_via(st, url)
        assert slowhttp.refused(await slowhttp.scrape(admin), "max_connections_per_source") == 0
    await session_ok(st)
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ 3. password guessing


async def test_password_guessing_ends_the_cm_session(st: hardened.Stack) -> None:
    async with raw_client(st, "127.0.0.50", cookies=True) as http:
        _status, reply = await post(http, st, p.Hello())
        assert isinstance(reply, p.HelloResp)
        answers = []
        for i in range(5):
            _status, reply = await post(http, st, p.Authenticate("mallory", f"guess-{i}", "CORP"))
            answers.append((result_of(reply), getattr(reply, "result_str", "")))
        # The fifth failure still gets the same answer...
        assert set(answers) == {(p.AUTH_FAILED, "Unknown username or password")}
        # ... but the session is gone: more guesses need a new hello.
        _status, reply = await post(http, st, p.Authenticate("mallory", "guess-6", "CORP"))
        assert result_of(reply) == p.E_OUT_OF_STATE
        await session_ok(st)
    m = await metrics(st)
    assert m["gatehouse_cm_auth_attempts_exceeded_total"] >= 1
    await session_ok(st)
    st.assert_no_secrets_logged("guess-0", "guess-4")


# ------------------------------------------------------------------ 4. Client-Log-Id takeover


async def test_a_known_client_log_id_does_not_take_over_a_session(st: hardened.Stack) -> None:
    log_id = "victim-" + "1b2c3d4e5f60718293a4"
    # The victim keeps no cookies and is authenticated; the attacker is behind the same NAT
    # address and knows the log id, but speaks on its own connection.
    victim = CmConnection(st.cm_url, st.client_ctx(), use_cookie=False, log_id=log_id)
    try:
        assert isinstance(await victim.send(p.Hello()), p.HelloResp)
        reply = await victim.send(p.Authenticate(hardened.USER, hardened.USER_PW, "CORP"))
        assert result_of(reply) == p.AUTH_OK
        async with raw_client(st, "127.0.0.1") as attacker:
            _status, stolen = await post(attacker, st, p.GetResourceList(), {"Client-Log-Id": log_id})
            assert result_of(stolen) == p.E_USER_AUTH
            _status, stolen = await post(
                attacker, st, p.AllocateResource("desk-a"), {"Client-Log-Id": log_id}
            )
            assert result_of(stolen) == p.E_USER_AUTH
        listing = await victim.send(p.GetResourceList())  # the victim itself still works
        assert isinstance(listing, p.GetResourceListResp) and listing.result_id == p.LIST_OK
    finally:
        await victim.close()
    # A client that shows its cookie cannot be reached by its log id at all, even before login.
    cookie_log_id = "cookie-" + "99aa88bb77cc66dd55ee"
    async with raw_client(st, "127.0.0.52", cookies=True) as owner, raw_client(st, "127.0.0.52") as attacker:
        await post(owner, st, p.Hello(), {"Client-Log-Id": cookie_log_id})
        await post(owner, st, p.Authenticate("nobody", "x", "CORP"), {"Client-Log-Id": cookie_log_id})
        _status, reply = await post(
            attacker, st, p.Authenticate("bob", "y", "CORP"), {"Client-Log-Id": cookie_log_id}
        )
        assert result_of(reply) == p.E_OUT_OF_STATE
    # The legitimate cookie-less flow still works, end to end, as does the usual one.
    await session_ok(st, use_cookie=False)
    await session_ok(st)
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ 5. cookie rotation, lifetime


async def test_the_cookie_is_rotated_at_login(st: hardened.Stack) -> None:
    async with raw_client(st, "127.0.0.51", cookies=True) as http:
        await post(http, st, p.Hello())
        before = {c.key: c.value for c in http.cookie_jar}["JSESSIONID"]
        _status, reply = await post(http, st, p.Authenticate(hardened.USER, hardened.USER_PW, "CORP"))
        assert result_of(reply) == p.AUTH_OK
        after = {c.key: c.value for c in http.cookie_jar}["JSESSIONID"]
        assert after != before
        async with raw_client(st, "127.0.0.51") as fixated:
            # Whoever knew (or planted) the pre-login cookie holds nothing after the login.
            _status, reply = await post(fixated, st, p.GetResourceList(), {"Cookie": f"JSESSIONID={before}"})
            assert result_of(reply) == p.E_USER_AUTH
        _status, reply = await post(http, st, p.GetResourceList())
        assert result_of(reply) == p.LIST_OK
    await session_ok(st)
    st.assert_no_secrets_logged(before, after)


@pytest.fixture
async def second_cm(st: hardened.Stack, tmp_path: Path) -> AsyncIterator[str]:
    """Another CM on the same broker: SessionMaxLifetime 3 s."""
    async with extra_cm(st, tmp_path / "cm2", SessionMaxLifetime=3) as (_proc, url, _admin):
        yield url


async def test_sessions_have_an_absolute_lifetime(st: hardened.Stack, second_cm: str) -> None:
    url = second_cm
    cm = CmConnection(url, st.client_ctx())
    try:
        await cm.send(p.Hello())
        assert result_of(await cm.send(p.Authenticate(hardened.USER, hardened.USER_PW, "CORP"))) == p.AUTH_OK
        for _n in range(3):  # busy, never idle...
            assert result_of(await cm.send(p.GetResourceList())) == p.LIST_OK
            await asyncio.sleep(0.8)
        await asyncio.sleep(1.0)
        # ... and still over after SessionMaxLifetime.
        assert result_of(await cm.send(p.GetResourceList())) == p.E_USER_AUTH
    finally:
        await cm.close()
    # A session that needs less than SessionMaxLifetime is not disturbed by it.
    await session_via(st, url)
    await session_ok(st)


async def test_a_cm_that_does_not_verify_agents_gives_them_no_password(
    st: hardened.Stack, tmp_path: Path
) -> None:
    async with extra_cm(st, tmp_path / "cm-noverify", AgentTlsVerify=False) as (proc, url, admin):
        launched = st.logs()["desk-a"].count("session launched")
        report = await run_session(
            url, hardened.USER, hardened.USER_PW, domain="CORP", ssl_context=st.client_ctx(), connect=False
        )
        step = report.step("allocate-resource")
        assert step is not None and not step.ok
        assert step.detail == "Error occurred while communicating with agent"
        # Nothing reached the agent: the password is withheld before any request is made.
        assert st.logs()["desk-a"].count("session launched") == launched
        mine = await slowhttp.scrape(admin)
        assert mine['gatehouse_cm_upstream_failures_total{kind="unverified",upstream="agent"}'] == 1
        # Turning agent verification off is said loudly at start, and each withholding is logged.
        assert "AgentTlsVerify is false" in proc.logs()
        assert "credentials withheld" in proc.logs()
        assert hardened.USER_PW not in proc.logs()
    await session_ok(st)
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ 6. open redirect


async def test_the_redirect_port_is_not_an_open_redirect(st: hardened.Stack) -> None:
    redirect = int(cm_config(st)["RedirectPort"])
    async with aiohttp.ClientSession() as http:
        for host in ("evil.example", "evil.example:8443", "127.0.0.1.evil.example"):
            async with http.get(
                f"http://127.0.0.1:{redirect}/pcoip-broker/xml", headers={"Host": host}, allow_redirects=False
            ) as resp:
                assert resp.status == 301
                location = resp.headers["Location"]
                assert "evil" not in location
                assert re.match(rf"https://localhost(:{cm_port(st)})?/pcoip-broker/xml$", location), location
        # The CM's own names are kept.
        async with http.get(f"http://127.0.0.1:{redirect}/x", allow_redirects=False) as resp:
            assert resp.headers["Location"] == f"https://127.0.0.1:{cm_port(st)}/x"
    await session_ok(st)


# ------------------------------------------------------------------ 7. metrics off the public port


async def test_metrics_only_on_the_management_listener(st: hardened.Stack) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=st.client_ctx())) as http:
        async with http.get(f"{st.cm_url}/metrics") as resp:
            assert resp.status == 404
        async with http.get(f"{st.cm_url}/health") as resp:
            assert resp.status == 200  # the HALB's check stays on the public port
        async with http.get(f"{admin_url(st)}/health") as resp:
            assert resp.status == 200
    assert "gatehouse_cm_sessions_active" in await metrics(st)
    await session_ok(st)


# ------------------------------------------------------------------ 8. internal identities


async def test_a_rogue_agent_gets_no_launch_session(st: hardened.Stack, tmp_path: Path) -> None:
    # A desktop registered at an address that answers with a certificate outside the deployment CA.
    rogue_pki = pkimod.TestPKI(tmp_path / "rogue")
    rogue = rogue_pki.issue("rogue-agent", ["127.0.0.1"], role="agent")
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            received.append(await asyncio.wait_for(reader.read(65536), 3))
        writer.close()

    server = await asyncio.start_server(
        handler, "127.0.0.1", 0, ssl=tls.server_context(rogue.cert, rogue.key, "agent")
    )
    rogue_port = server.sockets[0].getsockname()[1]
    st.admin(
        "PUT", "/desktops/desk-rogue", {"address": "127.0.0.1", "agent_port": rogue_port, "session_port": 9}
    )
    st.admin("PUT", f"/entitlements/user/CORP/{hardened.OTHER}/desktop/desk-rogue")
    try:
        report = await st.session(hardened.OTHER, hardened.OTHER_PW, resource="desk-rogue", connect=False)
        step = report.step("allocate-resource")
        assert step is not None and not step.ok
        assert step.detail == "Error occurred while communicating with agent"
        assert not any(received), "the CM sent a launch-session to an unverified agent"
    finally:
        st.admin("DELETE", f"/entitlements/user/CORP/{hardened.OTHER}/desktop/desk-rogue")
        st.admin("DELETE", "/desktops/desk-rogue")
        server.close()
    await session_ok(st)
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ 9. a dead SG next to a live CM


async def _cm_health(st: hardened.Stack) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=st.client_ctx())) as http:
        async with http.get(f"{st.cm_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status


async def test_a_dead_sg_takes_the_cm_out_of_rotation(st: hardened.Stack) -> None:
    assert await _cm_health(st) == 200
    st.procs["sg"].kill()
    killed = time.monotonic()
    while await _cm_health(st) != 503:
        assert time.monotonic() - killed < 2.0, "CM /health still 200 two seconds after the SG died"
        await asyncio.sleep(0.05)
    assert (await metrics(st))["gatehouse_cm_security_gateway_up"] == 0.0
    await asyncio.to_thread(st.procs["sg"].start)
    back = time.monotonic()
    while await _cm_health(st) != 200:
        assert time.monotonic() - back < 3.0, "CM /health not back after the SG returned"
        await asyncio.sleep(0.05)
    await session_ok(st)
    st.assert_no_secrets_logged()


# ------------------------------------------------------------------ collaboration invitation codes


async def test_guessing_invitation_codes_ends_the_guessers_sessions_and_spares_the_owner(
    st: hardened.Stack,
) -> None:
    """A logged-in user guesses codes (random ones, and near misses of a real one) over several
    sessions: each session ends after MaxInvitationAttempts unknown codes, no guess joins, and the
    owner's session and the real code keep working."""
    before = await metrics(st)
    attempts = 5  # MaxInvitationAttempts default
    logins = 3
    seen: dict[str, int] = {}

    async def guesser(code: str, source: str) -> None:
        async with raw_client(st, source, cookies=True) as http:
            for round_ in range(logins):
                _status, reply = await post(http, st, p.Hello())
                assert isinstance(reply, p.HelloResp)
                _status, reply = await post(
                    http, st, p.Authenticate(hardened.OTHER, hardened.OTHER_PW, "CORP")
                )
                assert result_of(reply) == p.AUTH_OK
                for i in range(attempts + 1):
                    near_miss = code[:-1] + ("A" if code[-1] != "A" else "B")
                    guess = near_miss if i == 0 else f"guess{round_}x{i}" + "Q" * 20
                    _status, reply = await post(http, st, p.RedeemInvitation(guess))
                    seen[result_of(reply)] = seen.get(result_of(reply), 0) + 1

    async def hold(owner) -> None:  # a gatehouse.client.flow.Holding
        code = await owner.invite()
        assert code
        await asyncio.gather(guesser(code, "127.0.0.52"), guesser(code, "127.0.0.53"))
        # Every guess was refused; the attempt after the last allowed one found no session.
        assert seen == {p.JOIN_UNKNOWN: 2 * logins * attempts, p.E_USER_AUTH: 2 * logins}
        assert await owner.echo(8192, 2, 10.0, "-after-guessing")
        joined = await join_session(
            st.cm_url,
            hardened.OTHER,
            hardened.OTHER_PW,
            code,
            domain="CORP",
            ssl_context=st.client_ctx(),
            tcp_bytes=8192,
            source_address="127.0.0.54",
        )
        assert joined.ok, joined.steps
        replay = await join_session(
            st.cm_url, hardened.OTHER, hardened.OTHER_PW, code, domain="CORP", ssl_context=st.client_ctx()
        )
        assert (replay.step("redeem-invitation") or replay.steps[-1]).result == p.JOIN_USED
        st.assert_no_secrets_logged(code)

    report = await st.session(tcp_bytes=8192, hold=hold)
    assert report.ok, report.steps
    after = await metrics(st)
    exceeded = "gatehouse_cm_invitation_attempts_exceeded_total"
    assert after[exceeded] - before.get(exceeded, 0.0) == 2 * logins
    assert (
        after["gatehouse_cm_invitations_redeemed_total"]
        - before.get("gatehouse_cm_invitations_redeemed_total", 0.0)
        == 1
    )
    await session_ok(st)
