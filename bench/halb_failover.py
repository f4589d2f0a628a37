"""HALB failover time: the primary HALB node is killed (SIGKILL, no goodbye), time to service.

Reuses the HALB pair of the HALB tests (tests/integration/halb_helpers.py: two gatehouse/halb containers deployed by
the halb module on a private Docker network, VRRP v3 unicast, priorities 150/100, two HTTPS
backends). A trial: the primary holds the VIP; ``docker kill`` it; probe the VIP every 20 ms
(new TLS connection, ``GET /health``, 0.3 s timeout) until a backend answers; the time from the
kill to that answer is the failover time. The primary is then started again and takes the VIP
back (preemption) before the next trial. Measured with the project's default advert_int
(0.25 s) and, as the reference, with keepalived's default (1 s) on the same pair.
"""

from __future__ import annotations

import statistics
import time

from bench.common import Bench, Figure, not_measured

TRIALS = 10


def _trials(pair, n: int) -> list[float]:
    from halb_helpers import wait_for

    times = []
    for _ in range(n):
        pair.wait_master("halb1")
        time.sleep(0.5)  # a few advertisements from the settled master
        start = time.monotonic()
        killed = pair.kill("halb1", "SIGKILL")  # the killed instance's StartedAt
        wait_for(lambda: pair.via_vip(4444, timeout=0.3) is not None, 30, "the VIP", 0.02)
        times.append(time.monotonic() - start)
        pair.ensure_running("halb1", killed)
    pair.wait_master("halb1")
    return times


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
    default_advert = 0.25
    pair = halb_helpers.Pair(client, bench.work / "halb", bench.pki)
    try:
        pair.advert_int = default_advert
        pair.start()
        ours = _trials(pair, n)
        pair.advert_int = 1.0  # keepalived's default
        for node in ("halb2", "halb1"):
            pair.deploy(node)
        pair.wait_master("halb1")
        time.sleep(3.5)  # the backup's master-down timer now runs on the 1 s interval
        reference = _trials(pair, n)
    finally:
        pair.stop()
    return [
        Figure(
            f"HALB failover, SIGKILL of the primary, median of {n} (advert_int {default_advert} s)",
            "s",
            statistics.median(ours),
            statistics.median(reference),
            "keepalived default timers (advert_int 1 s)",
            "ratio <= 1",
            note=f"min {min(ours):.2f} / median {statistics.median(ours):.2f} / max {max(ours):.2f} s",
            details={"advert_int_0.25": _stats(ours), "advert_int_1": _stats(reference)},
        ).judge()
    ]
