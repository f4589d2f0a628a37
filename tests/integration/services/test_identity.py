"""Directory logins and second-level authentication against a real slapd and a real FreeRADIUS.

The broker runs as a host process (services.start_broker) with the ``Domain.<D>.*``,
``SecondFactor`` and ``Radius*``/``Totp*`` keys pointing at the containers of identity_servers.py.
The module's stack adds an agent and a direct-mode CM, so that a directory user's whole session
and a RADIUS challenge run through the CM with the gatehouse client; the other checks speak the
broker protocol as the CM does (its ``cm`` certificate, one cookie per client).

Domains of the stack: CORP (directory, LDAPS, memberof groups, password only), MFA (the same
directory, password then a RADIUS passcode) and LAB (local broker users). Brokers with another
configuration (StartTLS and search groups with failover, a foreign CA, TOTP, RADIUS timeouts and a
wrong shared secret, a wrong service-account password) are started by their tests.

Every refused attempt is followed by a login that works, where the configuration allows one,
and no password, passcode, bind password or shared secret reaches a log or the check's output.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import pyotp
import pytest
from identity_helpers import (
    ADMIN_TOKEN,
    NO_THROTTLE,
    admin,
    ldap_domain,
    radius_keys,
    start_identity_broker,
)
from identity_servers import (
    ALICE_PASSCODE,
    BIND_DN,
    BOB_UPN,
    CAROL_CODE,
    CAROL_PROMPT,
    Directory,
    IdentityServers,
    group_dn,
    user_dn,
)
from pki import TestPKI
from services import (
    ServiceProcess,
    cm_config,
    cm_identity,
    free_port,
    start_agent,
    start_broker,
    start_cm,
    write_kv,
)

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.broker import directory as broker_directory
from gatehouse.broker.settings import DirectorySettings
from gatehouse.broker.xmlapi import BROKER_ERROR_TEXT
from gatehouse.client.flow import SessionReport, run_session
from gatehouse.config import Config
from gatehouse.grant import generate_secret

pytestmark = [pytest.mark.docker, pytest.mark.images]

LOCAL_USER, LOCAL_PW = "opsadmin", "Local-" + uuid.uuid4().hex[:10] + "!"
GRANT_SECRET = generate_secret()
ENVELOPE = "pcoip-broker"
INJECTIONS = ("*)(uid=*", "alice)(|(uid=*", "*", "alice*", "al*ce", "alice)(objectClass=*")


def nothing_listens() -> int:
    """A port of 127.0.0.1 where nothing listens, on TCP (connections refused) and UDP (requests
    never answered)."""
    return free_port()


class BrokerClient:
    """One client's exchange with the broker as the CM relays it (its ``cm`` certificate, one cookie)."""

    def __init__(self, broker: ServiceProcess, pki: TestPKI, client_ip: str = "192.0.2.10") -> None:
        identity = cm_identity(pki)
        self.port = int(str(broker.config["ListenPort"]))
        self.ctx = tls.client_context(pki.ca, cert=identity.cert, key=identity.key)
        self.client_ip = client_ip
        self.cookie: str | None = None

    def send(self, message: p.Message) -> p.Message:
        headers = {"Content-Type": p.CONTENT_TYPE}
        if self.cookie:
            headers["Cookie"] = f"JSESSIONID={self.cookie}"
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.request("POST", p.PATH_BROKER, p.render(ENVELOPE, message), headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (resp.status, data[:200])
            set_cookie = resp.headers.get("Set-Cookie")
        finally:
            conn.close()
        if set_cookie:
            self.cookie = SimpleCookie(set_cookie)["JSESSIONID"].value or None
        return p.parse(data, ENVELOPE)

    def hello(self) -> p.HelloResp:
        self.cookie = None
        reply = self.send(p.Hello(pcm_info=p.PcmInfo(str(uuid.uuid4()), self.client_ip)))
        assert isinstance(reply, p.HelloResp), reply
        return reply

    def password(self, user: str, password: str, domain: str = "CORP") -> p.Message:
        return self.send(p.Authenticate(user, password, domain))

    def passcode(self, user: str, passcode: str, domain: str = "MFA") -> p.Message:
        return self.send(p.Authenticate(user, "", domain, p.METHOD_PASSCODE, passcode))

    def login(self, user: str, password: str, domain: str = "CORP", *passcodes: str) -> p.Message:
        """hello, the password step, then one passcode step per ``passcodes``; the last answer."""
        self.hello()
        reply = self.password(user, password, domain)
        for code in passcodes:
            assert_incomplete(reply)
            reply = self.passcode(user, code, domain)
        return reply

    def resources(self) -> set[str]:
        reply = self.send(p.GetResourceList())
        assert isinstance(reply, p.GetResourceListResp) and reply.result_id == p.LIST_OK, reply
        return {r.name for r in reply.resources}


def assert_ok(reply: p.Message) -> None:
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK, reply


def assert_failed(reply: p.Message) -> None:
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_FAILED, reply


def assert_incomplete(reply: p.Message, prompt: str | None = None) -> None:
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_INCOMPLETE, reply
    assert reply.next_methods == [p.AUTH_PASSCODE], reply
    if prompt is not None:
        assert reply.result_str == prompt


def assert_unavailable(reply: p.Message) -> None:
    """What the broker answers when no identity server could decide: the CM shows this error."""
    assert isinstance(reply, p.ErrorResp), reply
    assert (reply.result_id, reply.result_str) == (p.E_INTERNAL, BROKER_ERROR_TEXT)


def assert_no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, "a secret appears in the output"


def all_secrets(identity: IdentityServers) -> list[str]:
    return [*identity.directory.passwords.values(), identity.radius.secret, LOCAL_PW]


def check_identity(pki: TestPKI, workdir: Path, **config: object) -> subprocess.CompletedProcess[str]:
    """``gatehouse-broker --config F --check-identity`` with a broker configuration plus ``config``."""
    workdir.mkdir(parents=True, exist_ok=True)
    certs = pki.issue(f"check-{uuid.uuid4().hex[:8]}", role="broker")
    path = write_kv(
        workdir / "broker.properties",
        {
            "ListenAddress": "127.0.0.1",
            "ListenPort": free_port(),
            "SslCert": certs.cert,
            "SslKey": certs.key,
            "ClientCaCert": pki.ca,
            "Database": workdir / "broker.db",
            "AdminToken": ADMIN_TOKEN,
            **config,
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    return subprocess.run(
        [sys.executable, "-m", "gatehouse.broker", "--config", str(path), "--check-identity"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    pki: TestPKI
    identity: IdentityServers
    broker: ServiceProcess
    cm: ServiceProcess
    agent: ServiceProcess

    @property
    def cm_url(self) -> str:
        return f"https://127.0.0.1:{self.cm.config['ListenPort']}"

    @property
    def client_ctx(self):
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def client(self) -> BrokerClient:
        return BrokerClient(self.broker, self.pki)

    async def session(self, user: str, password: str, domain: str, **kwargs: object) -> SessionReport:
        return await run_session(
            self.cm_url, user, password, domain=domain, ssl_context=self.client_ctx, **kwargs
        )

    def logs(self) -> str:
        return self.broker.logs() + self.cm.logs() + self.agent.logs()


def entitle_group(broker: ServiceProcess, pki: TestPKI, domain: str, group: str, desktop: str) -> None:
    principal = urllib.parse.quote(group, safe="")
    admin(broker, pki, "PUT", f"/entitlements/directory-group/{domain}/{principal}/desktop/{desktop}")


def offline_desktop(broker: ServiceProcess, pki: TestPKI, name: str) -> None:
    """A desktop whose agent never reports: listed (offline), enough to show an entitlement."""
    admin(
        broker,
        pki,
        "PUT",
        f"/desktops/{name}",
        {"address": "127.0.0.1", "agent_port": free_port(), "session_port": 9},
    )


@pytest.fixture(scope="module")
def stack(
    pki: TestPKI, identity: IdentityServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("identity-stack")
    directory, radius = identity.directory, identity.radius
    procs: list[ServiceProcess] = []
    try:
        broker = start_broker(
            pki,
            root / "broker",
            "identity-broker",
            ADMIN_TOKEN,
            Domains="CORP, MFA, LAB",
            **ldap_domain(directory, "CORP"),
            **ldap_domain(directory, "MFA"),
            **radius_keys(radius, SecondFactorDomains="MFA"),
            **NO_THROTTLE,
        )
        procs.append(broker)
        broker_url = f"https://127.0.0.1:{broker.config['ListenPort']}"
        agent = start_agent(pki, root / "desk-eng", "identity-desk-eng", "desk-eng", "127.0.0.2", broker_url)
        procs.append(agent)
        admin(
            broker,
            pki,
            "PUT",
            "/desktops/desk-eng",
            {
                "address": "127.0.0.2",
                "hostname": "desk-eng.test",
                "agent_port": int(str(agent.config["ControlPort"])),
                "session_port": int(str(agent.config["SessionPort"])),
            },
        )
        offline_desktop(broker, pki, "desk-all")
        # By CN, and by DN spelled in another case than the directory's.
        entitle_group(broker, pki, "CORP", "engineering", "desk-eng")
        entitle_group(broker, pki, "CORP", "CN=Desktop-Users,OU=Groups,DC=corp,DC=example", "desk-all")
        entitle_group(broker, pki, "MFA", "engineering", "desk-eng")
        entitle_group(broker, pki, "MFA", "admins", "desk-eng")
        admin(broker, pki, "PUT", f"/users/LAB/{LOCAL_USER}", {"password": LOCAL_PW})
        admin(broker, pki, "PUT", f"/entitlements/user/LAB/{LOCAL_USER}/desktop/desk-eng")
        cm = start_cm(
            root / "cm",
            cm_config(pki, pki.issue("identity-cm", ["localhost", "127.0.0.1"]), broker_url),
            GRANT_SECRET,
        )
        procs.append(cm)
        yield Stack(pki, identity, broker, cm, agent)
        assert_no_secrets(broker.logs() + cm.logs() + agent.logs(), *all_secrets(identity), CAROL_CODE)
    finally:
        for proc in reversed(procs):
            proc.stop()


# ---------------------------------------------------------------- directory logins


async def test_directory_user_full_session(stack: Stack, directory: Directory) -> None:
    """alice, a directory user entitled through her group, runs a whole session through the CM."""
    report = await stack.session(
        "alice", directory.passwords["alice"], "CORP", resource="desk-eng", tcp_bytes=4096, udp_datagrams=2
    )
    assert report.ok, report.steps
    assert report.target.startswith("127.0.0.2:")
    # Her user row exists now: source ldap, no password.
    user = admin(stack.broker, stack.pki, "GET", "/users/CORP/alice")
    assert user["source"] == "ldap"
    assert not user.get("password_set")


def test_directory_groups_give_entitlements(stack: Stack, directory: Directory) -> None:
    """alice by CN (engineering) and, through the nesting of engineering in desktop-users (which
    OpenLDAP's memberOf does not show; the broker follows it), by DN; bob by DN (desktop-users)."""
    expected = {"alice": {"desk-eng", "desk-all"}, "bob": {"desk-all"}, "carol": set(), "dave": set()}
    for user, resources in expected.items():
        client = stack.client()
        assert_ok(client.login(user, directory.passwords[user]))
        assert client.resources() == resources, user


def test_wrong_password_and_unknown_user(stack: Stack, directory: Directory) -> None:
    client = stack.client()
    for user, password in [
        ("alice", directory.passwords["alice"] + "x"),
        ("alice", directory.passwords["bob"]),
        ("nobody", directory.passwords["alice"]),
        ("gatehouse-svc", directory.bind_password),  # not below LdapBaseDn, no uid
        ("alice", directory.passwords["alice"].upper()),
    ]:
        assert_failed(client.login(user, password))
        # The session is not authenticated.
        assert isinstance(client.send(p.GetResourceList()), p.ErrorResp)
    assert_ok(client.login("alice", directory.passwords["alice"]))
    assert client.resources() == {"desk-eng", "desk-all"}


async def test_the_lookup_asks_for_the_account_found_before_the_bind(directory: Directory) -> None:
    """bob's user principal name finds his entry: the login asks ``admit`` (on the event loop)
    about the account by its uid, before the bind; refused, no bind as bob reaches slapd and the
    login ends "refused". A name that finds no entry asks nothing."""
    values = {key: str(value) for key, value in ldap_domain(directory, "CORP").items()}
    pool = broker_directory.Directory(DirectorySettings.from_config(Config(values, environ={}), "CORP"))
    asked: list[tuple[str, bool]] = []
    allow = True

    def admit(name: str) -> bool:
        asked.append((name, threading.current_thread() is threading.main_thread()))
        return allow

    def binds() -> int:
        return directory.container.logs().decode(errors="replace").count(f'BIND dn="{user_dn("bob")}"')

    try:
        ok = await pool.authenticate(BOB_UPN, directory.passwords["bob"], admit)
        assert ok.user is not None and ok.user.name == "bob"
        assert asked == [("bob", True)]
        allow = False
        before = binds()
        refused = await pool.authenticate(BOB_UPN.upper(), directory.passwords["bob"], admit)
        assert (refused.user, refused.failure) == (None, broker_directory.REFUSED)
        assert asked == [("bob", True)] * 2
        await asyncio.sleep(0.5)  # slapd's log of the last operations
        assert binds() == before
        unknown = await pool.authenticate("nobody@corp.example", directory.passwords["bob"], admit)
        assert unknown.failure == broker_directory.INVALID and len(asked) == 2
    finally:
        pool.close()


def test_filter_injection_matches_nobody(stack: Stack, directory: Directory) -> None:
    """Names with filter syntax are refused with any password, and the broker's filter for them
    (directory.user_filter, every value escaped) matches no entry, where a filter pasted together
    from the raw name would match every user."""
    client = stack.client()
    for name in INJECTIONS:
        for password in (directory.passwords["alice"], directory.passwords["bob"]):
            assert_failed(client.login(name, password))
    values = {key: str(value) for key, value in ldap_domain(directory, "CORP").items()}
    settings = DirectorySettings.from_config(Config(values, environ={}), "CORP")
    conn = directory.connection(BIND_DN, directory.bind_password)
    assert conn.bind()
    try:
        for name in INJECTIONS:
            conn.search(directory.people_dn, broker_directory.user_filter(settings, name), attributes=["uid"])
            assert conn.entries == [], name
        conn.search(directory.people_dn, f"(&(objectClass=*)(uid={INJECTIONS[0]}))", attributes=["uid"])
        assert len(conn.entries) == 4  # what escaping prevents
    finally:
        conn.unbind()
    assert_ok(client.login("alice", directory.passwords["alice"]))


def test_empty_password_is_refused(stack: Stack, directory: Directory) -> None:
    """This slapd, like Active Directory, answers a bind with a DN and an empty password with
    success (an unauthenticated bind): the broker must refuse the empty password itself."""
    code, whoami = directory.unauthenticated_bind(f"uid=alice,{directory.people_dn}")
    assert code == 0 and whoami in ("", None)
    client = stack.client()
    assert_failed(client.login("alice", ""))
    assert isinstance(client.send(p.GetResourceList()), p.ErrorResp)
    assert "empty password" in stack.broker.logs()
    assert_ok(client.login("alice", directory.passwords["alice"]))


async def test_directory_down_refuses_directory_users_only(stack: Stack, directory: Directory) -> None:
    """slapd stopped: a directory user gets the broker error the CM passes on (not "wrong
    password"), a local user of a local domain still logs in; once slapd is back, so does alice."""
    with directory.stopped():
        report = await stack.session("alice", directory.passwords["alice"], "CORP", connect=False)
        step = report.step("authenticate")
        assert step is not None and not step.ok
        assert (step.result, step.detail) == (p.E_INTERNAL, BROKER_ERROR_TEXT)
        local = await stack.session(LOCAL_USER, LOCAL_PW, "LAB", connect=False)
        assert local.ok, local.steps
    report = await stack.session(
        "alice", directory.passwords["alice"], "CORP", resource="desk-eng", connect=False
    )
    assert report.ok, report.steps


def test_directory_hanging_times_out(stack: Stack, directory: Directory) -> None:
    """slapd paused (connections accepted, never answered): LdapTimeout bounds the wait."""
    client = stack.client()
    with directory.paused():
        start = time.monotonic()
        assert_unavailable(client.login("alice", directory.passwords["alice"]))
        assert time.monotonic() - start < 10
        assert_ok(client.login(LOCAL_USER, LOCAL_PW, "LAB"))
    assert_ok(client.login("alice", directory.passwords["alice"]))


# ---------------------------------------------------------------- RADIUS passcodes


def test_radius_passcode_step(stack: Stack, directory: Directory) -> None:
    client = stack.client()
    hello = client.hello()
    assert hello.methods == [p.AUTH_PASSWORD, p.AUTH_PASSCODE]
    reply = client.password("alice", directory.passwords["alice"], "MFA")
    assert_incomplete(reply)
    # Not authenticated between the steps.
    assert isinstance(client.send(p.GetResourceList()), p.ErrorResp)
    assert_ok(client.passcode("alice", ALICE_PASSCODE))
    assert client.resources() == {"desk-eng"}
    # CORP has no second factor: the password alone.
    assert_ok(client.login("alice", directory.passwords["alice"], "CORP"))


def test_radius_wrong_passcode_starts_over(stack: Stack, directory: Directory) -> None:
    client = stack.client()
    assert_failed(client.login("alice", directory.passwords["alice"], "MFA", "000000"))
    # The failed step reset the login: a passcode alone is not the next step.
    assert_failed(client.passcode("alice", ALICE_PASSCODE))
    assert isinstance(client.send(p.GetResourceList()), p.ErrorResp)
    # bob's password is right, but RADIUS rejects him; a wrong password never reaches RADIUS.
    assert_failed(client.login("bob", directory.passwords["bob"], "MFA", ALICE_PASSCODE))
    assert_failed(client.login("alice", directory.passwords["bob"], "MFA"))
    # The same user in every step.
    client.hello()
    assert_incomplete(client.password("bob", directory.passwords["bob"], "MFA"))
    assert_failed(client.passcode("alice", ALICE_PASSCODE))
    assert_ok(client.login("alice", directory.passwords["alice"], "MFA", ALICE_PASSCODE))


def test_radius_challenge(stack: Stack, directory: Directory) -> None:
    client = stack.client()
    client.hello()
    assert_incomplete(client.password("carol", directory.passwords["carol"], "MFA"))
    reply = client.passcode("carol", "push")
    assert_incomplete(reply, CAROL_PROMPT)
    assert_ok(client.passcode("carol", CAROL_CODE))
    assert client.resources() == {"desk-eng"}
    # A wrong code after the challenge fails and starts over; then the whole flow works again.
    assert_failed(client.login("carol", directory.passwords["carol"], "MFA", "push", "000000"))
    assert_ok(client.login("carol", directory.passwords["carol"], "MFA", "push", CAROL_CODE))


async def test_radius_challenge_through_the_cm(stack: Stack, directory: Directory) -> None:
    report = await stack.session(
        "carol",
        directory.passwords["carol"],
        "MFA",
        passcode=lambda: "push",
        challenge_passcode=lambda: CAROL_CODE,
        connect=False,
    )
    assert report.ok, report.steps
    names = [s.name for s in report.steps]
    assert names[:4] == ["hello", "authenticate", "passcode", "challenge"]
    passcode = report.step("passcode")
    assert passcode is not None and CAROL_PROMPT in passcode.detail


# ---------------------------------------------------------------- other configurations


def test_starttls_search_groups_and_failover(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """ldap:// with StartTLS, the first server refusing connections, groups by search (dave's
    posixGroup memberUid counts). --check-identity reports the dead server and exits 1."""
    dead = f"ldaps://127.0.0.1:{nothing_listens()}"
    servers = f"{dead}, {directory.ldap_url}"
    keys = ldap_domain(directory, "CORP", servers, LdapGroupMode="search")
    broker = start_identity_broker(pki, tmp_path / "broker", "starttls", **keys)
    processes.append(broker)
    offline_desktop(broker, pki, "desk-lab")
    offline_desktop(broker, pki, "desk-eng")
    entitle_group(broker, pki, "CORP", "lab-users", "desk-lab")
    entitle_group(broker, pki, "CORP", group_dn("engineering"), "desk-eng")
    client = BrokerClient(broker, pki)
    assert_ok(client.login("dave", directory.passwords["dave"]))
    assert client.resources() == {"desk-lab"}
    assert_ok(client.login("alice", directory.passwords["alice"]))
    assert client.resources() == {"desk-eng"}
    assert_failed(client.login("alice", directory.passwords["dave"]))
    assert_ok(client.login("alice", directory.passwords["alice"]))
    result = check_identity(pki, tmp_path / "check", Domains="CORP", **keys)
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL") and dead in line for line in lines), lines
    assert any(line.startswith("ok") and directory.ldap_url in line and "StartTLS" in line for line in lines)
    assert_no_secrets(result.stdout + result.stderr + broker.logs(), *all_secrets(identity))


def test_foreign_ca_fails_both_tls_modes(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    other = TestPKI(tmp_path / "other-ca")
    keys = ldap_domain(directory, "CORP", f"{directory.ldaps_url}, {directory.ldap_url}", LdapCaCert=other.ca)
    broker = start_identity_broker(pki, tmp_path / "broker", "foreign-ca", **keys)
    processes.append(broker)
    admin(broker, pki, "PUT", f"/users/LAB/{LOCAL_USER}", {"password": LOCAL_PW})
    client = BrokerClient(broker, pki)
    assert_unavailable(client.login("alice", directory.passwords["alice"]))
    assert "TLS failure" in broker.logs()
    assert_ok(client.login(LOCAL_USER, LOCAL_PW, "LAB"))
    result = check_identity(pki, tmp_path / "check", Domains="CORP", **keys)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and all("TLS failure" in line for line in fails), result.stdout


def test_check_identity(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """The deploy-time check: 0 with every server fine; 1 naming the bind DN when the service
    account's password is wrong (and logins then fail as unavailable, not as wrong passwords)."""
    radius = identity.radius
    good = {**ldap_domain(directory, "CORP"), **radius_keys(radius)}
    result = check_identity(pki, tmp_path / "good", Domains="CORP", **good)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("ok") for line in lines), lines
    wrong_pw = tmp_path / "wrong.password"
    wrong_pw.write_text("not-the-" + directory.bind_password + "\n")
    bad = {**good, "Domain.CORP.LdapBindPasswordFile": wrong_pw}
    result = check_identity(pki, tmp_path / "bad", Domains="CORP", **bad)
    assert result.returncode == 1, result
    assert f"invalid credentials for {BIND_DN}" in result.stdout
    assert_no_secrets(result.stdout + result.stderr, *all_secrets(identity), wrong_pw.read_text().strip())
    broker = start_identity_broker(
        pki,
        tmp_path / "broker",
        "wrong-bind",
        **ldap_domain(directory, "CORP", LdapBindPasswordFile=wrong_pw),
    )
    processes.append(broker)
    assert_unavailable(BrokerClient(broker, pki).login("alice", directory.passwords["alice"]))
    assert f"invalid credentials for {BIND_DN}" in broker.logs()


def test_radius_timeout_and_failover(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """The first RADIUS server never answers (nothing listens): the second one decides. With
    the second one silent too (paused), the passcode step is unavailable after the timeouts."""
    radius = identity.radius
    dead = f"127.0.0.1:{nothing_listens()}"
    keys = {**ldap_domain(directory, "CORP"), **radius_keys(radius, f"{dead}, {radius.address}")}
    broker = start_identity_broker(
        pki, tmp_path / "broker", "radius-failover", SecondFactorDomains="CORP", **keys
    )
    processes.append(broker)
    client = BrokerClient(broker, pki)
    start = time.monotonic()
    assert_ok(client.login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))
    assert time.monotonic() - start >= 1.0  # one RadiusTimeout on the dead server
    radius.container.pause()
    try:
        start = time.monotonic()
        assert_unavailable(client.login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))
        assert 2.0 <= time.monotonic() - start < 10
    finally:
        radius.container.unpause()
    assert "no answer" in broker.logs()
    assert_ok(client.login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))


def test_radius_wrong_shared_secret(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    radius = identity.radius
    wrong = tmp_path / "radius.secret"
    wrong.write_text("wrong-" + radius.secret + "\n")
    keys = {**ldap_domain(directory, "CORP"), **radius_keys(radius, RadiusSecretFile=wrong)}
    broker = start_identity_broker(
        pki, tmp_path / "broker", "radius-secret", SecondFactorDomains="CORP", **keys
    )
    processes.append(broker)
    client = BrokerClient(broker, pki)
    assert_unavailable(client.login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))
    # The server drops requests whose Message-Authenticator does not verify: to the broker a
    # wrong shared secret looks like a server that does not answer, and the check says so.
    result = check_identity(pki, tmp_path / "check", Domains="CORP", **keys)
    assert result.returncode == 1
    radius_line = next(line for line in result.stdout.splitlines() if "radius" in line)
    assert radius_line.startswith("FAIL") and f"{radius.address}: no answer" in radius_line, radius_line
    assert_no_secrets(result.stdout + broker.logs(), *all_secrets(identity), wrong.read_text().strip())
    # The same configuration with the right secret logs alice in.
    fixed = start_identity_broker(
        pki,
        tmp_path / "fixed",
        "radius-secret-fixed",
        SecondFactorDomains="CORP",
        **{**keys, "RadiusSecretFile": radius.secret_file},
    )
    processes.append(fixed)
    assert_ok(BrokerClient(fixed, pki).login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))


def test_radius_unsigned_replies_are_not_trusted(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """Replies without Message-Authenticator (an older server; the test server sends them to the
    NAS-Identifier gatehouse-unsigned-replies) are ignored like forged ones (BlastRADIUS)."""
    keys = {
        **ldap_domain(directory, "CORP"),
        **radius_keys(identity.radius, RadiusNasIdentifier="gatehouse-unsigned-replies"),
    }
    broker = start_identity_broker(
        pki, tmp_path / "broker", "radius-unsigned", SecondFactorDomains="CORP", **keys
    )
    processes.append(broker)
    admin(broker, pki, "PUT", f"/users/LAB/{LOCAL_USER}", {"password": LOCAL_PW})
    client = BrokerClient(broker, pki)
    assert_unavailable(client.login("alice", directory.passwords["alice"], "CORP", ALICE_PASSCODE))
    assert "failed verification" in broker.logs()
    # LAB has no second factor here: its users are not affected.
    assert_ok(client.login(LOCAL_USER, LOCAL_PW, "LAB"))


# ---------------------------------------------------------------- TOTP


def test_totp_enrolment_and_codes(
    pki: TestPKI,
    identity: IdentityServers,
    directory: Directory,
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "totp.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    broker = start_identity_broker(
        pki,
        tmp_path / "broker",
        "totp",
        SecondFactor="totp",
        SecondFactorDomains="CORP",
        TotpKeyFile=key_file,
        TotpIssuer="Gatehouse Test",
        **ldap_domain(directory, "CORP"),
    )
    processes.append(broker)
    admin(broker, pki, "PUT", "/users/CORP/alice", {})
    enrolled = admin(broker, pki, "POST", "/users/CORP/alice/totp")
    uri = enrolled["otpauth_uri"]
    assert uri.startswith("otpauth://totp/")
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP) and totp.issuer == "Gatehouse Test"
    user = admin(broker, pki, "GET", "/users/CORP/alice")
    assert user["totp_enrolled"] is True
    assert totp.secret not in str(user)

    client = BrokerClient(broker, pki)
    now = time.time()
    code = totp.at(now)
    client.hello()
    assert_incomplete(client.password("alice", directory.passwords["alice"], "CORP"))
    assert_ok(client.passcode("alice", code, "CORP"))
    # The same code again: refused (a code works once), as is a wrong one.
    assert_failed(client.login("alice", directory.passwords["alice"], "CORP", code))
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert_failed(client.login("alice", directory.passwords["alice"], "CORP", wrong))
    # bob has no TOTP secret: no code gets him in.
    assert_failed(client.login("bob", directory.passwords["bob"], "CORP", totp.at(now + 30)))
    # The next time step's code (within the accepted window) logs alice in again.
    assert_ok(client.login("alice", directory.passwords["alice"], "CORP", totp.at(now + 30)))
    assert_no_secrets(broker.logs(), *all_secrets(identity), totp.secret, key_file.read_text().strip())
