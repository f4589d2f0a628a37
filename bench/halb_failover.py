"""HALB failover time: the primary HALB node is killed (SIGKILL, no goodbye), time to service;
and what a short advertisement interval costs: keepalived's CPU, and false failovers under load.

Reuses the HALB pair of the HALB tests (tests/integration/halb_helpers.py: two gatehouse/halb containers deployed by
the halb module on a private Docker network, VRRP v3 unicast, priorities 150/100, two HTTPS
backends). A trial: the primary holds the VIP; ``docker kill`` it; probe the VIP every 20 ms
(new TLS connection, ``GET /health``, 0.3 s timeout, each probe on its own thread) until a
backend answers; the time from the kill to that answer is the failover time. The primary is then started again and takes the VIP
back (preemption) before the next trial. Measured with the project's default advert_int (0.1 s,
judged against the goal), 0.25 s and, as the reference, keepalived's default (1 s) on the same
pair. For each setting, before its trials: the CPU time of both nodes' keepalived
processes over CPU_SECONDS of quiet, and over LOAD_SECONDS with every core of the machine busy
(two spinning processes per CPU at normal priority), how often the backup took the VIP from a
live primary (its "Entering MASTER STATE" log lines) — a false failover.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Bench, Figure, not_measured

TRIALS = 10
CPU_SECONDS = 20.0
LOAD_SECONDS = 60.0
DEFAULT_ADVERT = 0.1  # the halb module's (module_utils/_halb/render.py ADVERT_INT)
LONGER_ADVERT = 0.25
KEEPALIVED_ADVERT = 1.0  # keepalived's own default: the reference
SETTINGS = (DEFAULT_ADVERT, LONGER_ADVERT, KEEPALIVED_ADVERT)


def _served_at(pair, limit: float = 30.0) -> float:
    """When (monotonic) the VIP first serves: a new probe every 20 ms, each on its own thread, so
    that a probe caught by the move (its SYN sent to the dead node, waiting out its 0.3 s timeout)
    does not hold back the ones after it."""

    def probe() -> float | None:
        return time.monotonic() if pair.via_vip(4444, timeout=0.3) is not None else None

    deadline = time.monotonic() + limit
    with ThreadPoolExecutor(max_workers=32) as pool:
        probes = []
        while time.monotonic() < deadline:
            probes.append(pool.submit(probe))
            served = [f.result() for f in probes if f.done() and f.result() is not None]
            if served:
                return min(served)
            time.sleep(0.02)
    raise AssertionError(f"the VIP did not serve within {limit} s")


def _trials(pair, n: int) -> list[float]:
    times = []
    for _ in range(n):
        pair.wait_master("halb1")
        time.sleep(0.5)  # a few advertisements from the settled master
        start = time.monotonic()
        killed = pair.kill("halb1", "SIGKILL")  # the killed instance's StartedAt
        times.append(_served_at(pair) - start)
        pair.ensure_running("halb1", killed)
    pair.wait_master("halb1")
    return times


def _keepalived_cpu(pair) -> float:
    """CPU seconds used so far by the keepalived processes of both nodes (/proc/<pid>/schedstat,
    in ns: the bench runs on the engine's host, where the containers' processes are visible)."""
    total = 0.0
    for node in ("halb1", "halb2"):
        top = pair.client.containers.get(pair.container_name(node)).top()
        pid_at = top["Titles"].index("PID")
        for row in top["Processes"]:
            if "keepalived" in row[-1]:
                with open(f"/proc/{row[pid_at]}/schedstat") as stat:
                    total += int(stat.read().split()[0]) / 1e9
    return total


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def _false_failovers(pair, seconds: float) -> tuple[int, int]:
    """With every core busy for ``seconds``: (times the backup entered MASTER, VIP samples held
    by both nodes at once). The primary stays up all along, so each is a false failover."""
    since = int(time.time())
    until = time.monotonic() + seconds
    spinners = [
        multiprocessing.Process(target=_spin, args=(until,)) for _ in range(2 * (os.cpu_count() or 1))
    ]
    for proc in spinners:
        proc.start()
    both = 0
    try:
        while time.monotonic() < until:
            both += len(pair.vip_holders()) > 1
            time.sleep(0.5)
    finally:
        for proc in spinners:
            proc.join()
    logs = pair.client.containers.get(pair.container_name("halb2")).logs(since=since).decode()
    return logs.count("Entering MASTER STATE"), both


def _load_seconds(quick: bool) -> float:
    return LOAD_SECONDS / 4 if quick else LOAD_SECONDS


def _measure(pair, n: int, quick: bool) -> dict[str, object]:
    """One setting (pair.advert_int, deployed and settled): CPU, false failovers, then the trials."""
    quiet = CPU_SECONDS / 4 if quick else CPU_SECONDS
    before = _keepalived_cpu(pair)
    time.sleep(quiet)
    cpu = (_keepalived_cpu(pair) - before) / quiet
    masters, both = _false_failovers(pair, _load_seconds(quick))
    pair.wait_master("halb1")
    times = _trials(pair, n)
    return {
        **_stats(times),
        "keepalived_cpu_share": round(cpu, 5),
        "false_failovers": masters,
        "split_brain_samples": both,
    }


def _stats(times: list[float]) -> dict[str, float | list[float]]:
    return {
        "min": round(min(times), 3),
        "median": round(statistics.median(times), 3),
        "max": round(max(times), 3),
        "runs": [round(t, 3) for t in times],
    }


def run(bench: Bench) -> list[Figure]:
    try:
        import halb_helpers
    except ImportError as exc:  # the Docker SDK is missing
        return [not_measured("HALB failover", f"tests/integration/halb_helpers.py cannot be imported: {exc}")]
    client = halb_helpers.docker_client()
    if client is None:
        return [not_measured("HALB failover", "no Docker engine")]
    if halb_helpers.image_id(client, halb_helpers.HALB_IMAGE) is None:
        return [not_measured("HALB failover", f"no {halb_helpers.HALB_IMAGE} image (make images)")]
    n = 3 if bench.quick else TRIALS
    pair = halb_helpers.Pair(client, bench.work / "halb", bench.pki)
    measured: dict[float, dict[str, object]] = {}
    try:
        for advert in SETTINGS:
            pair.advert_int = advert
            if not measured:
                pair.start()
            else:
                for node in ("halb2", "halb1"):
                    pair.deploy(node)
            pair.wait_master("halb1")
            time.sleep(3.5 * advert + 0.5)  # the backup's master-down timer now runs on the new interval
            measured[advert] = _measure(pair, n, bench.quick)
    finally:
        pair.stop()
    reference = measured[KEEPALIVED_ADVERT]
    figures = []
    for advert, goal in ((DEFAULT_ADVERT, "value <= 0.5"), (LONGER_ADVERT, "")):
        got = measured[advert]
        figures.append(
            Figure(
                f"HALB failover, SIGKILL of the primary, median of {n} (advert_int {advert} s)",
                "s",
                got["median"],
                reference["median"],
                "keepalived default timers (advert_int 1 s)",
                goal,
                note=f"min {got['min']:.2f} / max {got['max']:.2f} s",
            ).judge()
        )
        figures.append(
            Figure(
                f"HALB false failovers with every core busy for {_load_seconds(bench.quick):.0f} s (advert_int {advert} s)",
                "failovers",
                got["false_failovers"],
                reference["false_failovers"],
                "the same at advert_int 1 s",
                "value <= 0",
                note=f"{got['split_brain_samples']} samples with the VIP on both nodes",
            ).judge()
        )
        figures.append(
            Figure(
                f"HALB keepalived CPU, both nodes, quiet (advert_int {advert} s)",
                "% of a core",
                100 * got["keepalived_cpu_share"],
                100 * reference["keepalived_cpu_share"],
                "the same at advert_int 1 s",
            ).judge()
        )
    figures[0].details = {f"advert_int_{advert}": got for advert, got in measured.items()}
    return figures
