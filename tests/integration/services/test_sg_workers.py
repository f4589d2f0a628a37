"""The SG with Workers=2 as real processes (a supervisor and two forked workers) on loopback.

Each client address is steered to one worker (gatehouse.sg.workers.worker_for, the same function
as the kernel's BPF program), so the tests pick loopback source addresses by the worker they land
on and prove it with the per-worker series of /metrics. What must hold across workers:
MaxConnections exactly at its value, a grant accepted once (a replay through another forwarder
reaches the other worker), a killed worker replaced while the other worker's sessions go on.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import TestPKI as PKI
from services import ServiceProcess, alive
from sg_helpers import (
    client_ctx,
    closed_by_peer,
    echo_both_ways,
    read_line,
    udp_bind,
    wait_for,
)
from test_sg_agent import SEEN_SECRETS, Agent, Gateway, start_agent, start_sg

from gatehouse.linechan import FORBIDDEN, OK, connect_line
from gatehouse.sg import proxyproto
from gatehouse.sg.workers import worker_for

WORKERS = 2


def sources(worker: int, count: int, start: int = 1) -> list[str]:
    """``count`` loopback addresses that the SG's steering sends to ``worker``."""
    found = []
    last = start
    while len(found) < count:
        ip = f"127.0.0.{last}"
        if worker_for(ip, WORKERS) == worker:
            found.append(ip)
        last += 1
    return found


def per_worker(sg: Gateway, name: str) -> dict[str, float]:
    m = sg.metrics()
    return {str(w): m.get(f'{name}{{worker="{w}"}}', -1.0) for w in range(WORKERS)}


@pytest.fixture(autouse=True)
def no_secrets_in_logs(processes: list[ServiceProcess]) -> Iterator[None]:
    SEEN_SECRETS.clear()
    yield
    for proc in processes:
        proc.stop()
        logs = proc.logs()
        for secret in SEEN_SECRETS:
            assert secret not in logs, f"a secret leaked into the {proc.service} log"


def refused_at_accept(sg: Gateway, source: str) -> bool:
    """The SG closes a connection from ``source`` before any TLS (MaxConnections, per-source)."""
    try:
        sock = sg.open(source)
    except (OSError, ssl.SSLError):
        return True
    with sock:
        return closed_by_peer(sock)


def session(sg: Gateway, agent: Agent, client: str) -> tuple[ssl.SSLSocket, str]:
    sid, tag = agent.launch(client)
    grant = sg.mint(agent, sid, tag, client_ip=client)
    sock, answer = sg.connect(grant, client)
    assert answer == OK
    return sock, grant


def test_sources_spread_over_workers_and_limits_hold_across_them(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    sg = start_sg(
        pki,
        tmp_path,
        processes,
        Workers=WORKERS,
        MaxConnections=5,
        MaxConnectionsPerSource=3,
        RequestTimeout=30,
    )
    a = sources(0, 2)
    b = sources(1, 1)
    m = sg.metrics()
    assert m["gatehouse_sg_workers"] == WORKERS
    assert m["gatehouse_sg_workers_running"] == WORKERS
    assert m["gatehouse_sg_max_connections"] == 5

    held = [sg.open(a[0]) for _attempt in range(3)]  # worker 0, up to its per-source cap
    assert refused_at_accept(sg, a[0])  # the fourth from that source
    wait_for(
        lambda: sg.metrics().get('gatehouse_sg_sessions_refused_total{reason="per-source"}') == 1,
        "per-source",
    )
    held += [sg.open(b[0]) for _attempt in range(2)]  # worker 1: five in all, MaxConnections
    wait_for(lambda: per_worker(sg, "gatehouse_sg_worker_connections_open") == {"0": 3, "1": 2}, "3 + 2 open")
    assert sg.metrics()["gatehouse_sg_connections_open"] == 5

    # Either worker refuses the sixth: the limit is the sum across workers, not each worker's.
    assert refused_at_accept(sg, b[0])  # worker 1 holds only 2 and this source only 2
    assert refused_at_accept(sg, a[1])  # a fresh source of worker 0
    wait_for(lambda: sg.metrics().get('gatehouse_sg_sessions_refused_total{reason="busy"}') == 2, "two busy")

    held.pop(0).close()  # a slot of worker 0 comes free: worker 1 may use it
    wait_for(lambda: sg.metrics()["gatehouse_sg_connections_open"] == 4, "the slot given back")
    held.append(sg.open(b[0]))
    wait_for(lambda: per_worker(sg, "gatehouse_sg_worker_connections_open") == {"0": 2, "1": 3}, "2 + 3 open")
    assert refused_at_accept(sg, a[1])
    for sock in held:
        sock.close()
    wait_for(lambda: sg.metrics()["gatehouse_sg_connections_open"] == 0, "all closed")


def test_a_grant_replayed_to_the_other_worker_is_refused(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    # Two forwarders (ProxyProtocolSources) that land on different workers, both naming the client.
    f0, f1 = sources(0, 1, start=10)[0], sources(1, 1, start=10)[0]
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS, ProxyProtocolSources=f"{f0}/32,{f1}/32")
    client = "127.0.0.1"

    def through(forwarder: str) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", sg.port), timeout=10, source_address=(forwarder, 0))
        raw.sendall(proxyproto.build((client, 40000), ("127.0.0.1", sg.port)))
        return client_ctx().wrap_socket(raw)

    sid, tag = agent.launch(client)
    grant = sg.mint(agent, sid, tag, client_ip=client)
    with through(f0) as first:
        first.sendall(connect_line(grant))
        assert read_line(first) == OK
        assert echo_both_ways(first, b"first") == b"first"
        assert per_worker(sg, "gatehouse_sg_worker_sessions_accepted_total") == {"0": 1, "1": 0}

        with through(f1) as replay:
            wait_for(lambda: per_worker(sg, "gatehouse_sg_worker_connections_open")["1"] == 1, "on worker 1")
            replay.sendall(connect_line(grant))
            assert read_line(replay) == FORBIDDEN
        m = sg.metrics()
        assert m['gatehouse_sg_sessions_refused_total{reason="replayed"}'] == 1
        assert m["gatehouse_sg_sessions_accepted_total"] == 1
        # The refused replay did not disturb the session.
        assert echo_both_ways(first, b"still here") == b"still here"
    assert "replayed" in sg.proc.logs()


def test_a_killed_worker_is_replaced_and_sigterm_drains_both(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS)
    c0, c1 = sources(0, 1)[0], sources(1, 1)[0]
    pids = sg.proc.worker_pids()
    assert sorted(pids) == [0, 1]

    # A session with TCP and UDP on worker 1: its client's datagrams reach the same worker.
    sock1, grant1 = session(sg, agent, c1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((c1, 0))
        udp.settimeout(5)
        udp_bind(udp, grant1, sg.port)
        udp.sendto(b"before", ("127.0.0.1", sg.port))
        assert udp.recvfrom(2048)[0] == b"before"
        sock0, _grant0 = session(sg, agent, c0)  # and one on worker 0
        assert per_worker(sg, "gatehouse_sg_worker_sessions_active") == {"0": 1, "1": 1}

        os.kill(pids[0], signal.SIGKILL)
        assert closed_by_peer(sock0)  # worker 0's session went with it
        sock0.close()
        wait_for(
            lambda: sg.metrics().get('gatehouse_sg_worker_restarts_total{worker="0"}') == 1, "the restart"
        )
        wait_for(lambda: sg.metrics()["gatehouse_sg_workers_running"] == WORKERS, "both running")
        new_pids = sg.proc.worker_pids()
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
        assert sg.metrics()['gatehouse_sg_worker_restarts_total{worker="1"}'] == 0

        # Worker 1's session went on: TCP and UDP both still relay.
        assert echo_both_ways(sock1, b"after the crash" * 100) == b"after the crash" * 100
        udp.sendto(b"after", ("127.0.0.1", sg.port))
        assert udp.recvfrom(2048)[0] == b"after"
        # The slots of the dead worker were given back; its replacement serves its sources.
        wait_for(lambda: sg.metrics()["gatehouse_sg_connections_open"] == 1, "only worker 1's session")
        sock0, _grant0 = session(sg, agent, c0)
        assert echo_both_ways(sock0, b"new worker 0") == b"new worker 0"
        assert per_worker(sg, "gatehouse_sg_worker_sessions_active") == {"0": 1, "1": 1}

        # SIGTERM: both workers close their sessions and exit, then the supervisor.
        assert sg.proc.stop() == 0
        assert closed_by_peer(sock0) and closed_by_peer(sock1)
        sock0.close()
        sock1.close()
    for pid in sg.proc.worker_pids().values():
        assert not alive(pid)
    logs = sg.proc.logs()
    assert logs.count('"msg": "stopped"') == WORKERS + 1  # each worker, then the supervisor


def test_a_hung_worker_is_killed_and_replaced(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """The watchdog (WorkerHangTimeout): worker 1, stopped, answers no probe and is killed and
    forked again; its sources are then served by the new worker 1, and worker 0's session relays on."""
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS, WorkerHangTimeout=3)
    c0, c1 = sources(0, 1)[0], sources(1, 1)[0]
    sock0, _grant0 = session(sg, agent, c0)
    with sock0:
        hung = sg.proc.worker_pids()[1]
        os.kill(hung, signal.SIGSTOP)
        wait_for(lambda: sg.metrics().get('gatehouse_sg_worker_hangs_total{worker="1"}') == 1, "the kill", 20)
        wait_for(lambda: sg.metrics()["gatehouse_sg_workers_running"] == WORKERS, "both running")
        assert sg.proc.worker_pids()[1] != hung and not alive(hung)
        m = sg.metrics()
        assert m['gatehouse_sg_worker_restarts_total{worker="1"}'] == 1
        assert m['gatehouse_sg_worker_hangs_total{worker="0"}'] == 0
        assert echo_both_ways(sock0, b"worker 0 went on") == b"worker 0 went on"
        sock1, _grant1 = session(sg, agent, c1)
        with sock1:
            assert echo_both_ways(sock1, b"new worker 1") == b"new worker 1"
            assert per_worker(sg, "gatehouse_sg_worker_sessions_active") == {"0": 1, "1": 1}
    assert "worker answers no probe; killing it" in sg.proc.logs()


def test_a_killed_supervisor_takes_its_workers_with_it(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """SIGKILL of the supervisor (as the OOM killer ends it): the kernel sends its workers SIGTERM
    (PR_SET_PDEATHSIG), they drain and end, so no orphan goes on serving the port, and an SG
    started again serves it alone."""
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS)
    sock, _grant = session(sg, agent, sources(1, 1)[0])
    with sock:
        workers = list(sg.proc.worker_pids().values())
        sg.proc.kill()
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers to end", 15)
        assert closed_by_peer(sock)
    assert sg.proc.logs().count('"msg": "stopped"') == WORKERS  # each worker drained
    sg.proc.start()
    wait_for(lambda: sg.metrics()["gatehouse_sg_workers_running"] == WORKERS, "both running")
    again, _grant = session(sg, agent, sources(1, 1)[0])
    with again:
        assert echo_both_ways(again, b"a new supervisor") == b"a new supervisor"
        assert sg.metrics()["gatehouse_sg_connections_open"] == 1


def test_a_worker_that_misses_a_scrape_keeps_its_counters_in_the_sum(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS)
    c1 = sources(1, 1)[0]
    sock, _grant = session(sg, agent, c1)
    with sock:
        assert per_worker(sg, "gatehouse_sg_worker_sessions_accepted_total") == {"0": 0, "1": 1}
        pid = sg.proc.worker_pids()[1]
        os.kill(pid, signal.SIGSTOP)  # it cannot answer the supervisor's scrape
        try:
            m = sg.metrics()
        finally:
            os.kill(pid, signal.SIGCONT)
        # Its last numbers stand in: a counter that dropped would read as a reset to Prometheus.
        assert m["gatehouse_sg_sessions_accepted_total"] == 1
        assert m['gatehouse_sg_worker_sessions_accepted_total{worker="1"}'] == 1
        assert echo_both_ways(sock, b"still relaying") == b"still relaying"


def test_one_worker_is_one_process_as_before(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    agent = start_agent(pki, tmp_path, processes)
    sg = start_sg(pki, tmp_path, processes, Workers=1)
    sock, _grant = session(sg, agent, "127.0.0.1")
    with sock:
        assert echo_both_ways(sock, b"one process") == b"one process"
        assert sg.proc.proc is not None
        pid = sg.proc.proc.pid
        assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []
        m = sg.metrics()
        assert m["gatehouse_sg_sessions_active"] == 1
        assert not any(name.startswith(("gatehouse_sg_worker", "gatehouse_sg_workers")) for name in m)
    assert "supervising" not in sg.proc.logs()


def test_a_dual_stack_listener_steers_both_families(
    pki: PKI, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.fail("this host has no IPv6 loopback")
    sg = start_sg(pki, tmp_path, processes, Workers=WORKERS, ListenAddress="::", RequestTimeout=30)
    held = []
    expected = {"0": 0.0, "1": 0.0}
    for ip in (*sources(0, 1), *sources(1, 1)):  # IPv4 packets on the IPv6 sockets
        held.append(sg.open(ip))
        expected[str(worker_for(ip, WORKERS))] += 1
    raw = socket.create_connection(("::1", sg.port), timeout=10)
    held.append(client_ctx().wrap_socket(raw))  # an IPv6 packet: the program's other branch
    expected[str(worker_for("::1", WORKERS))] += 1
    wait_for(lambda: per_worker(sg, "gatehouse_sg_worker_connections_open") == expected, f"{expected} open")
    for sock in held:
        sock.close()
