"""SG TLS relay throughput with Workers=2 against the same SG with Workers=1.

Both SGs run as local processes of this checkout (bench.Bench.start_sg) with the same settings
but Workers. The client opens its streams from several loopback addresses, half of them steered
to each worker (gatehouse.sg.workers.worker_for, the kernel's BPF program): one client address is
always one worker's, so streams from a single address would measure one worker. Rounds alternate
the two SGs and turn their order each round. Each run records the CPU seconds of the SG (the
supervisor and its workers), the client and the backend, and the load average; on a machine
whose cores the client and the backend share, the ratio shows what the extra worker wins there,
not what it wins on a gateway with cores of its own.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import uuid

from bench.common import Bench, Figure, cpu_seconds, free_port, load_average, run_json, tree_cpu_seconds
from bench.sg_throughput import start_backend, stop_backend
from gatehouse.grant import GrantSealer, decode_secret
from gatehouse.sg.workers import worker_for

WORKERS = 2
MODE = "up"


def client_addresses(per_worker: int) -> list[str]:
    """Loopback addresses, ``per_worker`` of them steered to each of the WORKERS workers."""
    found: dict[int, list[str]] = {w: [] for w in range(WORKERS)}
    last = 1
    while any(len(v) < per_worker for v in found.values()):
        ip = f"127.0.0.{last}"
        worker = worker_for(ip, WORKERS)
        if len(found[worker]) < per_worker:
            found[worker].append(ip)
        last += 1
    return [ip for pair in zip(*found.values(), strict=True) for ip in pair]


def run(bench: Bench) -> list[Figure]:
    per_worker = 2
    seconds, rounds = (2.0, 2) if bench.quick else (4.0, 4)
    sources = client_addresses(per_worker)
    sealer = GrantSealer(decode_secret(bench.secret))
    backend_port = free_port()
    backend = start_backend(bench, backend_port, udp=False)
    try:
        sgs = {n: bench.start_sg(Workers=n) for n in (1, WORKERS)}
        runs: dict[int, list[dict]] = {n: [] for n in sgs}
        for r in range(rounds):
            for n in sorted(sgs) if r % 2 == 0 else sorted(sgs, reverse=True):
                proc, port = sgs[n]
                assert proc.proc is not None
                runs[n].append(_one(sealer, backend, backend_port, port, proc.proc.pid, sources, seconds))
    finally:
        stop_backend(backend)
    rate = {n: statistics.median(r["rate"] for r in found) for n, found in runs.items()}
    return [
        Figure(
            f"SG TLS relay throughput with {WORKERS} workers, one way, {len(sources)} streams "
            f"from {len(sources)} client addresses",
            "MB/s",
            rate[WORKERS] / 1e6,
            rate[1] / 1e6,
            "the same SG with Workers=1",
            "ratio >= 1.0",
            details={
                "seconds_per_run": seconds,
                "sources": sources,
                **{
                    f"workers_{n}_runs": [
                        {"MBps": round(r["rate"] / 1e6, 1), **{k: v for k, v in r.items() if k != "rate"}}
                        for r in found
                    ]
                    for n, found in runs.items()
                },
            },
        ).judge()
    ]


def _one(
    sealer: GrantSealer,
    backend: subprocess.Popen[str],
    backend_port: int,
    port: int,
    pid: int,
    sources: list[str],
    seconds: float,
) -> dict:
    lines = []
    for source in sources:
        tag = f"sink-{uuid.uuid4().hex}"
        grant = sealer.mint(str(uuid.uuid4()), "127.0.0.1", backend_port, tag, source)
        lines.append(f"CONNECT {grant}\r\n")
    job = {
        "host": "127.0.0.1",
        "port": port,
        "lines": lines,
        "sources": sources,
        "mode": MODE,
        "seconds": seconds,
        "warmup": 0.5,
    }
    relay0, backend0 = tree_cpu_seconds(pid), cpu_seconds(backend.pid)
    out = run_json([sys.executable, "-m", "bench.tcpload"], job, timeout=seconds + 60)
    return {
        "rate": out["sent"] / out["seconds"],
        "cpu_s": {
            "sg": round(tree_cpu_seconds(pid) - relay0, 2),
            "client": round(out["cpu"], 2),
            "backend": round(cpu_seconds(backend.pid) - backend0, 2),
        },
        "load_average": load_average(),
    }
