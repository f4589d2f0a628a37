"""SG TLS relay throughput against HAProxy doing the same job on the same loopback.

Both relays terminate TLS from the same client and re-encrypt to the same backend (bench.backend,
a sink/source stand-in for the agent's 4172). The client sends the same bytes on both paths: via
the SG a ``CONNECT <grant>`` line (the SG answers and sends ``CONNECT <session-tag>`` to the
backend), via HAProxy the ``CONNECT <session-tag>`` line itself (HAProxy is transparent).
The paths alternate (SG, HAProxy, SG, HAProxy, ...) so background load hits both alike.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import uuid

from bench.common import (
    HAPROXY_GLOBAL,
    Bench,
    Figure,
    container_pid,
    cpu_seconds,
    free_port,
    haproxy_pem,
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


def run(bench: Bench) -> list[Figure]:
    streams = 4
    seconds, rounds = (2.0, 1) if bench.quick else (4.0, 3)
    backend_port = free_port()
    backend = start_backend(bench, backend_port)
    try:
        sg, sg_port = bench.start_sg()
        assert sg.proc is not None
        sealer = GrantSealer(decode_secret(bench.secret))
        hp_port = free_port()
        config = HAPROXY_GLOBAL + (
            f"frontend relay\n    bind 127.0.0.1:{hp_port} ssl crt /cfg/srv.pem\n"
            f"    default_backend agent\nbackend agent\n"
            f"    server agent 127.0.0.1:{backend_port} ssl verify none\n"
        )
        with bench.haproxy(config, {"srv.pem": haproxy_pem(bench.cert)}) as container:
            wait_port(hp_port, container)
            hp_pid = container_pid(container)
            figures = []
            for mode in ("up", "duplex"):
                rates: dict[str, list[float]] = {"sg": [], "haproxy": []}
                cpu: dict[str, list[float]] = {"sg": [], "haproxy": [], "client": []}
                tls_seen = {}
                for _ in range(rounds):
                    for path in ("sg", "haproxy"):
                        tags = [
                            f"{'sink' if mode == 'up' else 'duplex'}-{uuid.uuid4().hex}"
                            for _ in range(streams)
                        ]
                        if path == "sg":
                            port, pid = sg_port, sg.proc.pid
                            lines = [
                                f"CONNECT {sealer.mint(str(uuid.uuid4()), '127.0.0.1', backend_port, t, '127.0.0.1')}\r\n"
                                for t in tags
                            ]
                        else:
                            port, pid = hp_port, hp_pid
                            lines = [f"CONNECT {t}\r\n" for t in tags]
                        job = {
                            "host": "127.0.0.1",
                            "port": port,
                            "lines": lines,
                            "mode": mode,
                            "seconds": seconds,
                            "warmup": 0.5,
                        }
                        relay_cpu = cpu_seconds(pid)
                        out = run_json([sys.executable, "-m", "bench.tcpload"], job, timeout=seconds + 60)
                        relay_cpu = cpu_seconds(pid) - relay_cpu
                        moved = out["sent"] + (out["received"] if mode == "duplex" else 0)
                        rates[path].append(moved / out["seconds"])
                        cpu[path].append(relay_cpu)
                        cpu["client"].append(out["cpu"])
                        tls_seen[path] = out["tls"]
                sg_rate = statistics.median(rates["sg"])
                hp_rate = statistics.median(rates["haproxy"])
                label = "one way (client→agent)" if mode == "up" else "both ways (sum)"
                figures.append(
                    Figure(
                        f"SG TLS relay throughput, {label}, {streams} streams",
                        "MB/s",
                        sg_rate / 1e6,
                        hp_rate / 1e6,
                        "HAProxy (halb image, host network)",
                        "ratio >= 0.8",
                        details={
                            "sg_runs_MBps": [round(r / 1e6, 1) for r in rates["sg"]],
                            "haproxy_runs_MBps": [round(r / 1e6, 1) for r in rates["haproxy"]],
                            "relay_cpu_s_per_run": {k: [round(c, 2) for c in v] for k, v in cpu.items()},
                            "seconds_per_run": seconds,
                            "tls": tls_seen,
                        },
                    ).judge()
                )
            return figures
    finally:
        stop_backend(backend)
