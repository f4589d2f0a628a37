"""Attacks on the broker's identity controls: the directory and RADIUS queues, RADIUS challenges
without end, and second-factor guessing through the CM.

Real processes throughout: the hardened stack (stack.py: broker, two agents, SG, gateway CM) with
a directory domain and a second factor pointing at the real slapd and FreeRADIUS of
identity_servers.py. Where a test needs a slow identity server it puts a latency relay
(latency.py) between the broker and the real server; the relay holds the server's replies back
and lets them go again, it changes no byte. Every test runs its attack, shows the control
engages (the answer the attacker gets and the broker's /metrics), and shows a legitimate user
logs in and runs a whole session (TCP and UDP echo) during or right after it.

Floods of the broker's queues speak the broker protocol as the CMs relay their clients' logins
(the `cm` certificate, one client address per login), so that many logins arrive at once. The
second-factor guessing goes through the CM's public port, from the attacker's own loopback
addresses (127.0.0.x); the legitimate user logs in from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import identity_servers
import latency
import pki as pkimod
import pyotp
import pytest
import slowhttp
import stack as hardened
from identity_servers import ALICE_PASSCODE, BOB_UPN, ERIN_PROMPT, IdentityServers

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.broker import directory as broker_directory
from gatehouse.broker import factors
from gatehouse.broker.xmlapi import BROKER_ERROR_TEXT, MAX_CHALLENGES
from gatehouse.client.flow import CmConnection, SessionReport, StepFailed, run_session

pytestmark = [pytest.mark.docker, pytest.mark.images]

ENVELOPE = "pcoip-broker"
CLIENT_ENVELOPE = "pcoip-client"
BUSY_TEXT = "the broker is busy; try again later"
# Replies held by a stalled relay wait for it, not for these (far above any test's length).
IDENTITY_TIMEOUT = 60
LDAP_POOL = 2
SHORT_TIMEOUT = 2  # LdapTimeout of the SLOW domain: the same relayed directory, a short timeout
DIRECTORY_LIMIT = LDAP_POOL * (1 + broker_directory.WAIT_PER_THREAD)
RADIUS_LIMIT = factors.RADIUS_WORKERS + factors.RADIUS_QUEUE
# The throttle of the second-factor stack: lockout at the 4th failure of a (account, source) pair
# (no delays before it, so the counts below do not depend on timing), account-wide at the 12th.
PAIR_LOCKOUT = 4
ACCOUNT_LOCKOUT = 12


@pytest.fixture(scope="module")
def identity(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityServers]:
    with identity_servers.running(pki, tmp_path_factory.mktemp("identity"), "ghsec-identity") as servers:
        yield servers


def ldap_domain(identity: IdentityServers, domain: str, url: str, **keys: object) -> dict[str, object]:
    d = identity.directory
    values: dict[str, object] = {
        "Source": "ldap",
        "LdapServers": url,
        "LdapCaCert": d.ca,
        "LdapBindDn": d.bind_dn,
        "LdapBindPasswordFile": d.bind_password_file,
        "LdapBaseDn": d.people_dn,
        "LdapGroupBaseDn": d.groups_dn,
        "LdapGroupMode": "memberof",
        "LdapTimeout": IDENTITY_TIMEOUT,
        **keys,
    }
    return {f"Domain.{domain}.{key}": value for key, value in values.items()}


@dataclass
class IdentityStack:
    st: hardened.Stack
    identity: IdentityServers
    ldap: latency.Relay | None = None
    radius: latency.Relay | None = None

    def password(self, user: str) -> str:
        return self.identity.directory.passwords[user]

    async def metrics(self) -> dict[str, float]:
        return await slowhttp.scrape(f"http://127.0.0.1:{self.st.procs['broker'].config['AdminPort']}")

    async def session(
        self, user: str, domain: str, *, source: str = "127.0.0.1", name: str = "", **kwargs: object
    ) -> None:
        """A whole legitimate session through the CM, ``user`` logging in as ``name`` (default:
        ``user``); the password is the directory's, or the stack's for its local CORP users."""
        password = hardened.USER_PW if domain == "CORP" else self.password(user)
        # With SecondFactorFirst the client offers a passcode before it knows the domain; a
        # domain without the second factor asks for the password instead, checking nothing.
        kwargs.setdefault("passcode", lambda: "not-asked")
        report = await run_session(
            self.st.cm_url,
            name or user,
            password,
            domain=domain,
            ssl_context=self.st.client_ctx(),
            source_address=source,
            tcp_bytes=8192,
            **kwargs,  # type: ignore[arg-type]
        )
        hardened.assert_session_ok(report)

    def logs(self) -> str:
        return "".join(self.st.logs().values())


def build(
    pki: pkimod.TestPKI, root: Path, broker: dict[str, object], *directory_domains: str
) -> hardened.Stack:
    st = hardened.build(pki, root, broker=broker)
    # desk-a for the engineering group (alice) of each directory domain.
    for domain in directory_domains:
        st.admin("PUT", f"/entitlements/directory-group/{domain}/engineering/desktop/desk-a")
    return st


@pytest.fixture(scope="module")
def rst(
    pki: pkimod.TestPKI, identity: IdentityServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IdentityStack]:
    """Domains: CORP (local users), DIR (the directory behind a latency relay, LdapPoolSize 2),
    SLOW (the same, LdapTimeout 2 s) and MFA (the directory, then a RADIUS passcode asked first,
    the RADIUS server behind a relay)."""
    d, r = identity.directory, identity.radius
    with (
        latency.relay((d.host, d.ldaps_port), 0.02) as ldap,
        latency.relay((r.host, r.port), 0.02, udp=True) as radius,
    ):
        st = build(
            pki,
            tmp_path_factory.mktemp("identity-attacks"),
            {
                "Domains": "CORP, DIR, MFA, SLOW",
                **ldap_domain(identity, "DIR", f"ldaps://127.0.0.1:{ldap.port}", LdapPoolSize=LDAP_POOL),
                **ldap_domain(identity, "SLOW", f"ldaps://127.0.0.1:{ldap.port}", LdapTimeout=SHORT_TIMEOUT),
                **ldap_domain(identity, "MFA", d.ldaps_url),
                "SecondFactor": "radius",
                "SecondFactorDomains": "MFA",
                "SecondFactorFirst": True,
                "RadiusServers": radius.address,
                "RadiusSecretFile": r.secret_file,
                "RadiusTimeout": IDENTITY_TIMEOUT,
                "RadiusRetries": 0,
                "LoginDelayAfterFailures": PAIR_LOCKOUT,
                "LoginLockoutAfterFailures": PAIR_LOCKOUT,
            },
            "DIR",
            "MFA",
        )
        try:
            yield IdentityStack(st, identity, ldap, radius)
            st.assert_no_secrets_logged(*identity.directory.passwords.values(), identity.radius.secret)
        finally:
            st.stop()


class BrokerPeer:
    """One client's login as a CM relays it to the broker: the `cm` certificate, the client's
    address in <pcm-info>, the broker's session cookie."""

    def __init__(self, st: hardened.Stack, client_ip: str) -> None:
        identity = st.identities["cm"]
        self.ctx = tls.client_context(st.pki.ca, cert=identity.cert, key=identity.key)
        self.url = f"{st.broker_url}{p.PATH_BROKER}"
        self.client_ip = client_ip

    async def login(self, *steps: p.Authenticate) -> p.Message:
        """hello, then ``steps`` while each passes; the last answer."""
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ctx),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=IDENTITY_TIMEOUT * 2),
        ) as http:
            reply = await self._send(http, p.Hello(pcm_info=p.PcmInfo(str(uuid.uuid4()), self.client_ip)))
            assert isinstance(reply, p.HelloResp), reply
            for step in steps:
                reply = await self._send(http, step)
                if getattr(reply, "result_id", "") != p.AUTH_INCOMPLETE:
                    break
            return reply

    async def _send(self, http: aiohttp.ClientSession, message: p.Message) -> p.Message:
        headers = {"Content-Type": p.CONTENT_TYPE}
        async with http.post(self.url, data=p.render(ENVELOPE, message), headers=headers) as resp:
            assert resp.status == 200, resp.status
            return p.parse(await resp.read(), ENVELOPE)


def outcome(reply: p.Message) -> str:
    if isinstance(reply, p.ErrorResp):
        return "busy" if (reply.result_id, reply.result_str) == (p.E_BUSY, BUSY_TEXT) else reply.result_id
    return getattr(reply, "result_id", type(reply).__name__)


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def auth(result: str) -> str:
    return f'gatehouse_broker_authentications_total{{result="{result}"}}'


@contextlib.asynccontextmanager
async def stalled(relay: latency.Relay) -> AsyncIterator[None]:
    relay.stall()
    try:
        yield
    finally:
        relay.resume()


async def flood_until_full(
    logins: list[asyncio.Task[p.Message]], limit: int, *, deadline: float = 45.0
) -> list[str]:
    """Wait until every login but ``limit`` has its answer (the server holds the others); the
    answers so far. The held ones must stay held: a short wait more changes nothing."""
    end = time.monotonic() + deadline
    while sum(t.done() for t in logins) < len(logins) - limit:
        assert time.monotonic() < end, f"{sum(t.done() for t in logins)} answers of {len(logins)}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    return [outcome(t.result()) for t in logins if t.done()]


# ---------------------------------------------------------------- 1. the directory queue


async def test_a_directory_flood_is_answered_busy_at_once(rst: IdentityStack) -> None:
    """The directory holds every reply (the relay stalls): LdapPoolSize logins bind and wait, 8 per
    thread queue, every further login is answered "busy" at once, while the directory still holds
    the others. Local users log in meanwhile; the directory users once it answers again."""
    assert rst.ldap is not None
    flood = DIRECTORY_LIMIT + 12
    before = await rst.metrics()
    async with stalled(rst.ldap):
        logins = [
            asyncio.create_task(
                BrokerPeer(rst.st, f"198.18.1.{i}").login(p.Authenticate(f"flood-{i}", "guess", "DIR"))
            )
            for i in range(flood)
        ]
        answered = await flood_until_full(logins, DIRECTORY_LIMIT)
        # Answered without the directory: busy, every one of them, and only those over the limit.
        assert answered == ["busy"] * (flood - DIRECTORY_LIMIT), answered
        during = await rst.metrics()
        assert delta(during, before, auth("busy")) == flood - DIRECTORY_LIMIT
        assert delta(during, before, 'gatehouse_broker_identity_busy_total{pool="ldap-DIR"}') == (
            flood - DIRECTORY_LIMIT
        )
        assert delta(during, before, f'gatehouse_broker_protocol_errors_total{{result="{p.E_BUSY}"}}') == (
            flood - DIRECTORY_LIMIT
        )
        # The event loop and the other domains are not held: a local user's whole session.
        await rst.session(hardened.USER, "CORP")
        # And no login waits on a directory that never answers: LdapTimeout ends it, with the
        # answer a client gets when the broker cannot be reached.
        slow = await asyncio.wait_for(
            BrokerPeer(rst.st, "198.18.1.250").login(p.Authenticate("alice", rst.password("alice"), "SLOW")),
            SHORT_TIMEOUT * 10,
        )
        assert isinstance(slow, p.ErrorResp) and slow.result_str == BROKER_ERROR_TEXT, slow
    # The directory answers again: the queued logins end (unknown users), none waits on.
    rest = await asyncio.wait_for(asyncio.gather(*logins), 60)
    assert sorted(outcome(r) for r in rest) == sorted(
        ["busy"] * (flood - DIRECTORY_LIMIT) + [p.AUTH_FAILED] * DIRECTORY_LIMIT
    )
    after = await rst.metrics()
    assert delta(after, before, auth("failure")) == DIRECTORY_LIMIT
    await rst.session("alice", "DIR")
    assert "authentication refused: busy" in rst.st.procs["broker"].logs()


# ---------------------------------------------------------------- 2. the RADIUS queue


async def test_a_radius_flood_is_answered_busy_at_once(rst: IdentityStack) -> None:
    """MFA asks for the RADIUS passcode first, so anyone can make the broker send Access-Requests.
    The RADIUS server holds every reply: RADIUS_WORKERS requests wait, RADIUS_QUEUE more queue,
    every further passcode is answered "busy" at once. The real user logs in right after."""
    assert rst.radius is not None
    flood = RADIUS_LIMIT + 10
    before = await rst.metrics()
    async with stalled(rst.radius):
        logins = [
            asyncio.create_task(
                BrokerPeer(rst.st, f"198.18.2.{i}").login(
                    p.Authenticate(f"flood-{i}", "", "MFA", p.METHOD_PASSCODE, "123456")
                )
            )
            for i in range(flood)
        ]
        answered = await flood_until_full(logins, RADIUS_LIMIT)
        assert answered == ["busy"] * (flood - RADIUS_LIMIT), answered
        during = await rst.metrics()
        assert delta(during, before, auth("busy")) == flood - RADIUS_LIMIT
        assert delta(during, before, 'gatehouse_broker_identity_busy_total{pool="radius"}') == (
            flood - RADIUS_LIMIT
        )
        await rst.session(hardened.USER, "CORP")
    rest = await asyncio.wait_for(asyncio.gather(*logins), 60)
    # FreeRADIUS rejects the flood's users once its replies go through.
    assert sorted(outcome(r) for r in rest) == sorted(
        ["busy"] * (flood - RADIUS_LIMIT) + [p.AUTH_FAILED] * RADIUS_LIMIT
    )
    assert delta(await rst.metrics(), before, auth("failure")) == RADIUS_LIMIT
    await rst.session("alice", "MFA", passcode=lambda: ALICE_PASSCODE)


# ---------------------------------------------------------------- 3. challenges without end


async def erin_through_the_cm(st: hardened.Stack, source: str) -> SessionReport:
    """erin, whom the RADIUS server challenges at every passcode, logs in through the CM."""
    return await run_session(
        st.cm_url,
        "erin",
        "no-password-needed-yet",
        domain="MFA",
        ssl_context=st.client_ctx(),
        source_address=source,
        passcode=lambda: "111111",
        challenge_passcode=lambda: "222222",
        connect=False,
    )


async def test_radius_challenges_end_the_login(rst: IdentityStack) -> None:
    """A RADIUS server that keeps answering Access-Challenge: the broker answers MAX_CHALLENGES of
    them, the next one fails the login like a wrong passcode; starting over and over is counted
    like guessing, so the throttle ends it too."""
    before = await rst.metrics()
    report = await erin_through_the_cm(rst.st, "127.0.0.70")
    names = [(s.name, s.result) for s in report.steps]
    assert names[:2] == [("hello", "OK"), ("passcode", p.AUTH_INCOMPLETE)], names
    challenges = [s for s in report.steps if s.name == "challenge"]
    assert [s.result for s in challenges] == [p.AUTH_INCOMPLETE] * (MAX_CHALLENGES - 1) + [p.AUTH_FAILED]
    assert ERIN_PROMPT in report.step("passcode").detail  # type: ignore[union-attr]
    assert not report.ok
    after = await rst.metrics()
    assert delta(after, before, auth("incomplete")) == MAX_CHALLENGES
    assert delta(after, before, auth("failure")) == 1
    # Starting over: each exhausted login is a failure of (erin, this source); at the lockout the
    # broker no longer asks RADIUS at all.
    for _n in range(PAIR_LOCKOUT - 1):
        again = await erin_through_the_cm(rst.st, "127.0.0.70")
        assert again.step("challenge") is not None and not again.ok
    locked = await erin_through_the_cm(rst.st, "127.0.0.70")
    assert [(s.name, s.result) for s in locked.steps][:2] == [("hello", "OK"), ("passcode", p.AUTH_FAILED)]
    assert locked.step("challenge") is None
    after = await rst.metrics()
    assert delta(after, before, auth("failure")) == PAIR_LOCKOUT
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account_source"}') == 1
    assert delta(after, before, 'gatehouse_broker_login_throttled_total{reason="lockout"}') >= 1
    assert "too many challenges" in rst.st.procs["broker"].logs()
    # A real user of the same domain is not affected.
    await rst.session("alice", "MFA", passcode=lambda: ALICE_PASSCODE)


# ---------------------------------------------------------------- 4. second-factor guessing


@dataclass
class Enrolled:
    totp: pyotp.TOTP
    last_step: int = 0

    def next_code(self) -> str:
        """A code the broker accepts now: the current time step, or the one after the last used
        (a code works once; one step either side of now is accepted)."""
        self.last_step = max(int(time.time()) // 30, self.last_step + 1)
        return self.totp.at(self.last_step * 30)

    def wrong_codes(self) -> Iterator[str]:
        """Guesses that are never right: not a code of any step near now."""
        now = int(time.time()) // 30
        right = {self.totp.at(step * 30) for step in range(now - 4, now + 8)}
        n = 0
        while True:
            code = f"{(n * 7919 + 1) % 1_000_000:06d}"
            n += 1
            if code not in right:
                yield code


@pytest.fixture(scope="module")
def tst(
    pki: pkimod.TestPKI, identity: IdentityServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IdentityStack]:
    """TOTP for every domain: CORP (local users) and DIR (the directory)."""
    root = tmp_path_factory.mktemp("totp-attacks")
    key = root / "totp.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    st = build(
        pki,
        root,
        {
            "Domains": "CORP, DIR",
            **ldap_domain(identity, "DIR", identity.directory.ldaps_url),
            "SecondFactor": "totp",
            "TotpKeyFile": key,
            "LoginDelayAfterFailures": PAIR_LOCKOUT,
            "LoginLockoutAfterFailures": PAIR_LOCKOUT,
            "LoginAccountLockoutAfterFailures": ACCOUNT_LOCKOUT,
        },
        "DIR",
    )
    try:
        yield IdentityStack(st, identity)
        st.assert_no_secrets_logged(*identity.directory.passwords.values(), key.read_text().strip())
    finally:
        st.stop()


def enroll(st: hardened.Stack, domain: str, user: str) -> Enrolled:
    st.admin("PUT", f"/users/{domain}/{user}", {})
    uri = st.admin("POST", f"/users/{domain}/{user}/totp")["otpauth_uri"]
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    return Enrolled(totp)


async def guess_through_the_cm(
    st: hardened.Stack, source: str, user: str, password: str, domain: str, code: str
) -> str:
    """One guess as the anonymous attacker makes it at the CM's public port: hello, the (known)
    password, a code. The answer to the last step sent."""
    cm = CmConnection(st.cm_url, st.client_ctx(), source_address=source, timeout=30)
    try:
        assert isinstance(await cm.send(p.Hello()), p.HelloResp)
        reply = await cm.send(p.Authenticate(user, password, domain))
        if getattr(reply, "result_id", "") == p.AUTH_INCOMPLETE:
            reply = await cm.send(p.Authenticate(user, "", domain, p.METHOD_PASSCODE, code))
        await cm.send(p.Bye())
        return getattr(reply, "result_id", "") or type(reply).__name__
    except StepFailed as exc:
        return exc.result
    finally:
        await cm.close()


async def test_totp_guessing_through_the_cm_never_locks_out_the_user(tst: IdentityStack) -> None:
    """An attacker who has alice's password guesses TOTP codes at the CM from several addresses.
    Each (account, source) pair is locked after PAIR_LOCKOUT wrong codes, the account after
    ACCOUNT_LOCKOUT from all of them: a few dozen codes of a million are ever checked. The account
    lockout does not apply where alice logged in before: she still logs in with her code."""
    enrolled = enroll(tst.st, "CORP", hardened.USER)
    # alice's usual address: a login there makes it known to the throttle.
    await tst.session(hardened.USER, "CORP", passcode=enrolled.next_code)
    before = await tst.metrics()
    guesses = enrolled.wrong_codes()
    sources = [f"127.0.0.{80 + i}" for i in range(ACCOUNT_LOCKOUT // PAIR_LOCKOUT + 1)]
    answers = []
    for source in sources:
        for _n in range(PAIR_LOCKOUT + 2):
            answers.append(
                await guess_through_the_cm(
                    tst.st, source, hardened.USER, hardened.USER_PW, "CORP", next(guesses)
                )
            )
    # The attacker sees nothing but failures, and the last source is refused even the right code.
    assert set(answers) == {p.AUTH_FAILED}, answers
    right = enrolled.totp.at((enrolled.last_step + 1) * 30)
    assert (
        await guess_through_the_cm(tst.st, sources[-1], hardened.USER, hardened.USER_PW, "CORP", right)
        == p.AUTH_FAILED
    )
    after = await tst.metrics()
    # Checked: PAIR_LOCKOUT per source until the account lockout; everything else refused unchecked.
    assert delta(after, before, auth("failure")) == ACCOUNT_LOCKOUT
    assert delta(after, before, auth("throttled")) == len(answers) + 1 - ACCOUNT_LOCKOUT
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account_source"}') == (
        ACCOUNT_LOCKOUT // PAIR_LOCKOUT
    )
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account"}') == 1
    assert delta(after, before, 'gatehouse_broker_login_throttled_total{reason="account_lockout"}') >= 1
    # The key property: alice, from her known address, with her password and code.
    await tst.session(hardened.USER, "CORP", passcode=enrolled.next_code)


# Names slapd finds alice by (RFC 4518 matching: case, compatibility forms such as fullwidth
# letters, spaces; the protocol already trims a name's edges).
ALICE_SPELLINGS = (
    "alice",
    "ALICE",
    "\uff41lice",
    "a\uff4cice",
    "\uff21LICE",
    "alic\uff45",
    " alice",
    "Alice\t",
)


async def test_other_spellings_of_a_directory_name_share_its_throttle(tst: IdentityStack) -> None:
    """The directory matches alice under many spellings. The attacker rotates them while guessing
    her TOTP code from one address: all of them are one account for the throttle, so no more than
    PAIR_LOCKOUT codes are checked, and alice still logs in from her own address."""
    password = tst.password("alice")
    enrolled = enroll(tst.st, "DIR", "alice")
    tst.st.admin("PUT", "/entitlements/user/DIR/alice/desktop/desk-a")
    # Every spelling passes the password step (the directory finds alice).
    for spelling in ALICE_SPELLINGS:
        reply = await BrokerPeer(tst.st, "198.18.3.1").login(p.Authenticate(spelling, password, "DIR"))
        assert outcome(reply) == p.AUTH_INCOMPLETE, (spelling, reply)
    before = await tst.metrics()
    guesses = enrolled.wrong_codes()
    answers = [
        await guess_through_the_cm(tst.st, "127.0.0.90", spelling, password, "DIR", next(guesses))
        for spelling in ALICE_SPELLINGS
        for _n in range(2)
    ]
    assert set(answers) == {p.AUTH_FAILED}, answers
    after = await tst.metrics()
    assert delta(after, before, auth("failure")) == PAIR_LOCKOUT
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account_source"}') == 1
    assert delta(after, before, auth("throttled")) == len(answers) - PAIR_LOCKOUT
    await tst.session("alice", "DIR", passcode=enrolled.next_code)


# One directory account under two names the directory tells apart and no normalisation makes one:
# the uid and the user principal name (the lookup matches userPrincipalName for a name with @).
BOB_NAMES = ("bob", BOB_UPN)


def user_binds(st: IdentityStack, uid: str) -> int:
    """Binds as ``uid``'s entry that slapd has logged so far."""
    dn = identity_servers.user_dn(uid)
    return st.identity.directory.container.logs().decode(errors="replace").count(f'BIND dn="{dn}"')


async def test_a_second_directory_name_shares_the_throttle_of_the_account(tst: IdentityStack) -> None:
    """The directory finds bob as "bob" and as his user principal name. The attacker alternates
    the names: guessing his password from one address, then, with the password, guessing his TOTP
    code from several. Failures count against the directory account the lookup resolved, so the
    pair lockout and the account lockout come as early as under one name, and a name the address
    has not been refused under yet is refused before the directory bind; bob still logs in from
    his own address, under either name."""
    password = tst.password("bob")
    enrolled = enroll(tst.st, "DIR", "bob")
    tst.st.admin("PUT", "/entitlements/user/DIR/bob/desktop/desk-a")
    # bob's usual address (a login makes it known); both names pass the password step.
    await tst.session("bob", "DIR", passcode=enrolled.next_code)
    for name in BOB_NAMES:
        reply = await BrokerPeer(tst.st, "198.18.4.1").login(p.Authenticate(name, password, "DIR"))
        assert outcome(reply) == p.AUTH_INCOMPLETE, (name, reply)

    # Password guessing from one address, the names in turn.
    before = await tst.metrics()
    binds_before = user_binds(tst, "bob")
    answers = [
        await guess_through_the_cm(tst.st, "127.0.0.100", name, f"wrong-{n}", "DIR", "000000")
        for n in range(PAIR_LOCKOUT + 2)
        for name in BOB_NAMES
    ]
    assert set(answers) == {p.AUTH_FAILED}, answers
    after = await tst.metrics()
    assert delta(after, before, auth("failure")) == PAIR_LOCKOUT
    assert delta(after, before, auth("throttled")) == len(answers) - PAIR_LOCKOUT
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account_source"}') == 1
    # The principal name's own pair was not locked: its refusals came after the lookup, before
    # any bind as bob (slapd's log of binds).
    assert user_binds(tst, "bob") - binds_before == PAIR_LOCKOUT

    # TOTP guessing with the password, from several addresses, the names in turn.
    before = await tst.metrics()
    guesses = enrolled.wrong_codes()
    sources = [f"127.0.0.{110 + i}" for i in range(ACCOUNT_LOCKOUT // PAIR_LOCKOUT + 1)]
    answers = [
        await guess_through_the_cm(tst.st, source, name, password, "DIR", next(guesses))
        for source in sources
        for _n in range(PAIR_LOCKOUT + 2)
        for name in BOB_NAMES
    ]
    assert set(answers) == {p.AUTH_FAILED}, answers
    after = await tst.metrics()
    # The password guesses above count too: the account lockout comes at ACCOUNT_LOCKOUT in all.
    assert delta(after, before, auth("failure")) == ACCOUNT_LOCKOUT - PAIR_LOCKOUT
    assert delta(after, before, 'gatehouse_broker_login_lockouts_total{scope="account"}') == 1
    assert delta(after, before, 'gatehouse_broker_login_throttled_total{reason="account_lockout"}') >= 1
    # bob, from his known address, under both names.
    await tst.session("bob", "DIR", passcode=enrolled.next_code)
    # A third code in one 30 s step would be ahead of the accepted window: the next step first.
    await asyncio.sleep(max(0.0, enrolled.last_step * 30 - time.time()))
    await tst.session("bob", "DIR", name=BOB_UPN, passcode=enrolled.next_code)
