"""HALB failover time: the primary HALB node is killed (SIGKILL, no goodbye), time to service.

Reuses the HALB pair of tests/integration/collection/test_halb.py (two gatehouse/halb containers deployed by
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
    import test_halb

    times = []
    for _ in range(n):
        pair.wait_master("halb1")
        time.sleep(0.5)  # a few advertisements from the settled master
        start = time.monotonic()
        killed = pair.kill("halb1", "SIGKILL")  # the killed instance's StartedAt
        test_halb._wait_for(lambda: pair.via_vip(4444, timeout=0.3) is not None, 30, "the VIP", 0.02)
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
        import test_halb
    except Exception as exc:  # pytest.skip.Exception is not an Exception subclass; see below
        return [
            not_measured(
                "HALB failover", f"tests/integration/collection/test_halb.py cannot be imported: {exc}"
            )
        ]
    except BaseException as exc:
        return [not_measured("HALB failover", f"HALB pair unavailable: {exc}")]
    if test_halb._CLIENT is None:
        return [not_measured("HALB failover", "no Docker engine")]
    if test_halb._image_id(test_halb._CLIENT, test_halb.HALB_IMAGE) is None:
        return [not_measured("HALB failover", f"no {test_halb.HALB_IMAGE} image (make images)")]
    n = 3 if bench.quick else TRIALS
    default_advert = 0.25
    pair = test_halb.Pair(test_halb._CLIENT, bench.work / "halb", bench.pki)
    try:
        test_halb.ADVERT_INT = default_advert
        pair.start()
        ours = _trials(pair, n)
        test_halb.ADVERT_INT = 1.0  # keepalived's default
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
