"""Workers > 1: a supervisor process and N forked gateway workers on the same Port.

Before the first fork the supervisor makes, in worker order, one TCP listener and one UDP socket
per worker on ListenAddress:Port (SO_REUSEPORT), and attaches to each group a classic BPF program
(:func:`steering_program`) that picks the worker from the client's source address. Sockets are
indexed in the order they joined their group, so both programs send everything from one client
address (an IPv4 address, or an IPv6 /64, as web.source_key counts it) to the same worker index:

- a client's UDP bind reaches the worker that holds its TCP session (udp_table.py needs both);
- MaxConnectionsPerSource and the per-source deadlines stay exact, each source being one worker's;
- through a forwarder (ProxyProtocolSources), everything of that forwarder is one worker's.

What must be global lives in :class:`~gatehouse.sg.shared.SharedState` (MaxConnections across
workers, a grant accepted once across workers). The supervisor keeps its copies of every socket
while it runs, so a worker that dies leaves its sockets in their groups at their index: the kernel
queues its clients' connections and datagrams until the replacement (forked with the same
sockets) takes over, and no other worker's sessions are touched. It serves AdminAddress:AdminPort:
``/metrics`` sums the workers' own metrics (read from each over a Unix socket) and adds per-worker
series labelled ``worker`` and the restarts. SIGTERM: the supervisor closes its copies of the
listeners and passes SIGTERM to every worker, which drains as a single SG does; SIGHUP is passed
on (TenantsFile reload).
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gatehouse import tls
from gatehouse.sg.settings import SHUTDOWN_GRACE, SgSettings
from gatehouse.sg.shared import SharedState
from gatehouse.sg.udp import SOCKET_BUFFER, _set_buffers
from gatehouse.web import add_health_and_metrics, install_uvloop

log = logging.getLogger("gatehouse.sg")

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
RESTART_DELAY = 1.0  # a worker that lived shorter than this is restarted after this long
SCRAPE_TIMEOUT = 3.0
READY_TIMEOUT = 30.0  # the admin port opens once every worker serves its metrics (or after this)
# Families that are the same in every worker: the supervisor gives its own, not a sum.
_NOT_SUMMED = {"gatehouse_sg_max_connections", "gatehouse_tls_certificate_expiry_timestamp_seconds"}
# Per-worker series (label ``worker``) of these worker families.
_PER_WORKER = {
    "gatehouse_sg_connections_open": "gatehouse_sg_worker_connections_open",
    "gatehouse_sg_sessions_active": "gatehouse_sg_worker_sessions_active",
    "gatehouse_sg_sessions_accepted": "gatehouse_sg_worker_sessions_accepted",
}


# ---------------------------------------------------------------- steering


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def steering_program(workers: int) -> bytes:
    """Classic BPF for SO_ATTACH_REUSEPORT_CBPF: the worker index of a packet's source address,
    :func:`worker_for` computed in the kernel (IPv4: the address; IPv6: its /64)."""
    ld_b, ld_w, alu, jmp, ret, misc = 0x30, 0x20, 0x04, 0x05, 0x06, 0x07  # ld with BPF_ABS
    rsh, xor, mod, jeq, ja, x_src, tax, ret_a = 0x70, 0xA0, 0x90, 0x10, 0x00, 0x08, 0x00, 0x10
    return b"".join(
        [
            _insn(ld_b, SKF_NET_OFF),  # 0: first byte of the IP header
            _insn(alu | rsh, 4),  # 1: its version
            _insn(jmp | jeq, 6, jt=2),  # 2: IPv6: to 5
            _insn(ld_w, SKF_NET_OFF + 12),  # 3: IPv4 source address
            _insn(jmp | ja, 4),  # 4: to 9
            _insn(ld_w, SKF_NET_OFF + 8),  # 5: IPv6 source, first word
            _insn(misc | tax),  # 6
            _insn(ld_w, SKF_NET_OFF + 12),  # 7: second word (the /64)
            _insn(alu | xor | x_src),  # 8
            _insn(misc | tax),  # 9: fold the bits down
            _insn(alu | rsh, 16),
            _insn(alu | xor | x_src),
            _insn(misc | tax),
            _insn(alu | rsh, 8),
            _insn(alu | xor | x_src),
            _insn(alu | mod, workers),
            _insn(ret | ret_a),
        ]
    )


def worker_for(ip: str, workers: int) -> int:
    """The worker index that the steering program gives the client address ``ip``."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # an IPv4 packet on a dual-stack socket
    if isinstance(addr, ipaddress.IPv4Address):
        value = int(addr)
    else:
        packed = addr.packed
        value = int.from_bytes(packed[0:4], "big") ^ int.from_bytes(packed[4:8], "big")
    value ^= value >> 16
    value ^= value >> 8
    return value % workers


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_steering(sock: socket.socket, workers: int) -> None:
    program = steering_program(workers)
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def reuseport_sockets(host: str, port: int, kind: int, count: int) -> list[socket.socket]:
    """``count`` sockets on ``host``:``port`` in one SO_REUSEPORT group, in index order, steered."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _index in range(count):
            sock = socket.socket(family, kind)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setblocking(False)
            sock.bind((host, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(4096)  # a TCP socket joins its group here, so in index order
            else:
                _set_buffers(sock, SOCKET_BUFFER)
        attach_steering(socks[0], count)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


# ---------------------------------------------------------------- one worker


@dataclass
class WorkerPlace:
    """What worker ``index`` of ``count`` serves with (made by the supervisor before forking)."""

    index: int
    count: int
    tcp: socket.socket
    udp: socket.socket
    shared: SharedState
    admin_path: str  # its /metrics and /health, on a Unix socket the supervisor reads


@dataclass
class _Slot:
    place: WorkerPlace
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    restart: asyncio.TimerHandle | None = field(default=None, repr=False)
    # This process's last /metrics: a scrape it misses (busy, slow) repeats it rather than
    # dropping its counters from the sum, which Prometheus would take for a reset.
    metrics: str | None = field(default=None, repr=False)


class _WorkerField(logging.Filter):
    """Every line a worker logs names it (``worker``): the workers share one log stream."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.index
        return True


# ---------------------------------------------------------------- the supervisor


class Supervisor:
    def __init__(
        self,
        settings: SgSettings,
        run_worker: Callable[[WorkerPlace], Coroutine[Any, Any, None]],
    ) -> None:
        self.settings = settings
        self.run_worker = run_worker
        self.count = settings.workers
        self.rundir = tempfile.mkdtemp(prefix="gatehouse-sg-")  # 0700: only this user reads /metrics
        self.shared = SharedState(self.count)
        tcp = reuseport_sockets(settings.listen_address, settings.port, socket.SOCK_STREAM, self.count)
        udp = reuseport_sockets(settings.listen_address, settings.port, socket.SOCK_DGRAM, self.count)
        self.slots = [
            _Slot(WorkerPlace(i, self.count, tcp[i], udp[i], self.shared, f"{self.rundir}/worker-{i}.sock"))
            for i in range(self.count)
        ]
        self.stopping = False
        self.admin_sock: socket.socket | None = None
        self.all_gone = asyncio.Event()

    # ------------------------------------------------------------ processes

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        slot.metrics = None  # a new process: its counters start again
        try:
            os.unlink(slot.place.admin_path)  # a killed worker leaves its socket file
        except FileNotFoundError:
            pass
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's loop
            code = 1
            try:
                code = self._worker_main(slot.place)
            except BaseException:
                log.exception("worker %d failed", slot.place.index)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("worker started", extra={"worker": slot.place.index, "pid": pid})

    def _worker_main(self, place: WorkerPlace) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if self.admin_sock is not None:
            self.admin_sock.close()  # the supervisor's; this process only holds its fd
        for other in self.slots:
            if other.place is not place:
                other.place.tcp.close()
                other.place.udp.close()
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerField(place.index))
        install_uvloop()
        asyncio.run(self.run_worker(place))
        return 0

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            index = slot.place.index
            self.shared.reset_worker(index)  # the kernel closed its connections
            if self.stopping:
                log.info(
                    "worker stopped", extra={"worker": index, "status": os.waitstatus_to_exitcode(status)}
                )
                continue
            slot.restarts += 1
            lived = time.monotonic() - slot.started
            delay = RESTART_DELAY if lived < RESTART_DELAY else 0.0
            log.error(
                "worker ended; restarting it",
                extra={
                    "worker": index,
                    "status": os.waitstatus_to_exitcode(status),
                    "restarts": slot.restarts,
                },
            )
            slot.restart = asyncio.get_running_loop().call_later(delay, self._spawn, slot)
        if self.stopping and all(s.pid == 0 for s in self.slots):
            self.all_gone.set()

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------ metrics

    async def _scrape(self) -> dict[int, str]:
        """Each running worker's /metrics, or the last it gave when it does not answer in time."""

        async def one(slot: _Slot) -> None:
            try:
                connector = aiohttp.UnixConnector(path=slot.place.admin_path)
                timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                    async with http.get("http://worker/metrics") as resp:
                        slot.metrics = await resp.text()
            except (OSError, aiohttp.ClientError, TimeoutError):
                pass

        running = [s for s in self.slots if s.pid]
        await asyncio.gather(*(one(s) for s in running))
        return {s.place.index: s.metrics for s in running if s.metrics is not None}

    async def _wait_ready(self) -> None:
        """Until every worker has answered a scrape: /health and /metrics then speak for all."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            await self._scrape()
            if all(s.metrics is not None for s in self.slots if s.pid):
                return
            await asyncio.sleep(0.05)
        log.error("workers not ready after %.0f s; serving the admin port anyway", READY_TIMEOUT)

    # ------------------------------------------------------------ run

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for slot in self.slots:  # before the admin site exists: nothing of it is inherited
            self._spawn(slot)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_workers, signal.SIGHUP)

        await self._wait_ready()
        collector = WorkersCollector(self)
        registry = CollectorRegistry()
        registry.register(collector)
        registry.register(tls.CertificateExpiry.of_files(settings.ssl_cert))
        app = web.Application()
        add_health_and_metrics(app, registry, lambda: not self.stopping and any(s.pid for s in self.slots))

        @web.middleware
        async def scrape_first(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/metrics":
                collector.texts = await self._scrape()  # read by generate_latest in the handler
            return await handler(request)

        app.middlewares.append(scrape_first)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in settings.admin_address else socket.AF_INET
        self.admin_sock = socket.create_server(
            (settings.admin_address, settings.admin_port), family=family, reuse_port=False
        )
        await web.SockSite(runner, self.admin_sock).start()
        log.info(
            "supervising",
            extra={
                "workers": self.count,
                "address": f"{settings.listen_address}:{settings.port}",
                "max_connections": settings.max_connections,
                "admin": f"{settings.admin_address}:{settings.admin_port}",
            },
        )
        await stop.wait()

        self.stopping = True
        log.info("stopping: draining %d workers", self.count)
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
            slot.place.tcp.close()  # the workers' copies are then the last: they close them
            slot.place.udp.close()
        self._signal_workers(signal.SIGTERM)
        self._reap()
        try:
            await asyncio.wait_for(self.all_gone.wait(), SHUTDOWN_GRACE + 5.0)
        except TimeoutError:
            log.error("workers still running after the grace period; killing them")
            self._signal_workers(signal.SIGKILL)
            await asyncio.sleep(0.5)
            self._reap()
        await runner.cleanup()
        self.shared.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("stopped")


class WorkersCollector(Collector):
    """The workers' metrics summed (``texts``: each worker's /metrics, scraped just before),
    per-worker series labelled ``worker``, MaxConnections, and the workers and their restarts."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.texts: dict[int, str] = {}

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        summed: dict[str, Metric] = {}
        totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
        per_worker: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for index, text in sorted(self.texts.items()):
            for fam in text_string_to_metric_families(text):
                if fam.name in _NOT_SUMMED:
                    continue
                summed.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for sample in fam.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    totals[fam.name][key] = totals[fam.name].get(key, 0.0) + sample.value
                    if fam.name in _PER_WORKER and not sample.labels:
                        per_worker[fam.name].append((str(index), sample.value))
        for name, metric in summed.items():
            for (sample_name, labels), value in totals[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
        yield GaugeMetricFamily(
            "gatehouse_sg_max_connections", "MaxConnections setting", value=sup.settings.max_connections
        )
        for name, per_name in _PER_WORKER.items():
            kind = CounterMetricFamily if name.endswith("_accepted") else GaugeMetricFamily
            family = kind(per_name, f"{name}, per worker process", labels=["worker"])
            for worker, value in per_worker.get(name, []):
                family.add_metric([worker], value)
            yield family
        yield GaugeMetricFamily(
            "gatehouse_sg_workers", "Worker processes configured (Workers)", value=sup.count
        )
        yield GaugeMetricFamily(
            "gatehouse_sg_workers_running",
            "Worker processes running now",
            value=sum(1 for s in sup.slots if s.pid),
        )
        restarts = CounterMetricFamily(
            "gatehouse_sg_worker_restarts",
            "Worker processes that ended and were started again",
            labels=["worker"],
        )
        for slot in sup.slots:
            restarts.add_metric([str(slot.place.index)], slot.restarts)
        yield restarts


def supervise(settings: SgSettings, run_worker: Callable[[WorkerPlace], Coroutine[Any, Any, None]]) -> None:
    """Run ``settings.workers`` workers (each ``run_worker(place)`` in its own process) until SIGTERM."""

    async def main() -> None:
        await Supervisor(settings, run_worker).run()

    asyncio.run(main())
