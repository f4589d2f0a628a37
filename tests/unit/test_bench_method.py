"""The benchmark's method: generated figures in docs/benchmarks.md, alternated rounds, one-thread duplex.

Only the method is tested here (no speed is measured or asserted in the test suite).
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench import __main__ as bench_main  # noqa: E402
from bench.cm_load import alternate  # noqa: E402
from bench.duplex import pump  # noqa: E402

RESULTS = {
    "when": "2026-11-26T12:00:00Z",
    "quick": False,
    "machine": {"cpus": 2, "python": "3.11.7", "kernel": "6.1"},
    "seconds": {"sg-memory": 61.0, "cm-handshakes": 30.0},
    "conditions": {
        "sg-memory": {"start": {"load_average": [1.2, 1, 1]}, "end": {"load_average": [2.5, 1, 1]}},
        "cm-handshakes": {"start": {"load_average": [0.4, 1, 1]}, "end": {"load_average": [1.0, 1, 1]}},
    },
    "figures": [
        {
            "name": "SG RSS per relaying session",
            "unit": "KiB",
            "value": 40.0,
            "reference": 36.0,
            "reference_name": "HAProxy",
            "goal": "ratio <= 1.0",
            "met": False,
            "note": "",
        }
    ],
}


def test_the_generated_section_is_replaced_and_nothing_else(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        f"# Benchmarks\n\nhand\n\n{bench_main.BEGIN}\nold table\n{bench_main.END}\n\n## After\nhand too\n"
    )
    bench_main.write_docs(RESULTS, docs)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nhand\n\n") and text.endswith("\n\n## After\nhand too\n")
    assert "old table" not in text
    assert (
        "| SG RSS per relaying session | 40.0 KiB | 36.0 KiB (HAProxy) | 1.11 | ratio <= 1.0 | **missed** |"
        in text
    )
    assert "1 min 31 s in all, 1-minute load average 0.4 to 2.5" in text
    bench_main.write_docs(RESULTS, docs)
    assert docs.read_text() == text  # the same results, the same page


def test_a_page_without_the_markers_is_refused(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    with pytest.raises(SystemExit, match="no generated section"):
        bench_main.write_docs(RESULTS, docs)
    assert docs.read_text() == "# Benchmarks\n"


def test_the_project_page_holds_the_figures_of_the_recorded_results() -> None:
    import json

    results = json.loads((REPO_ROOT / "bench" / "results.json").read_text())
    page = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    assert bench_main.figures_section(results) in page


def test_rounds_alternate_their_order_and_pool_the_latencies() -> None:
    calls: list[str] = []

    def run(name: str, latencies: list[float]):
        def one() -> dict:
            calls.append(name)
            return {"latencies": latencies, "p99": max(latencies), "errors": 0, "error_kinds": {}, "seconds": 1.0,
                    "generator_cpu_s": 0.5}  # fmt: skip

        return one

    got = alternate(4, {"reference": run("reference", [1.0, 2.0]), "cm": run("cm", [3.0, 4.0])})
    assert calls == ["reference", "cm", "cm", "reference", "reference", "cm", "cm", "reference"]
    assert sorted(got["cm"]["latencies"]) == [3.0] * 4 + [4.0] * 4
    assert got["cm"]["p50"] == 4.0 and got["reference"]["p99"] == 2.0
    assert len(got["cm"]["rounds"]) == 4 and all(len(r["load_average"]) == 3 for r in got["cm"]["rounds"])


def test_both_directions_of_one_tls_stream_flow_from_one_thread(tmp_path: Path) -> None:
    from pki import TestPKI  # on sys.path through bench.common

    cert = TestPKI(tmp_path / "pki").issue("duplex", ["localhost"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert.cert, cert.key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    counts = {"server_sent": 0, "server_received": 0, "client_sent": 0, "client_received": 0}
    end = time.monotonic() + 1.0
    tls_server: list[ssl.SSLSocket] = []

    def serve() -> None:
        conn = server_ctx.wrap_socket(a, server_side=True)
        tls_server.append(conn)
        pump(conn, lambda: time.monotonic() < end, *_counters(counts, "server"))

    thread = threading.Thread(target=serve)
    thread.start()
    client = client_ctx.wrap_socket(b)
    pump(client, lambda: time.monotonic() < end, *_counters(counts, "client"))
    thread.join(5)
    assert not thread.is_alive()
    assert counts["client_sent"] > 0 and counts["server_sent"] > 0
    assert 0 < counts["server_received"] <= counts["client_sent"]
    assert 0 < counts["client_received"] <= counts["server_sent"]
    client.close()
    tls_server[0].close()


def _counters(counts: dict[str, int], side: str):
    def sent(n: int) -> None:
        counts[side + "_sent"] += n

    def received(n: int) -> None:
        counts[side + "_received"] += n

    return sent, received


def test_the_deploy_bench_sums_profile_tasks_times_per_play():
    from bench.deploy import play_seconds

    stamp = "Friday 27 November 2026  15:58:31 +0000 ({}) 0:00:01.000 ******* "
    log = "\n".join(
        [
            "PLAY [Shared] ****",
            "TASK [a] ****",
            stamp.format("0:00:00.400"),  # before the first task: counted nowhere
            "TASK [b] ****",
            stamp.format("0:00:01.500"),  # a
            "PLAY [Broker] ****",
            "TASK [c] ****",
            stamp.format("0:00:00.250"),  # b
            "RUNNING HANDLER [d] ****",
            stamp.format("0:01:02.000"),  # c
            "PLAY RECAP ****",
            stamp.format("0:00:00.125"),  # d
            "TASKS RECAP ****",
            "a ------ 1.50s",
        ]
    )
    assert play_seconds(log) == {"Shared": 1.75, "Broker": 62.12}
