"""The CM with Workers=2 as real processes (a supervisor and two forked workers) on loopback.

The kernel hands a new connection to the worker its source port names (the port's bits folded,
modulo the workers: gatehouse.cm.__main__.worker_for_port), so each request here opens a connection from a port
chosen for the worker it must reach. A session lives in the worker that answered its hello (its
cookie ends in ".<worker>"); what must hold across workers: its cookie works on every worker,
MaxClients and MaxConcurrentEstablishments are each one limit for all workers, an invitation is
redeemed on another worker (once), a killed worker is replaced while the other's sessions go on,
and SIGTERM drains both.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pki as pkimod
import pytest
from services import (
    ServiceProcess,
    alive,
    broker_admin,
    cm_config,
    free_port,
    start_agent,
    start_broker,
    start_cm,
)
from sg_helpers import metrics, wait_for

from gatehouse import protocol as p
from gatehouse import tls
from gatehouse.client.flow import Holding, run_session
from gatehouse.cm.__main__ import worker_for_port
from gatehouse.grant import generate_secret

WORKERS = 2
ENV = "pcoip-client"
ADMIN_TOKEN = "admin-token-" + "0c3a77e1f4b2d9c8e5a6"
PASSWORDS = {"alice": "Alice-Workers-pw!1", "bob": "Bob-Workers-pw#2", "carol": "Carol-Workers-pw$3"}
SECRET = generate_secret()


@dataclass
class Stack:
    pki: pkimod.TestPKI
    root: Path
    broker_url: str
    slow_agent: socket.socket
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def ctx(self) -> ssl.SSLContext:
        return tls.client_context(self.pki.ca, verify=True, role="sg")

    def start_cm(self, name: str, **config: object) -> Cm:
        certs = self.pki.issue("workers-cm", ["localhost", "127.0.0.1"])
        values = cm_config(self.pki, certs, self.broker_url, Workers=WORKERS, **config)
        self.procs[name] = proc = start_cm(self.root / name, values, SECRET)
        cm = Cm(proc, self.ctx)
        wait_for(lambda: cm.running() == WORKERS, "both workers")
        return cm


@dataclass
class Cm:
    proc: ServiceProcess
    ctx: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.proc.config['ListenPort']}"

    def running(self) -> float:
        """Workers running; 0 while the supervisor waits for its workers to serve their metrics."""
        try:
            return self.metrics()["gatehouse_cm_workers_running"]
        except OSError:
            return 0

    def metrics(self) -> dict[str, float]:
        return metrics(int(self.proc.config["AdminPort"]))

    async def ask(self, worker: int, message: p.Message, cookie: str = "") -> tuple[int, p.Message, str]:
        """``message`` on a new connection that worker ``worker`` accepts: (status, answer, the
        cookie set, else the one sent)."""
        connector = aiohttp.TCPConnector(
            ssl=self.ctx, local_addr=("127.0.0.1", port_for(worker)), force_close=True
        )
        headers = {"Content-Type": p.CONTENT_TYPE}
        if cookie:
            headers["Cookie"] = f"JSESSIONID={cookie}"
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.post(
                self.url + p.PATH_BROKER, data=p.render(ENV, message), headers=headers
            ) as resp:
                assert resp.headers.get("Transfer-Encoding") == "chunked"
                answer = p.parse(await resp.read(), ENV)
                morsel = resp.cookies.get("JSESSIONID")
                return resp.status, answer, morsel.value if morsel is not None and morsel.value else cookie

    async def login(self, user: str, hello_on: int, auth_on: int) -> str:
        """``user``'s session begun on worker ``hello_on`` and authenticated on ``auth_on``: its cookie."""
        _status, reply, cookie = await self.ask(hello_on, p.Hello(client_info=p.ClientInfo(product_name="t")))
        assert isinstance(reply, p.HelloResp), reply
        status, reply, cookie = await self.ask(auth_on, p.Authenticate(user, PASSWORDS[user], "CORP"), cookie)
        assert status == 200 and isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK, reply
        return cookie

    async def resources(self, worker: int, cookie: str) -> list[str]:
        _status, reply, _cookie = await self.ask(worker, p.GetResourceList(), cookie)
        assert isinstance(reply, p.GetResourceListResp), reply
        return sorted(r.name for r in reply.resources)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.proc.logs().splitlines() if line.startswith("{")]


_USED_PORTS: set[int] = set()


def port_for(worker: int) -> int:
    """A free local port that the CM's steering gives to ``worker`` (never one used before here:
    the port of a closed connection waits in TIME_WAIT)."""
    while True:
        port = free_port()
        if worker_for_port(port, WORKERS) == worker and port not in _USED_PORTS:
            _USED_PORTS.add(port)
            return port


def owner(cookie: str) -> int:
    return int(cookie.rpartition(".")[2])


@pytest.fixture(scope="module")
def stack(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("cm-workers")
    procs: dict[str, ServiceProcess] = {}
    # An agent that accepts TCP (the kernel's backlog) and never answers: an allocation on it holds
    # its establishment slot until AgentTimeout.
    slow = socket.create_server(("127.0.0.4", 0), backlog=16)
    try:
        procs["broker"] = start_broker(pki, root / "broker", "workers-broker", ADMIN_TOKEN)
        broker_url = f"https://127.0.0.1:{procs['broker'].config['ListenPort']}"
        procs["desk-a"] = start_agent(
            pki, root / "desk-a", "workers-desk-a", "desk-a", "127.0.0.2", broker_url
        )
        st = Stack(pki, root, broker_url, slow, procs)
        desks = {
            "desk-a": (
                "127.0.0.2",
                procs["desk-a"].config["ControlPort"],
                procs["desk-a"].config["SessionPort"],
            ),
            "desk-slow": ("127.0.0.4", slow.getsockname()[1], 9),
        }
        for name, (address, control, session_port) in desks.items():
            body = {
                "address": address,
                "hostname": f"{name}.test",
                "agent_port": control,
                "session_port": session_port,
            }
            broker_admin(broker_url, ADMIN_TOKEN, st.ctx, "PUT", f"/desktops/{name}", body)
        for user, pw in PASSWORDS.items():
            broker_admin(broker_url, ADMIN_TOKEN, st.ctx, "PUT", f"/users/CORP/{user}", {"password": pw})
        for user, desk in (("alice", "desk-a"), ("bob", "desk-slow"), ("carol", "desk-a")):
            broker_admin(
                broker_url, ADMIN_TOKEN, st.ctx, "PUT", f"/entitlements/user/CORP/{user}/desktop/{desk}"
            )
        yield st
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        slow.close()


# ---------------------------------------------------------------- sessions on every worker


async def test_a_cookie_is_served_by_every_worker(stack: Stack) -> None:
    cm = stack.start_cm("cm-cookie")
    # Begun on worker 0, authenticated through worker 1: the session stays worker 0's.
    cookie = await cm.login("alice", hello_on=0, auth_on=1)
    assert owner(cookie) == 0
    assert await cm.resources(0, cookie) == ["desk-a"]
    assert await cm.resources(1, cookie) == ["desk-a"]
    m = cm.metrics()
    assert m['gatehouse_cm_forwarded_requests_total{outcome="answered"}'] == 2  # authenticate, list
    assert m['gatehouse_cm_worker_sessions_active{worker="0"}'] == 1
    assert m['gatehouse_cm_worker_sessions_active{worker="1"}'] == 0
    # Both requests were answered by worker 0, for the client's own address.
    listed = [e for e in cm.log_lines() if e.get("request") == "get-resource-list"]
    assert [(e["worker"], e["client_ip"]) for e in listed] == [(0, "127.0.0.1")] * 2
    # A session begun on worker 1 is worker 1's.
    cookie1 = await cm.login("carol", hello_on=1, auth_on=0)
    assert owner(cookie1) == 1
    assert await cm.resources(0, cookie1) == ["desk-a"]
    # bye through the other worker ends the session in its own.
    _status, reply, _cookie = await cm.ask(1, p.Bye(), cookie)
    assert isinstance(reply, p.ByeResp)
    _status, reply, _cookie = await cm.ask(0, p.GetResourceList(), cookie)
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH
    # A cookie naming no worker of this CM finds no session (and is not forwarded).
    _status, reply, _cookie = await cm.ask(0, p.GetResourceList(), cookie1.rpartition(".")[0] + ".7")
    assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH


async def test_max_clients_is_one_limit_across_workers(stack: Stack) -> None:
    cm = stack.start_cm("cm-clients", MaxClients=3)
    cookies = [
        await cm.login("alice", 0, 0),
        await cm.login("carol", 1, 1),
        await cm.login("alice", 1, 0),
    ]
    assert sorted(owner(c) for c in cookies) == [0, 1, 1]
    assert cm.metrics()["gatehouse_cm_sessions_active"] == 3
    # The fourth is refused on either worker, though neither holds three.
    for worker in (0, 1):
        status, reply, _cookie = await cm.ask(worker, p.Hello(client_info=p.ClientInfo(product_name="t")))
        assert status == 503 and isinstance(reply, p.ErrorResp) and reply.result_id == p.E_BUSY, reply
    # One leaves (on worker 1): the next login on worker 0 gets its place, and no more.
    _status, reply, _cookie = await cm.ask(0, p.Bye(), cookies[1])
    assert isinstance(reply, p.ByeResp)
    cookies[1] = await cm.login("carol", 0, 0)
    status, reply, _cookie = await cm.ask(1, p.Hello(client_info=p.ClientInfo(product_name="t")))
    assert status == 503, reply
    assert cm.metrics()['gatehouse_cm_busy_refusals_total{limit="max_clients"}'] == 3


async def test_max_concurrent_establishments_is_one_limit_across_workers(stack: Stack) -> None:
    cm = stack.start_cm("cm-establish", MaxConcurrentEstablishments=1, AgentTimeout=3)
    bob = await cm.login("bob", 0, 0)
    alice = await cm.login("alice", 1, 1)
    slow_id = dict(await list_ids(cm, 0, bob))["desk-slow"]
    desk_a = dict(await list_ids(cm, 1, alice))["desk-a"]
    # bob's allocation holds the one slot (its agent never answers) on worker 0...
    slow = asyncio.create_task(cm.ask(0, p.AllocateResource(slow_id), bob))
    await wait_until(lambda: cm.metrics()["gatehouse_cm_establishments_in_flight"] == 1)
    # ...so alice's on worker 1 is refused at once,
    status, reply, _cookie = await cm.ask(1, p.AllocateResource(desk_a), alice)
    assert status == 503 and isinstance(reply, p.ErrorResp) and reply.result_id == p.E_BUSY, reply
    _status, reply, _cookie = await slow
    assert isinstance(reply, p.AllocateResourceResp) and "Timeout" in reply.result_str, reply
    # ...and gets the slot once bob's has ended.
    _status, reply, _cookie = await cm.ask(1, p.AllocateResource(desk_a), alice)
    assert isinstance(reply, p.AllocateResourceResp) and reply.result_id == p.ALLOC_OK, reply


async def list_ids(cm: Cm, worker: int, cookie: str) -> list[tuple[str, str]]:
    _status, reply, _cookie = await cm.ask(worker, p.GetResourceList(), cookie)
    assert isinstance(reply, p.GetResourceListResp), reply
    return [(r.name, r.resource_id) for r in reply.resources]


async def wait_until(check: Callable[[], bool]) -> None:
    for _attempt in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_an_invitation_is_redeemed_on_another_worker_once(stack: Stack) -> None:
    cm = stack.start_cm("cm-invite")
    replies: list[p.Message] = []

    async def hold(session: Holding) -> None:
        code = await session.invite()
        assert code is not None
        other = 1 - int(code.rpartition("-")[2])  # the code names its worker: the collaborator is elsewhere
        for user in ("carol", "bob"):  # the second is too late: the code is used
            collaborator = await cm.login(user, other, other)
            assert owner(collaborator) == other
            replies.append((await cm.ask(other, p.RedeemInvitation(code), collaborator))[1])

    report = await run_session(
        cm.url,
        "alice",
        PASSWORDS["alice"],
        domain="CORP",
        resource="desk-a",
        ssl_context=stack.ctx,
        hold=hold,
    )
    assert report.ok, [s for s in report.steps if not s.ok]
    joined, again = replies
    assert isinstance(joined, p.RedeemInvitationResp) and joined.result_id == p.JOIN_OK, joined
    assert joined.target is not None
    assert isinstance(again, p.RedeemInvitationResp) and again.result_id == p.JOIN_USED, again
    m = cm.metrics()
    assert m["gatehouse_cm_invitations_redeemed_total"] == 1
    assert m['gatehouse_cm_invitations_refused_total{reason="used"}'] == 1


async def test_forged_worker_tags_cost_their_sender_one_hop_and_find_nothing(stack: Stack) -> None:
    """A client may name any worker in a cookie: 60 guessed cookies of worker 1's shape, sent to
    worker 0 at once, are each forwarded once and answered as without a session, while a real
    session is served on both workers."""
    cm = stack.start_cm("cm-forged")
    cookie = await cm.login("alice", hello_on=1, auth_on=1)
    forged = [secrets.token_urlsafe(32) + ".1" for _guess in range(60)]
    replies = await asyncio.gather(*(cm.ask(0, p.GetResourceList(), guess) for guess in forged))
    assert {(status, getattr(reply, "result_id", "")) for status, reply, _cookie in replies} == {
        (200, p.E_USER_AUTH)
    }
    assert cm.metrics()['gatehouse_cm_forwarded_requests_total{outcome="answered"}'] == 60
    assert await cm.resources(0, cookie) == ["desk-a"]
    assert await cm.resources(1, cookie) == ["desk-a"]


async def test_a_stalled_worker_cannot_hold_the_other_workers_clients(stack: Stack) -> None:
    """The deadline of a forward: with worker 1 stopped (SIGSTOP), a request for its session that
    reaches worker 0 is answered 503 once the forward's deadline (2 x BrokerTimeout + AgentTimeout
    + 5 s) has passed, and worker 0 serves its own clients meanwhile."""
    cm = stack.start_cm("cm-stall", BrokerTimeout=3, AgentTimeout=2)
    on1 = await cm.login("carol", 1, 1)
    worker1 = cm.proc.worker_pids()[1]
    os.kill(worker1, signal.SIGSTOP)
    try:
        started = time.monotonic()
        stalled = asyncio.create_task(cm.ask(0, p.GetResourceList(), on1))
        on0 = await cm.login("alice", 0, 0)
        assert await cm.resources(0, on0) == ["desk-a"]
        assert not stalled.done(), "the forward to the stopped worker was answered before its deadline"
        status, reply, _cookie = await stalled
        waited = time.monotonic() - started
        assert status == 503 and isinstance(reply, p.ErrorResp) and reply.result_id == p.E_INTERNAL, reply
        assert 13.0 <= waited < 25.0, waited
    finally:
        os.kill(worker1, signal.SIGCONT)
    # Running again, worker 1 serves its session through worker 0 as before.
    assert await cm.resources(0, on1) == ["desk-a"]
    assert cm.metrics()['gatehouse_cm_forwarded_requests_total{outcome="timeout"}'] == 1


# ---------------------------------------------------------------- processes


async def test_a_hung_worker_is_killed_and_the_clients_queued_for_it_are_served(stack: Stack) -> None:
    """The watchdog: worker 1, stopped (SIGSTOP), answers none of the supervisor's probes; after
    WorkerHangTimeout it is killed and forked again, and a client whose connection the kernel
    queued for it meanwhile is served by the new worker. Worker 0's clients are served throughout."""
    cm = stack.start_cm("cm-hang", WorkerHangTimeout=3)
    on0 = await cm.login("alice", 0, 0)
    hung = cm.proc.worker_pids()[1]
    os.kill(hung, signal.SIGSTOP)
    started = time.monotonic()
    queued = asyncio.create_task(cm.login("carol", 1, 1))
    assert await cm.resources(0, on0) == ["desk-a"]
    cookie = await asyncio.wait_for(queued, 30)
    waited = time.monotonic() - started
    assert 3.0 <= waited < 15.0, waited
    assert owner(cookie) == 1 and await cm.resources(0, cookie) == ["desk-a"]
    m = cm.metrics()
    assert m['gatehouse_cm_worker_hangs_total{worker="1"}'] == 1
    assert m['gatehouse_cm_worker_restarts_total{worker="1"}'] == 1
    assert m['gatehouse_cm_worker_hangs_total{worker="0"}'] == 0
    assert cm.proc.worker_pids()[1] != hung and not alive(hung)
    killed = [e for e in cm.log_lines() if e.get("msg") == "worker answers no probe; killing it"]
    assert [e["worker"] for e in killed] == [1]
    assert await cm.resources(1, on0) == ["desk-a"]


async def test_a_killed_worker_is_replaced_and_sigterm_drains_both(stack: Stack) -> None:
    cm = stack.start_cm("cm-kill")
    pids = cm.proc.worker_pids()
    assert sorted(pids) == [0, 1]
    on0 = await cm.login("alice", 0, 0)
    on1 = await cm.login("carol", 1, 1)
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: cm.metrics().get('gatehouse_cm_worker_restarts_total{worker="1"}') == 1, "the restart")
    wait_for(lambda: cm.running() == WORKERS, "both running")
    assert cm.proc.worker_pids()[0] == pids[0]
    # Worker 0's session goes on, through either worker.
    assert await cm.resources(0, on0) == ["desk-a"]
    assert await cm.resources(1, on0) == ["desk-a"]
    # Worker 1's session died with it (its client logs in again), and gave back its MaxClients place.
    for worker in (0, 1):
        _status, reply, _cookie = await cm.ask(worker, p.GetResourceList(), on1)
        assert isinstance(reply, p.ErrorResp) and reply.result_id == p.E_USER_AUTH, reply
    assert cm.metrics()["gatehouse_cm_sessions_active"] == 1
    assert owner(await cm.login("carol", 1, 0)) == 1
    # SIGTERM: each worker drains and stops, then the supervisor.
    workers_now = cm.proc.worker_pids().values()
    assert cm.proc.stop() == 0
    for pid in workers_now:
        assert not alive(pid)
    assert cm.proc.logs().count('"msg": "stopped"') >= 1
    stopped = [e for e in cm.log_lines() if e.get("msg") == "worker stopped"]
    assert sorted(e["worker"] for e in stopped) == [0, 1]


def test_no_secret_reaches_the_logs(stack: Stack) -> None:
    for name, proc in stack.procs.items():
        text = proc.logs()
        for secret in PASSWORDS.values():
            assert secret not in text, name
