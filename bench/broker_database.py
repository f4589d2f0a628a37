"""Broker logins on PostgreSQL against SQLite, same run (reported: the ratio says what the database costs).

Two brokers with the same settings, one on an SQLite file (the default) and one on a PostgreSQL
server (tests/integration/postgres_server.py: gatehouse/postgres in a container, published on
127.0.0.1, so each query crosses Docker's port relay as it would cross a network), each behind its
own direct-mode CM. Four local users each, created through the admin API. The load is
bench.cmload's ``logins`` mode as in bench.identity_login (a new TLS connection and CM session per
login: hello, authenticate, bye), rounds alternating between the engines with the same number of
logins. A login writes on the broker's database (the throttle's record of the source an account
logged in from; on PostgreSQL the failure counters too), so the figure is the cost of the
database under the scrypt check of each password, which dominates both.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from bench.common import Bench, Figure, not_measured, run_json, tree_cpu_seconds
from bench.identity_login import CONCURRENCY, ROUNDS, alternate_rounds, compare

NAME = "Broker logins, PostgreSQL against SQLite"
USERS = ("db-ann", "db-ben", "db-cat", "db-dan")


def run(bench: Bench) -> list[Figure]:
    import postgres_server
    import pytest  # the test helpers fail with pytest's outcome, a BaseException

    if subprocess.run(
        ["docker", "image", "inspect", postgres_server.IMAGE], capture_output=True, check=False
    ).returncode:
        return [not_measured(NAME, f"no {postgres_server.IMAGE} image (make images)")]
    try:
        return _measure(bench)
    except pytest.fail.Exception as exc:
        raise RuntimeError(str(exc)) from None


def _measure(bench: Bench) -> list[Figure]:
    import postgres_server

    per_round = 24 if bench.quick else 80
    with postgres_server.running() as server:
        engines = {
            "sqlite": bench.start_broker_behind_cm("sqlite", USERS),
            "postgresql": bench.start_broker_behind_cm(
                "postgresql", USERS, database_url=server.url(), database_password=server.password
            ),
        }
        pids: dict[str, dict[str, int]] = {}
        for engine, target in engines.items():
            assert target.broker.proc is not None and target.cm.proc is not None
            pids[engine] = {"broker": target.broker.proc.pid, "cm": target.cm.proc.pid}
        postgres_pid = int(server.container.attrs["State"]["Pid"])

        def logins(engine: str, n: int) -> dict[str, Any]:
            job = {
                "mode": "logins",
                "url": engines[engine].url,
                "envelope": "pcoip-client",
                "clients": CONCURRENCY,
                "logins": [engines[engine].users[i % len(USERS)] for i in range(n)],
            }
            meters = dict(pids[engine], **({"postgres": postgres_pid} if engine == "postgresql" else {}))
            before = {name: tree_cpu_seconds(pid) for name, pid in meters.items()}
            out = run_json([sys.executable, "-m", "bench.cmload"], job, timeout=600)
            out["server_cpu_s"] = {name: tree_cpu_seconds(pid) - before[name] for name, pid in meters.items()}
            return out

        for engine in engines:  # not measured: connections warm up, the first rows are written
            warm = logins(engine, 2 * CONCURRENCY)
            if warm["errors"]:
                raise RuntimeError(f"{engine} logins fail: {warm['error_kinds']}")
        measured = alternate_rounds(list(engines), logins, per_round)

    pg, lite, details, note = compare(measured, "postgresql", "sqlite")
    details["postgresql_setup"] = (
        "gatehouse/postgres (postgresql-15, Debian defaults), published on 127.0.0.1"
    )
    name = f"{NAME} ({per_round * ROUNDS} each, {CONCURRENCY} at a time)"
    reference = "the same broker on SQLite, same run"
    return [
        Figure(
            f"{name}: logins/s", "logins/s", pg["rate"], lite["rate"], reference, note=note, details=details
        ),
        Figure(f"{name}: p99", "ms", pg["p99"], lite["p99"], reference, note=note),
    ]
