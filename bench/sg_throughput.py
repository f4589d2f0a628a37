"""SG TLS relay throughput against HAProxy doing the same job on the same loopback.

Both relays terminate TLS from the same client and re-encrypt to the same backend (bench.backend,
a sink/source stand-in for the agent's 4172). The client sends the same bytes on both paths: via
the SG a ``CONNECT <grant>`` line (the SG answers and sends ``CONNECT <session-tag>`` to the
backend), via HAProxy the ``CONNECT <session-tag>`` line itself (HAProxy is transparent).
Both relays run the same way: a container of their image on the host network, one thread each;
rounds interleave every path and mode, turning their order each round. Every run records the
CPU seconds of relay, client and backend, the client's and the relay↔backend TLS, and the load
average.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import uuid
from dataclasses import dataclass

from bench.common import (
    HAPROXY_GLOBAL,
    Bench,
    Figure,
    container_pid,
    cpu_seconds,
    free_port,
    haproxy_pem,
    load_average,
    run_json,
    wait_port,
)
from gatehouse.grant import GrantSealer, decode_secret


def start_backend(bench: Bench, port: int, udp: bool = True) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "bench.backend",
        "--port",
        str(port),
        "--cert",
        str(bench.cert.cert),
        "--key",
        str(bench.cert.key),
    ]
    if not udp:
        cmd.append("--no-udp")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("bench.backend did not start")
    return proc


def stop_backend(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)


def backend_tls(backend: subprocess.Popen[str]) -> str:
    """Protocol and cipher of the newest connection the backend accepted (the relay's TLS to it)."""
    assert backend.stdin is not None and backend.stdout is not None
    backend.stdin.write("tls\n")
    backend.stdin.flush()
    return backend.stdout.readline().strip()


MODES = ("up", "duplex")
LABELS = {"up": "one way (client→agent)", "duplex": "both ways (sum)"}
THREADS = 1  # the SG is one process of one thread on the data path; HAProxy gets the same (nbthread)


def run(bench: Bench) -> list[Figure]:
    streams = 4
    seconds, rounds = (2.0, 2) if bench.quick else (4.0, 4)
    backend_port = free_port()
    backend = start_backend(bench, backend_port)
    try:
        hp_port = free_port()
        config = HAPROXY_GLOBAL.replace("global\n", f"global\n    nbthread {THREADS}\n", 1) + (
            f"frontend relay\n    bind 127.0.0.1:{hp_port} ssl crt /cfg/srv.pem\n"
            f"    default_backend agent\nbackend agent\n"
            f"    server agent 127.0.0.1:{backend_port} ssl verify none\n"
        )
        with (
            bench.sg_container() as (sg_port, sg_pid),
            bench.haproxy(config, {"srv.pem": haproxy_pem(bench.cert)}) as container,
        ):
            wait_port(hp_port, container)
            pids = {"sg": sg_pid, "haproxy": container_pid(container)}
            ports = {"sg": sg_port, "haproxy": hp_port}
            setup = Setup(GrantSealer(decode_secret(bench.secret)), backend, backend_port, streams, seconds)
            runs: dict[str, dict[str, list[dict]]] = {m: {"sg": [], "haproxy": []} for m in MODES}
            # Every kind in every round, and the order turns each round, so drift of the machine
            # lands on both paths and both modes alike.
            for r in range(rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    for path in ("sg", "haproxy") if r % 2 == 0 else ("haproxy", "sg"):
                        runs[mode][path].append(_one(setup, mode, path, ports[path], pids[path]))
            return [_figure(mode, runs[mode], streams, seconds) for mode in MODES]
    finally:
        stop_backend(backend)


@dataclass(frozen=True)
class Setup:
    sealer: GrantSealer
    backend: subprocess.Popen[str]
    backend_port: int
    streams: int
    seconds: float


def _one(setup: Setup, mode: str, path: str, port: int, pid: int) -> dict:
    streams, seconds, backend, backend_port = setup.streams, setup.seconds, setup.backend, setup.backend_port
    tags = [f"{'sink' if mode == 'up' else 'duplex'}-{uuid.uuid4().hex}" for _ in range(streams)]
    if path == "sg":
        lines = [
            f"CONNECT {setup.sealer.mint(str(uuid.uuid4()), '127.0.0.1', backend_port, t, '127.0.0.1')}\r\n"
            for t in tags
        ]
    else:
        lines = [f"CONNECT {t}\r\n" for t in tags]
    job = {"host": "127.0.0.1", "port": port, "lines": lines, "mode": mode, "seconds": seconds, "warmup": 0.5}
    relay0, backend0 = cpu_seconds(pid), cpu_seconds(backend.pid)
    out = run_json([sys.executable, "-m", "bench.tcpload"], job, timeout=seconds + 60)
    return {
        "rate": (out["sent"] + (out["received"] if mode == "duplex" else 0)) / out["seconds"],
        "cpu_s": {
            "relay": round(cpu_seconds(pid) - relay0, 2),
            "client": round(out["cpu"], 2),
            "backend": round(cpu_seconds(backend.pid) - backend0, 2),
        },
        "client_tls": out["tls"],
        "relay_backend_tls": backend_tls(backend),
        "load_average": load_average(),
    }


def _figure(mode: str, runs: dict[str, list[dict]], streams: int, seconds: float) -> Figure:
    rate = {path: statistics.median(r["rate"] for r in found) for path, found in runs.items()}
    return Figure(
        f"SG TLS relay throughput, {LABELS[mode]}, {streams} streams",
        "MB/s",
        rate["sg"] / 1e6,
        rate["haproxy"] / 1e6,
        f"HAProxy (halb image, host network, nbthread {THREADS})",
        "ratio >= 1.0",
        details={
            "subject": f"SG (sg image, host network, {THREADS} process)",
            "seconds_per_run": seconds,
            **{
                f"{path}_runs": [
                    {"MBps": round(r["rate"] / 1e6, 1), **{k: v for k, v in r.items() if k != "rate"}}
                    for r in found
                ]
                for path, found in runs.items()
            },
        },
    ).judge()
