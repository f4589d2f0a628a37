"""Two sites as real processes on loopback: one broker, and per site a CM, an SG and an agent.

Site A: cm-a, sg-a, desk-a (reports its load) and desk-a2 (registered, never reports); site B:
cm-b, sg-b, desk-b. Both CMs know both sites' gateways (``SiteGateways``) and share one grant
secret; each SG accepts only grants sealed for its own site (docs/multisite.md).

- A client that logs in at site A's CM and is allocated site B's desktop gets site B's gateway as
  its target and runs a full session (TCP and UDP echo) through sg-b; and the other way round.
- A grant minted for site B is refused by site A's SG (and still accepted by site B's), a grant
  without a site is refused by both; a desktop of a site no CM knows a gateway for is refused by
  the CM before any agent is asked.
- The client with [site A's CM, site B's CM] fails over to B when A's CM is stopped or does not
  answer within the per-attempt deadline, and the session works; the command line says which CM
  served.
- When site A's agents stop reporting, site A is down: none of its desktops is offered (also the
  one that never reported), a pool spanning both sites places on site B, and site B's desktop is
  still offered; site A is up again with its agent's next report.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pki as pkimod
import pytest
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

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import CmConnection, SessionReport, run_failover, run_session, session_channel
from gatehouse.grant import GrantSealer, decode_secret, generate_secret

ADMIN_TOKEN = "admin-token-" + "9f8e7d6c5b4a39281706"
PASSWORD = "Site-User-pw!42"
SECRET = generate_secret()
STALE_AFTER = 5  # AgentStaleAfter: agents report every 2 s


@dataclass
class Sites:
    pki: pkimod.TestPKI
    broker_url: str
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ctx(self):
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def admin(self, method: str, path: str, body: object | None = None) -> dict:
        return broker_admin(self.broker_url, ADMIN_TOKEN, self.ctx, method, path, body)

    def cm(self, name: str) -> str:
        return f"https://127.0.0.1:{port(self.procs[name])}"

    def sg_port(self, name: str) -> int:
        return port(self.procs[name], "Port")

    def site_state(self, site: str) -> str:
        return {s["name"]: s["state"] for s in self.admin("GET", "/sites")["sites"]}.get(site, "")


def port(proc: ServiceProcess, key: str = "ListenPort") -> int:
    return int(str(proc.config[key]))


@pytest.fixture(scope="module")
def sites(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    root = tmp_path_factory.mktemp("multisite")
    procs: dict[str, ServiceProcess] = {}
    try:
        procs["broker"] = start_broker(
            pki, root / "broker", "ms-broker", ADMIN_TOKEN, AgentStaleAfter=STALE_AFTER
        )
        broker_url = f"https://127.0.0.1:{port(procs['broker'])}"
        st = Sites(pki, broker_url, procs)
        for name, address in (("desk-a", "127.0.0.2"), ("desk-b", "127.0.0.3")):
            procs[name] = start_agent(pki, root / name, f"ms-{name}", name, address, broker_url)
        for site in ("a", "b"):
            procs[f"sg-{site}"] = start_sg(
                pki, root / f"sg-{site}", f"ms-sg-{site}", SECRET, Site=f"site-{site}"
            )
        gateways = ",".join(f"site-{s}=127.0.0.1:{st.sg_port(f'sg-{s}')}" for s in ("a", "b"))
        cm_certs = pki.issue("ms-cm", ["localhost", "127.0.0.1"])
        for site in ("a", "b"):
            procs[f"cm-{site}"] = start_cm(
                root / f"cm-{site}",
                cm_config(
                    pki,
                    cm_certs,
                    broker_url,
                    SecurityGatewayEnabled=True,
                    ExternalPcoipIp="127.0.0.1",
                    SecurityGatewayPort=st.sg_port(f"sg-{site}"),
                    Site=f"site-{site}",
                    SiteGateways=gateways,
                ),
                SECRET,
            )
        seed(st)
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def seed(st: Sites) -> None:
    for name, site in (("desk-a", "site-a"), ("desk-b", "site-b")):
        agent = st.procs[name]
        st.admin(
            "PUT",
            f"/desktops/{name}",
            {
                "address": str(agent.config["AdvertiseAddress"]),
                "hostname": f"{name}.test",
                "agent_port": port(agent, "ControlPort"),
                "session_port": port(agent, "SessionPort"),
                "site": site,
            },
        )
    # Registered at site A, its agent never reports (nothing listens there).
    st.admin(
        "PUT", "/desktops/desk-a2", {"address": "127.0.0.4", "agent_port": free_port(), "site": "site-a"}
    )
    # A site no CM has a gateway for.
    st.admin("PUT", "/desktops/desk-c", {"address": "127.0.0.5", "agent_port": free_port(), "site": "site-c"})
    st.admin("PUT", "/pools/global", {"members": ["desk-a", "desk-b"]})
    st.admin("PUT", "/users/CORP/sam", {"password": PASSWORD})
    for desktop in ("desk-a", "desk-a2", "desk-b", "desk-c"):
        st.admin("PUT", f"/entitlements/user/CORP/sam/desktop/{desktop}")
    st.admin("PUT", "/entitlements/user/CORP/sam/pool/global")
    wait_for(lambda: st.site_state("site-a") == "up" and st.site_state("site-b") == "up", "both sites up")


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def session(st: Sites, cm: str, resource: str, **options: object) -> SessionReport:
    return asyncio.run(
        run_session(
            st.cm(cm), "sam", PASSWORD, domain="CORP", resource=resource, ssl_context=st.ctx, **options
        )
    )


def assert_ok(report: SessionReport) -> None:
    failed = [s for s in report.steps if not s.ok]
    assert report.ok, f"failed steps: {failed}"
    assert [s.name for s in report.steps][-3:] == ["tcp-echo", "udp-echo", "bye"]


def listed(st: Sites, cm: str) -> dict[str, str]:
    """Resource name -> state, as the user sees them at ``cm``."""

    async def run() -> dict[str, str]:
        conn = CmConnection(st.cm(cm), st.ctx)
        try:
            assert isinstance(await conn.send(p.Hello()), p.HelloResp)
            auth = await conn.send(p.Authenticate("sam", PASSWORD, "CORP"))
            assert isinstance(auth, p.AuthenticateResp) and auth.result_id == p.AUTH_OK, auth
            reply = await conn.send(p.GetResourceList())
            assert isinstance(reply, p.GetResourceListResp), reply
            await conn.send(p.Bye())
            return {r.name: r.state for r in reply.resources}
        finally:
            await conn.close()

    return asyncio.run(run())


# ---------------------------------------------------------------- routing across sites


@pytest.mark.parametrize(("cm", "desktop", "sg"), [("cm-a", "desk-b", "sg-b"), ("cm-b", "desk-a", "sg-a")])
def test_a_desktop_of_the_other_site_is_reached_through_its_sites_gateway(
    sites: Sites, cm: str, desktop: str, sg: str
) -> None:
    report = session(sites, cm, desktop)
    assert_ok(report)
    assert report.target == f"127.0.0.1:{sites.sg_port(sg)}"
    assert report.session_id in sites.procs[sg].logs()


@pytest.mark.parametrize(("cm", "desktop", "sg"), [("cm-a", "desk-a", "sg-a"), ("cm-b", "desk-b", "sg-b")])
def test_a_desktop_of_the_own_site_is_reached_through_the_own_gateway(
    sites: Sites, cm: str, desktop: str, sg: str
) -> None:
    report = session(sites, cm, desktop)
    assert_ok(report)
    assert report.target == f"127.0.0.1:{sites.sg_port(sg)}"


def test_a_grant_for_site_b_is_refused_by_site_a_and_a_grant_without_a_site_by_both(sites: Sites) -> None:
    async def run() -> tuple[SessionReport, SessionReport, SessionReport, SessionReport]:
        conn = CmConnection(sites.cm("cm-a"), sites.ctx)
        try:
            assert isinstance(await conn.send(p.Hello()), p.HelloResp)
            auth = await conn.send(p.Authenticate("sam", PASSWORD, "CORP"))
            assert isinstance(auth, p.AuthenticateResp) and auth.result_id == p.AUTH_OK
            listing = await conn.send(p.GetResourceList())
            assert isinstance(listing, p.GetResourceListResp)
            rid = next(r.resource_id for r in listing.resources if r.name == "desk-b")
            reply = await conn.send(p.AllocateResource(rid))
            assert isinstance(reply, p.AllocateResourceResp) and reply.target is not None, reply
            target = reply.target
            assert target.port == sites.sg_port("sg-b")
            reports = []
            # The grant for site B at site A's gateway first (refused, so not spent), then at B's.
            for sg in ("sg-a", "sg-b"):
                report = SessionReport(url="")
                address = ("127.0.0.1", sites.sg_port(sg))
                await session_channel(report, target, "127.0.0.1", sites.ctx, 4096, 1, None, 10.0, address)
                reports.append(report)
            # A grant sealed without a site (a single-site CM's) for the same agent session.
            unsited = GrantSealer(decode_secret(SECRET)).mint(
                target.session_id, "127.0.0.3", 1, "tag", "127.0.0.1"
            )
            for sg in ("sg-a", "sg-b"):
                report = SessionReport(url="")
                forged = p.Target("127.0.0.1", sites.sg_port(sg), target.session_id, unsited)
                await session_channel(report, forged, "127.0.0.1", sites.ctx, 16, 0, None, 10.0)
                reports.append(report)
            await conn.send(p.Bye())
            return tuple(reports)  # type: ignore[return-value]
        finally:
            await conn.close()

    at_a, at_b, unsited_a, unsited_b = asyncio.run(run())
    step = at_a.step("connect")
    assert step is not None and not step.ok and step.result == "403 Forbidden"
    assert [s.ok for s in at_b.steps] == [True, True, True], at_b.steps
    for report in (unsited_a, unsited_b):
        step = report.step("connect")
        assert step is not None and step.result == "403 Forbidden"
    assert "refused: forged" in sites.procs["sg-a"].logs()
    assert "refused: forged" in sites.procs["sg-b"].logs()


def test_a_desktop_of_a_site_without_a_known_gateway_is_refused_before_its_agent(sites: Sites) -> None:
    report = session(sites, "cm-a", "desk-c", connect=False)
    step = report.step("allocate-resource")
    assert step is not None and not step.ok and step.result == p.ALLOC_FAILED
    logs = sites.procs["cm-a"].logs()
    assert "no gateway is configured for site 'site-c'" in logs
    assert "127.0.0.5:" not in logs  # no launch-session was tried


# ---------------------------------------------------------------- primary and secondary connections


class Blackhole:
    """A TCP port that accepts connections and never answers (a CM hanging in its TLS handshake)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", free_port()))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def test_the_client_fails_over_to_the_secondary_cm_when_the_primary_is_stopped(sites: Sites) -> None:
    primary = sites.procs["cm-a"]
    primary.stop()
    try:
        report = asyncio.run(
            run_failover(
                [sites.cm("cm-a"), sites.cm("cm-b")],
                "sam",
                PASSWORD,
                attempt_timeout=3.0,
                domain="CORP",
                resource="desk-a",
                ssl_context=sites.ctx,
            )
        )
    finally:
        primary.start()
    assert_ok(report)
    assert report.url == sites.cm("cm-b")
    assert [(a.url, a.ok, a.result) for a in report.attempts] == [
        (sites.cm("cm-a"), False, "CONNECTION_FAILED"),
        (sites.cm("cm-b"), True, "OK"),
    ]
    assert report.target == f"127.0.0.1:{sites.sg_port('sg-a')}"  # desk-a is still site A's


def test_a_primary_that_does_not_answer_is_left_after_the_attempt_deadline(sites: Sites) -> None:
    hole = Blackhole()
    try:
        started = time.monotonic()
        report = asyncio.run(
            run_failover(
                [hole.url, sites.cm("cm-b")],
                "sam",
                PASSWORD,
                attempt_timeout=1.5,
                domain="CORP",
                resource="desk-b",
                ssl_context=sites.ctx,
            )
        )
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert_ok(report)
    assert [(a.ok, a.result) for a in report.attempts] == [(False, "TIMEOUT"), (True, "OK")]
    assert 1.5 <= report.attempts[0].ms / 1000 < 5 and elapsed < 30


def test_the_command_line_takes_a_list_of_cms_and_says_which_one_served(sites: Sites) -> None:
    dead = f"https://127.0.0.1:{free_port()}"
    env = {**os.environ, "MS_PW": PASSWORD}
    argv = [sys.executable, "-m", "gatehouse.client", "--url", f"{dead},{sites.cm('cm-b')}"]
    argv += ["--user", "sam", "--domain", "CORP", "--password-env", "MS_PW", "--ca-cert", str(sites.pki.ca)]
    argv += ["--resource", "desk-b", "--attempt-timeout", "3", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["url"] == sites.cm("cm-b")
    assert [(a["url"], a["result"]) for a in report["attempts"]] == [
        (dead, "CONNECTION_FAILED"),
        (sites.cm("cm-b"), "OK"),
    ]
    human = subprocess.run(
        [*argv[:-1], "--url", sites.cm("cm-a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert human.returncode == 0, human.stdout + human.stderr
    assert f"unreachable {dead}: CONNECTION_FAILED" in human.stdout
    assert f"session to {sites.cm('cm-b')}" in human.stdout


# ---------------------------------------------------------------- a site that is down (last: stops an agent)


def test_a_site_whose_agents_stopped_reporting_is_down_and_its_desktops_are_not_offered(sites: Sites) -> None:
    before = listed(sites, "cm-b")
    assert before["desk-a"] == before["desk-a2"] == before["desk-b"] == "ONLINE"
    agent = sites.procs["desk-a"]
    agent.stop()
    try:
        wait_for(lambda: sites.site_state("site-a") == "down", "site A down", timeout=STALE_AFTER + 15)
        for cm in ("cm-a", "cm-b"):
            now = listed(sites, cm)
            # desk-a2 never reported: it is not offered because its site is down.
            assert (now["desk-a"], now["desk-a2"], now["desk-b"], now["global"]) == (
                "OFFLINE",
                "OFFLINE",
                "ONLINE",
                "ONLINE",
            ), now
        refused = session(sites, "cm-b", "desk-a2", connect=False)
        step = refused.step("allocate-resource")
        assert step is not None and step.result == p.ALLOC_UNAVAILABLE
        for attempt in range(2):  # the pool spans both sites: only site B's member is placed
            report = session(sites, "cm-a", "global")
            assert_ok(report)
            assert report.target == f"127.0.0.1:{sites.sg_port('sg-b')}", attempt
        assert sites.site_state("site-b") == "up"
    finally:
        agent.start()
    wait_for(lambda: sites.site_state("site-a") == "up", "site A up again")
    assert listed(sites, "cm-b")["desk-a2"] == "ONLINE"
