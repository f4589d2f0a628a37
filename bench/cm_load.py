"""CM under load: keep-alive clients, concurrent session establishments, TLS handshakes per second.

The CM runs as a process with broker and agent stand-ins (bench.standin) that answer at once, so
the CM's own work is what is measured; MaxClients and MaxConcurrentEstablishments are raised
for the run. The load generators (bench.cmload: aiohttp on uvloop, two processes) report their
own CPU time: on a 2-core machine they compete with the CM. References, same run, same
generators: the keep-alive and establishment loads against the stand-in itself speaking the
client envelope (a server that only parses and renders the XML), and the handshake rate against
HAProxy (halb image, host network, one thread) terminating TLS with the same certificate.

Each figure is measured with the CM at its default, one worker per CPU (``cm``), and again with
``Workers=1`` (``cm-1``) in the same rounds, so the table shows what the workers bring.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    HAPROXY_GLOBAL,
    Bench,
    Figure,
    ServiceProcess,
    free_port,
    haproxy_pem,
    load_average,
    wait_port,
)
from gatehouse.config import available_cpus

GENERATORS = 2
ARRIVALS_PER_SECOND = 50  # keep-alive clients connect and log in at this rate, then all stay
THINK_SECONDS = 10.0  # between a client's requests once all are in: 4,000 clients -> ~400 requests/s


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def generate(job: dict[str, Any], clients: int, timeout: float) -> dict[str, Any]:
    """Run ``GENERATORS`` bench.cmload processes that start together; merge what they report."""
    start_at = time.time() + 2.0  # every process has imported aiohttp by then
    procs = []
    for i in range(GENERATORS):
        share = clients // GENERATORS + (1 if i < clients % GENERATORS else 0)
        with tempfile.TemporaryFile("w+") as stdin:
            json.dump({**job, "clients": share, "start_at": start_at}, stdin)
            stdin.seek(0)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.cmload"],
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"bench.cmload failed: {err[-1500:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    lat = [x for o in outs for x in o["latencies_ms"]]
    kinds: dict[str, int] = {}
    for o in outs:
        for k, v in o["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    return {
        "latencies": lat,
        "p50": _pct(lat, 0.50),
        "p99": _pct(lat, 0.99),
        "max": max(lat) if lat else float("nan"),
        "errors": sum(o["errors"] for o in outs),
        "error_kinds": kinds,
        "seconds": max(o["seconds"] for o in outs),
        "generator_cpu_s": round(sum(o["cpu"] for o in outs), 2),
    }


def alternate(rounds: int, runs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each of ``runs`` ``rounds`` times, in turns whose order flips each round (A B, B A, ...), so
    drift of the machine lands on subject and reference alike. Per name: latencies pooled over the
    rounds (p50/p99 of all of them), errors summed, each round's p99 and load average kept."""
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            result = runs[name]()
            result["load_average"] = load_average()
            got[name].append(result)
    merged = {}
    for name, results in got.items():
        lat = [x for r in results for x in r["latencies"]]
        kinds: dict[str, int] = {}
        for r in results:
            for k, v in r["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        merged[name] = {
            "latencies": lat,
            "p50": _pct(lat, 0.50),
            "p99": _pct(lat, 0.99),
            "max": max(lat) if lat else float("nan"),
            "errors": sum(r["errors"] for r in results),
            "error_kinds": kinds,
            "seconds": sum(r["seconds"] for r in results),
            "generator_cpu_s": round(sum(r["generator_cpu_s"] for r in results), 2),
            "rounds": [{"p99": round(r["p99"], 2), "load_average": r["load_average"]} for r in results],
        }
    return merged


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "latencies"}


def _stack(bench: Bench) -> tuple[dict[str, str], str, subprocess.Popen[str]]:
    """The stand-in, and a CM with one worker per CPU (``cm``) and one with one (``cm-1``): their
    URLs by name, the stand-in's own URL (the reference) and its process."""
    broker_port, agent_port = free_port(), free_port()
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.standin",
            "--broker-port",
            str(broker_port),
            "--agent-port",
            str(agent_port),
            "--cert",
            str(bench.cert.cert),
            "--key",
            str(bench.cert.key),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert standin.stdout is not None
    if standin.stdout.readline().strip() != "ready":
        raise RuntimeError("bench.standin did not start")
    urls = {}
    for name, workers in (("cm", available_cpus()), ("cm-1", 1)):
        port = free_port()
        cm = ServiceProcess(
            "cm",
            bench.work / name,
            {
                "ListenAddress": "127.0.0.1",
                "ListenPort": port,
                "RedirectPort": 0,
                "SslCert": bench.cert.cert,
                "SslKey": bench.cert.key,
                "BrokerUrl": f"https://127.0.0.1:{broker_port}",
                "BrokerCaCert": bench.pki.ca,
                "AgentTlsVerify": False,
                "SecurityGatewayEnabled": True,
                "ExternalPcoipIp": "127.0.0.1",
                "MaxClients": 10000,
                "MaxConcurrentEstablishments": 1000,
                # Every benchmark client comes from 127.0.0.1: the per-source and pre-authentication
                # caps would measure the throttles, not the CM.
                "MaxConnections": 20000,
                "MaxConnectionsPerSource": 20000,
                "MaxPreAuthSessions": 10000,
                "MaxPreAuthSessionsPerSource": 10000,
                "AdminPort": free_port(),
                "BrokerTimeout": 30,
                "AgentTimeout": 30,
                "HostAddress": "localhost",
                "LogLevel": "warn",
                "Workers": workers,
            },
            config_name="config.properties",
            env_file={"GATEHOUSE_GRANTSECRET": bench.secret},
            health_url=f"https://127.0.0.1:{port}/health",
        ).start()
        bench.procs.append(cm)
        urls[name] = f"https://127.0.0.1:{port}/pcoip-broker/xml"
    return urls, f"https://127.0.0.1:{broker_port}/pcoip-broker/xml", standin


def _stop(standin: subprocess.Popen[str]) -> None:
    standin.kill()
    standin.wait(10)


def run_keepalive(bench: Bench) -> list[Figure]:
    clients = 1000 if bench.quick else 4000
    rounds = 3
    cms, ref_url, standin = _stack(bench)
    try:
        job = {
            "mode": "keepalive",
            "rounds": rounds,
            "ramp_seconds": clients / ARRIVALS_PER_SECOND,
            "think_seconds": THINK_SECONDS,
        }
        both = alternate(
            1 if bench.quick else 2,
            {
                "reference": lambda: generate(
                    {**job, "url": ref_url, "envelope": "pcoip-client"}, clients, 600
                ),
                **{
                    name: (
                        lambda url=url: generate(
                            {**job, "url": url, "envelope": "pcoip-client"}, clients, 600
                        )
                    )
                    for name, url in cms.items()
                },
            },
        )
        got, ref, one = both["cm"], both["reference"], both["cm-1"]
    finally:
        _stop(standin)
    details = {
        "cm": _summary(got),
        "cm_1_worker": _summary(one),
        "workers": available_cpus(),
        "reference": _summary(ref),
        "clients": clients,
        "requests_per_client": rounds,
        "request": "get-resource-list on each client's own kept-alive TLS connection, after hello+authenticate",
        "arrivals_per_second": ARRIVALS_PER_SECOND,
        "think_seconds": THINK_SECONDS,
    }
    name = f"CM {clients:,} concurrent keep-alive clients"
    return [
        Figure(
            f"{name}: errors",
            "errors",
            float(got["errors"]),
            float(ref["errors"]),
            "stand-in",
            "value <= 0",
            details=details,
        ).judge(),
        Figure(f"{name}: p50 get-resource-list", "ms", got["p50"], ref["p50"], "bare aiohttp stand-in"),
        Figure(
            f"{name}: p99 get-resource-list",
            "ms",
            got["p99"],
            ref["p99"],
            "bare aiohttp stand-in",
            "ratio <= 3",
        ).judge(),
        *one_worker(name, "errors", "errors", float(one["errors"]), float(got["errors"])),
        *one_worker(name, "p99 get-resource-list", "ms", one["p99"], got["p99"]),
    ]


def one_worker(name: str, what: str, unit: str, value: float, with_workers: float) -> list[Figure]:
    """The figure of the CM with Workers=1, against the same CM with one worker per CPU."""
    return [
        Figure(
            f"{name}: {what}, Workers=1" if what else f"{name}, Workers=1",
            unit,
            value,
            with_workers,
            f"Workers={available_cpus()} (the default), same run",
        )
    ]


def run_establish(bench: Bench) -> list[Figure]:
    clients = 100 if bench.quick else 400
    cms, ref_url, standin = _stack(bench)
    try:
        job = {"mode": "establish"}
        both = alternate(
            2 if bench.quick else 4,
            {
                "reference": lambda: generate(
                    {**job, "url": ref_url, "envelope": "pcoip-client"}, clients, 600
                ),
                **{
                    name: (
                        lambda url=url: generate(
                            {**job, "url": url, "envelope": "pcoip-client"}, clients, 600
                        )
                    )
                    for name, url in cms.items()
                },
            },
        )
        got, ref, one = both["cm"], both["reference"], both["cm-1"]
    finally:
        _stop(standin)
    details = {
        "cm": _summary(got),
        "cm_1_worker": _summary(one),
        "workers": available_cpus(),
        "reference": _summary(ref),
        "clients": clients,
        "measured": "new TLS connection, hello → authenticate → get-resource-list → allocate-resource answered",
    }
    name = f"CM {clients} concurrent session establishments"
    return [
        Figure(
            f"{name}: errors",
            "errors",
            float(got["errors"]),
            float(ref["errors"]),
            "stand-in",
            "value <= 0",
            details=details,
        ).judge(),
        Figure(f"{name}: p50", "ms", got["p50"], ref["p50"], "bare aiohttp stand-in"),
        Figure(
            f"{name}: p99", "ms", got["p99"], ref["p99"], "bare aiohttp stand-in", "ratio <= 1.25"
        ).judge(),
        *one_worker(name, "errors", "errors", float(one["errors"]), float(got["errors"])),
        *one_worker(name, "p99", "ms", one["p99"], got["p99"]),
    ]


def run_handshakes(bench: Bench) -> list[Figure]:
    seconds = 2.0 if bench.quick else 4.0
    concurrency = 16
    cms, _ref_url, standin = _stack(bench)
    _stop(standin)
    ports = {name: int(url.split(":")[2].split("/")[0]) for name, url in cms.items()}
    hp_port = free_port()
    config = HAPROXY_GLOBAL.replace("global\n", "global\n    nbthread 1\n") + (
        f"frontend tls\n    mode http\n    bind 127.0.0.1:{hp_port} ssl crt /cfg/srv.pem\n"
        "    http-request return status 200\n"
    )
    rates: dict[str, list[float]] = {"cm": [], "cm-1": [], "haproxy": []}
    cpu: dict[str, list[float]] = {"cm": [], "cm-1": [], "haproxy": []}
    with bench.haproxy(config, {"srv.pem": haproxy_pem(bench.cert)}) as container:
        wait_port(hp_port, container)
        for r in range(2 if bench.quick else 4):
            turn = (("cm", ports["cm"]), ("haproxy", hp_port), ("cm-1", ports["cm-1"]))
            for what, port in turn if r % 2 == 0 else turn[::-1]:
                job = {"mode": "handshake", "host": "127.0.0.1", "port": port, "seconds": seconds}
                r = generate(job, concurrency, seconds + 120)
                rates[what].append(len(r["latencies"]) / r["seconds"])
                cpu[what].append(r["generator_cpu_s"])
    value, ref = statistics.median(rates["cm"]), statistics.median(rates["haproxy"])
    one = statistics.median(rates["cm-1"])
    return [
        Figure(
            "CM full TLS handshakes per second (RSA 2048, TLS 1.3)",
            "hs/s",
            value,
            ref,
            "HAProxy, 1 thread",
            "ratio >= 1.6",
            details={
                "load_average": load_average(),
                "workers": available_cpus(),
                "cm_runs": [round(x) for x in rates["cm"]],
                "cm_1_worker_runs": [round(x) for x in rates["cm-1"]],
                "haproxy_runs": [round(x) for x in rates["haproxy"]],
                "generator_cpu_s": cpu,
                "seconds_per_run": seconds,
                "concurrency": concurrency,
            },
        ).judge(),
        *one_worker("CM full TLS handshakes per second", "", "hs/s", one, value),
    ]
