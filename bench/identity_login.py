"""Directory logins through the CM against local logins, same run (goal: p99 at most 1.5 times local).

One broker with two domains: CORP, whose users are in a real directory (the slapd of
tests/integration/identity_servers.py, gatehouse/identity-test image, LDAPS verified against the
test CA, groups from memberOf; configured as the identity tests configure it, tests/integration/identity_helpers.py),
and LAB, with local users whose scrypt hashes the broker stored when they were created through its
admin API. One direct-mode CM in front. The throttle's limits are the tests' (no failure is
expected; successful logins are not counted anyway), everything else is the default (four LDAP
threads per domain, one scrypt worker per CPU).

The load generator is bench.cmload (mode ``logins``, the client code of the other CM figures):
a fixed number of concurrent loops, each login on its own new TLS connection and CM session:
hello, authenticate (password, user, domain), bye. Directory users alice, bob, carol and dave and
four local users take turns. Rounds alternate: a directory round, a local round, the same number
of logins each, so that anything else on the machine weighs on both. Rate: median of the rounds'
logins per second; p50/p99 over every login of the kind (hello sent → authenticate answered).
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Bench, Figure, container_pid, cpu_seconds, not_measured, run_json

NAME = "Directory logins through the CM"
CONCURRENCY = 8
ROUNDS = 3
LOCAL_USERS = ("lab-ann", "lab-ben", "lab-cat", "lab-dan")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (a container's init and the server it runs)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # ended meanwhile
            continue
    return total


def _docker_proxy(port: int) -> int | None:
    """The docker-proxy relaying 127.0.0.1:``port`` to a container (Docker's userland proxy), if any."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"docker-proxy") and str(port).encode() in args and b"tcp" in args:
            return int(proc.name)
    return None


class CpuMeter:
    """CPU seconds of the broker, the CM, slapd and the docker-proxy in front of it, by name."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def read(self) -> dict[str, float]:
        return {name: _tree_cpu(pid) for name, pid in self.pids.items()}


def run(bench: Bench) -> list[Figure]:
    import pytest  # the identity test helpers fail with pytest's outcome, a BaseException

    image = _image()
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode:
        return [not_measured(NAME, f"no {image} image (make images)")]
    try:
        return _measure(bench)
    except pytest.fail.Exception as exc:
        raise RuntimeError(str(exc)) from None


def _image() -> str:
    import identity_servers

    return identity_servers.IMAGE


def _measure(bench: Bench) -> list[Figure]:
    import identity_helpers
    import identity_servers
    from services import cm_config, start_cm

    per_round = 24 if bench.quick else 80
    with identity_servers.running(bench.pki, bench.work / "identity", name_prefix="gh-bench-identity") as ids:
        directory = ids.directory
        broker = identity_helpers.start_identity_broker(
            bench.pki,
            bench.work / "broker",
            "bench",
            **identity_helpers.ldap_domain(directory, "CORP", LdapTimeout=5),
            LogLevel="warn",
        )
        bench.procs.append(broker)
        local = {user: f"{user}-{secrets.token_urlsafe(12)}" for user in LOCAL_USERS}
        for user, password in local.items():
            identity_helpers.admin(broker, bench.pki, "PUT", f"/users/LAB/{user}", {"password": password})
        broker_url = f"https://127.0.0.1:{broker.config['ListenPort']}"
        config = cm_config(
            bench.pki,
            bench.cert,
            broker_url,
            # Every benchmark client comes from 127.0.0.1; the per-source cap is not what is measured.
            MaxPreAuthSessionsPerSource=1000,
            MaxConnectionsPerSource=1000,
            BrokerTimeout=30,
            LogLevel="warn",
        )
        cm = start_cm(bench.work / "cm", config, bench.secret)
        bench.procs.append(cm)
        assert broker.proc is not None and cm.proc is not None
        pids = {
            "broker": broker.proc.pid,
            "cm": cm.proc.pid,
            "slapd": container_pid(directory.container.name),
        }
        # The broker reaches the published LDAPS port on 127.0.0.1 through this relay, when Docker runs one.
        proxy = _docker_proxy(directory.ldaps_port)
        if proxy is not None:
            pids["docker-proxy"] = proxy
        meter = CpuMeter(pids)
        users = {
            "directory": [[u, directory.passwords[u], "CORP"] for u in identity_servers.USERS],
            "local": [[u, pw, "LAB"] for u, pw in local.items()],
        }
        url = f"https://127.0.0.1:{config['ListenPort']}/pcoip-broker/xml"

        def logins(kind: str, n: int) -> dict[str, Any]:
            job = {
                "mode": "logins",
                "url": url,
                "envelope": "pcoip-client",
                "clients": CONCURRENCY,
                "logins": [users[kind][i % len(users[kind])] for i in range(n)],
            }
            before = meter.read()
            out = run_json([sys.executable, "-m", "bench.cmload"], job, timeout=600)
            after = meter.read()
            out["server_cpu_s"] = {k: after[k] - before[k] for k in after}
            return out

        # Not measured: first logins (the directory users' rows are created, connections warm up).
        for kind in users:
            warm = logins(kind, 2 * CONCURRENCY)
            if warm["errors"]:
                raise RuntimeError(f"{kind} logins fail: {warm['error_kinds']}")
        measured = alternate_rounds(["directory", "local"], logins, per_round)
    return _figures(measured)


def login_stats(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rate (median of the rounds'), p50 and p99 of bench.cmload ``logins`` rounds with their
    ``server_cpu_s``, and a summary for results.json."""
    lat = [x for o in outs for x in o["latencies_ms"]]
    if not lat:
        raise RuntimeError(f"no login succeeded: {outs[0]['error_kinds']}")
    cpu = {k: round(sum(o["server_cpu_s"][k] for o in outs), 2) for k in outs[0]["server_cpu_s"]}
    cpu["generator"] = round(sum(o["cpu"] for o in outs), 2)
    return {
        "rate": statistics.median(len(o["latencies_ms"]) / o["seconds"] for o in outs),
        "p50": _pct(lat, 0.50),
        "p99": _pct(lat, 0.99),
        "summary": {
            "logins_per_s_runs": [round(len(o["latencies_ms"]) / o["seconds"], 1) for o in outs],
            "seconds_runs": [round(o["seconds"], 2) for o in outs],
            "p50_ms": round(_pct(lat, 0.50), 1),
            "p90_ms": round(_pct(lat, 0.90), 1),
            "p99_ms": round(_pct(lat, 0.99), 1),
            "max_ms": round(max(lat), 1),
            "logins": len(lat),
            "errors": sum(o["errors"] for o in outs),
            "error_kinds": {k: v for o in outs for k, v in o["error_kinds"].items()},
            "cpu_s": cpu,
            "cpu_ms_per_login": {k: round(1000 * v / len(lat), 1) for k, v in cpu.items()},
        },
    }


def alternate_rounds(
    kinds: list[str], logins: Callable[[str, int], dict[str, Any]], per_round: int
) -> dict[str, Any]:
    """ROUNDS rounds of ``per_round`` logins of each kind, alternating; the runs and the conditions."""
    load_before = os.getloadavg()
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(ROUNDS):
        for kind in kinds:
            runs[kind].append(logins(kind, per_round))
    return {
        "runs": runs,
        "per_round": per_round,
        "elapsed": time.monotonic() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def compare(measured: dict[str, Any], subject: str, reference: str) -> tuple[dict, dict, dict[str, Any], str]:
    """login_stats of ``subject`` and ``reference`` (kinds of ``measured``), the details both
    figures share and the note on failed logins."""
    sub, ref = login_stats(measured["runs"][subject]), login_stats(measured["runs"][reference])
    details = {
        subject: sub["summary"],
        reference: ref["summary"],
        f"ratios_{subject}_to_{reference}": {
            "logins_per_s": round(sub["rate"] / ref["rate"], 3),
            "p50": round(sub["p50"] / ref["p50"], 3),
            "p99": round(sub["p99"] / ref["p99"], 3),
        },
        "rounds": ROUNDS,
        "logins_per_round": measured["per_round"],
        "concurrency": CONCURRENCY,
        "measured_seconds": round(measured["elapsed"], 1),
        "load_average_before": [round(x, 2) for x in measured["load_before"]],
        "load_average_after": [round(x, 2) for x in measured["load_after"]],
        "login": "new TLS connection to the CM, hello → authenticate (password) → bye; latency to the authenticate answer",
    }
    errors = sub["summary"]["errors"] + ref["summary"]["errors"]
    return sub, ref, details, f"{errors} failed logins" if errors else ""


def _figures(measured: dict[str, Any]) -> list[Figure]:
    d, loc, details, note = compare(measured, "directory", "local")
    details["directory_setup"] = (
        "slapd (gatehouse/identity-test), LDAPS, LdapGroupMode memberof, LdapPoolSize 4 (default)"
    )
    details["local_setup"] = "scrypt N=2^15 r=8 p=3, PasswordHashWorkers default (one per CPU, at most 4)"
    name = f"{NAME} ({measured['per_round'] * ROUNDS}, LDAPS, {CONCURRENCY} at a time)"
    reference = "local users (scrypt), same run"
    return [
        Figure(
            f"{name}: logins/s", "logins/s", d["rate"], loc["rate"], reference, note=note, details=details
        ),
        Figure(f"{name}: p50", "ms", d["p50"], loc["p50"], reference),
        Figure(f"{name}: p99", "ms", d["p99"], loc["p99"], reference, "ratio <= 1.5", note=note).judge(),
    ]
