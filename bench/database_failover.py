"""Database failover time: the primary's Patroni killed (docker kill), time to the first successful login.

The three-node Patroni + etcd cluster of the database tests (tests/integration/database_cluster.py:
deployed by the gatehouse.access.database module with its default timings, each node in a holder
container with a fixed address on a Docker network of its own, TLS everywhere). A broker process
runs on the cluster's multi-host URL (target_session_attrs=read-write, sslmode=verify-full with
the test CA, DatabasePasswordFile) behind a direct-mode CM, with one local user.

Logins run continuously through the CM (``LOOPS`` concurrent loops, each a new TLS connection and
CM session: hello, authenticate, bye, with bench.cmload's client code). A trial: the primary (the
node whose Patroni answers 200 on /primary over HTTPS) has its Patroni container killed; the
failover time is the kill → the end of the first successful login that started after the kill.
Kill → new primary (the first 200 on /primary from another node) is measured in the same trial:
that much is Patroni's, the rest the broker's reconnect and the login itself. The old primary is
then started again, and the next trial waits until it answers 200 on /replica and the cluster has
its synchronous standby again.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.common import PREFIX, Bench, Figure, load_average, not_measured

NAME = "Database failover, docker kill of the Patroni primary → first successful login"
TRIALS = 5
LOOPS = 3
LIMIT = 15.0  # the "logins resume within 15 s"
USER = ("db-failover", "LAB")


@dataclass
class Attempt:
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class LoginLoops:
    """``LOOPS`` login loops in a thread of their own; every attempt recorded on the monotonic clock."""

    url: str
    password: str
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def after(self, since: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.started >= since]

    async def _main(self) -> None:
        from bench.cmload import _client, _ctx, _login, _send
        from gatehouse import protocol as p

        ctx = _ctx()

        async def loop() -> None:
            while not self._stop.is_set():
                started = time.monotonic()
                async with _client(ctx) as http:
                    try:
                        await asyncio.wait_for(
                            _login(http, self.url, "pcoip-client", USER[0], self.password, USER[1]), 30
                        )
                    except Exception as exc:
                        self.attempts.append(
                            Attempt(started, time.monotonic(), False, f"{type(exc).__name__}: {exc}"[:120])
                        )
                        await asyncio.sleep(0.1)  # a refused login comes back at once: no busy loop
                        continue
                    self.attempts.append(Attempt(started, time.monotonic(), True))
                    try:
                        await _send(http, self.url, "pcoip-client", p.Bye())
                    except Exception:
                        pass

        await asyncio.gather(*(loop() for _ in range(LOOPS)))


def _wait(what: str, check, timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def run(bench: Bench) -> list[Figure]:
    import pytest  # the test helpers fail or skip with pytest's outcomes, BaseExceptions

    try:
        import database_cluster
    except ImportError as exc:  # the Docker SDK or psycopg is missing
        return [not_measured(NAME, f"tests/integration/database_cluster.py cannot be imported: {exc}")]
    try:
        return _measure(bench, database_cluster)
    except pytest.skip.Exception as exc:
        return [not_measured(NAME, str(exc))]
    except pytest.fail.Exception as exc:
        raise RuntimeError(str(exc)) from None


def _trial(cluster: Any, loops: LoginLoops) -> dict[str, Any]:
    primary = cluster.primary()
    if primary is None:
        raise RuntimeError(f"no primary: {cluster.cluster_state()}")
    settled = time.monotonic()
    _wait("logins before the kill", lambda: any(a.ok for a in loops.after(settled)), 60, 0.1)
    load = load_average()
    killed = time.monotonic()
    cluster.cli.containers.get(primary.patroni).kill()
    new_primary_at, new_primary = None, None
    others = [n for n in cluster.nodes if n is not primary]
    deadline = killed + 4 * LIMIT
    login_at = None
    while time.monotonic() < deadline and (new_primary_at is None or login_at is None):
        if new_primary_at is None:
            for node in others:
                if cluster.rest(node, "/primary", timeout=1)[0] == 200:
                    new_primary_at, new_primary = time.monotonic() - killed, node.name
                    break
        done = [a.ended for a in loops.after(killed) if a.ok]
        if done:
            login_at = min(done) - killed
        time.sleep(0.05)
    attempts = loops.after(killed)
    failed = [a for a in attempts if not a.ok and (login_at is None or a.started - killed < login_at)]
    result = {
        "killed": primary.name,
        "new_primary": new_primary,
        "kill_to_login_s": None if login_at is None else round(login_at, 3),
        "kill_to_new_primary_s": None if new_primary_at is None else round(new_primary_at, 3),
        "failed_logins_before": len(failed),
        "errors": sorted({a.error for a in failed})[:5],
        "load_average_at_kill": load,
    }
    print(f"   trial: {result}", file=sys.stderr, flush=True)
    # The old primary again, as a replica, and the cluster whole (a synchronous standby) again.
    cluster.cli.containers.get(primary.patroni).start()
    _wait(f"{primary.name} back as a replica", lambda: cluster.rest(primary, "/replica")[0] == 200, 180)
    cluster.wait_healthy(120)
    if login_at is None:
        raise RuntimeError(f"no login succeeded within {4 * LIMIT:.0f} s of the kill: {result}")
    return result


def _measure(bench: Bench, dbc: Any) -> list[Figure]:
    n = 2 if bench.quick else TRIALS
    prefix = f"{PREFIX}db-{uuid.uuid4().hex[:8]}"
    with dbc.hosts(bench.pki, bench.work / "database", prefix) as cluster:
        started = time.monotonic()
        results = [dbc.ok(run) for run in dbc.run_all(cluster)]
        cluster.wait_healthy(180)
        deployed = time.monotonic() - started
        timings = _find(results[0], "timings") or {}
        target = bench.start_broker_behind_cm(
            "db-failover", [USER[0]], USER[1], database_url=cluster.url(), database_password=dbc.BROKER_PW
        )
        loops = LoginLoops(target.url, target.users[0][1])
        loops.start()
        try:
            trials = [_trial(cluster, loops) for _ in range(n)]
        finally:
            loops.stop()
    login = [t["kill_to_login_s"] for t in trials]
    patroni = [t["kill_to_new_primary_s"] for t in trials if t["kill_to_new_primary_s"] is not None]
    details = {
        "trials": trials,
        "kill_to_login_s": _stats(login),
        "kill_to_new_primary_s": _stats(patroni) if patroni else None,
        "timings": timings,
        "login_loops": LOOPS,
        "deployed_in_s": round(deployed, 1),
        "load_average_end": load_average(),
        "setup": "3 Patroni + etcd nodes (gatehouse/database) deployed by gatehouse.access.database, "
        "broker on the multi-host URL (target_session_attrs=read-write, sslmode=verify-full), "
        "direct-mode CM, one local user",
    }
    timing_note = (
        ", ".join(f"{k} {timings[k]} s" for k in ("ttl", "loop_wait", "retry_timeout") if k in timings)
        or "the module's default timings"
    )
    name = f"{NAME}, median of {n} ({timing_note})"
    figures = [
        Figure(
            name,
            "s",
            statistics.median(login),
            goal=f"value <= {LIMIT:g}",
            note=f"min {min(login):.2f} / median {statistics.median(login):.2f} / max {max(login):.2f} s",
            details=details,
        ).judge()
    ]
    if patroni:
        figures.append(
            Figure(
                f"Database failover, kill → new primary (Patroni's part of the above), median of {n}",
                "s",
                statistics.median(patroni),
                note=f"min {min(patroni):.2f} / median {statistics.median(patroni):.2f} / "
                f"max {max(patroni):.2f} s",
            )
        )
    return figures


def _stats(times: list[float]) -> dict[str, Any]:
    return {
        "min": round(min(times), 3),
        "median": round(statistics.median(times), 3),
        "max": round(max(times), 3),
        "runs": [round(t, 3) for t in times],
    }


def _find(data: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a module's result."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = _find(item, key)
            if found is not None:
                return found
    return None
