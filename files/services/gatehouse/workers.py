"""Workers > 1: a supervisor process and N forked workers of one service on the same ports.

Before the first fork the service makes, in worker order, one socket per worker and listening
address, all in one SO_REUSEPORT group per address (:func:`reuseport_sockets`), with a classic BPF
program that picks the worker of each new connection (the SG: from the client's address; the CM:
from its source port). The supervisor keeps its copies of every socket while it runs, so a worker
that dies leaves its sockets in their groups at their index: the kernel queues its clients'
connections until the replacement (forked with the same sockets) takes over, and no other
worker's clients are touched. A worker that lives but does not serve (its event loop stuck, or
the process stopped) would leave its share queued for ever: the supervisor probes every worker's
``/health`` and kills one that answers nothing for ``Service.hang_timeout``, which then restarts
as one that died. What must be global lives in a
:class:`~gatehouse.shared.SharedCounters` region made before the first fork; a dead worker's cells
are set back to 0 before its replacement starts.

The supervisor serves AdminAddress:AdminPort. ``/metrics`` sums the workers' own metrics (read from
each over a Unix socket in a 0700 directory, ``WorkerPlace.admin_path``) and adds per-worker series
labelled ``worker`` and the restarts; ``/health`` answers 200 while a worker runs. It opens only
once every worker has answered a scrape (or after READY_TIMEOUT), so the first scrape speaks for
all of them; a worker that misses a later scrape counts with its last answer. SIGTERM: the
supervisor closes its copies of the listeners and passes SIGTERM to every worker, which drains as
a single process does; SIGHUP is passed on (TenantsFile reload). A supervisor that ends without
that (SIGKILL) takes its workers with it: each gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gatehouse import heap, tls
from gatehouse.shared import SharedCounters
from gatehouse.web import add_health_and_metrics, install_uvloop

log = logging.getLogger("gatehouse.workers")

SO_ATTACH_REUSEPORT_CBPF = 51
PR_SET_PDEATHSIG = 1
RESTART_DELAY = 1.0  # a worker that lived shorter than this is restarted after this long
SCRAPE_TIMEOUT = 3.0
READY_TIMEOUT = 30.0  # the admin port opens once every worker serves its metrics (or after this)


# ---------------------------------------------------------------- steering


def insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    """One classic BPF instruction."""
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_program(sock: socket.socket, program: bytes) -> None:
    """Attach ``program`` (classic BPF) to the SO_REUSEPORT group of ``sock``."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def reuseport_sockets(
    host: str,
    port: int,
    kind: int,
    count: int,
    program: bytes,
    prepare: Callable[[socket.socket], None] | None = None,
    backlog: int = 4096,
) -> list[socket.socket]:
    """``count`` sockets on ``host``:``port`` in one SO_REUSEPORT group, in index order, steered by
    ``program``. ``host`` "::" takes IPv4 too (dual stack); ``prepare`` sets options before bind."""
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
            if prepare is not None:
                prepare(sock)
            sock.bind((host, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(backlog)  # a TCP socket joins its group here, so in index order
        attach_program(socks[0], program)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


# ---------------------------------------------------------------- one worker


def _end_with_parent(supervisor: int) -> None:
    """SIGTERM this worker when its supervisor ends, however it ends (SIGKILL, the OOM killer):
    an orphan would serve on without limits shared with a new supervisor's workers, in the same
    SO_REUSEPORT groups, and without metrics. On SIGTERM the worker drains as usual."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.error("cannot tie the worker to its supervisor: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != supervisor:  # it ended before the tie was made
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class WorkerPlace:
    """What worker ``index`` of ``count`` serves with (made by the supervisor before forking):
    its own socket of each group (by name), the shared counters, and the Unix socket on which it
    serves its /metrics and /health to the supervisor (and, in the CM, its peers' calls)."""

    index: int
    count: int
    sockets: dict[str, socket.socket]
    shared: Any
    admin_path: str
    # Every worker's admin_path, by index (the CM forwards a request to its session's worker).
    peers: tuple[str, ...] = ()


@dataclass
class _Slot:
    place: WorkerPlace
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    hangs: int = 0  # of the restarts, those the watchdog caused
    answered: float = 0.0  # when the worker last answered a probe or scrape (or was started)
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


@dataclass(frozen=True)
class Service:
    """What the supervisor needs to know of the service it runs.

    ``name`` prefixes its families (``gatehouse_<name>_workers``...); ``not_summed`` are worker
    families that are the same in every worker (the supervisor gives ``constants()`` instead);
    ``lowest`` are 0/1 states that hold for the service only while they hold in every worker
    (their minimum, not their sum); ``per_worker`` maps worker families to the per-worker series
    made of them.
    """

    name: str
    admin_address: str
    admin_port: int
    cert_files: tuple[str, ...]
    listening: str
    grace: float
    hang_timeout: float = 0.0  # the watchdog's deadline (WorkerHangTimeout); 0: no watchdog
    not_summed: frozenset[str] = frozenset()
    lowest: frozenset[str] = frozenset()
    per_worker: Mapping[str, str] = field(default_factory=dict)
    constants: Callable[[], Iterable[Metric]] = tuple


# ---------------------------------------------------------------- the supervisor


class Supervisor:
    def __init__(
        self,
        service: Service,
        groups: Mapping[str, list[socket.socket]],
        shared: SharedCounters,
        run_worker: Callable[[WorkerPlace], Coroutine[Any, Any, None]],
    ) -> None:
        """``groups``: per name, one socket per worker in index order (reuseport_sockets)."""
        self.service = service
        self.run_worker = run_worker
        self.shared = shared
        self.count = shared.workers
        self.rundir = tempfile.mkdtemp(prefix=f"gatehouse-{service.name}-")  # 0700: this user only
        self.groups = dict(groups)
        paths = tuple(f"{self.rundir}/worker-{i}.sock" for i in range(self.count))
        self.slots = [
            _Slot(
                WorkerPlace(i, self.count, {n: g[i] for n, g in self.groups.items()}, shared, paths[i], paths)
            )
            for i in range(self.count)
        ]
        self.stopping = False
        self.pid = os.getpid()
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
        slot.started = slot.answered = time.monotonic()
        log.info("worker started", extra={"worker": slot.place.index, "pid": pid})

    def _worker_main(self, place: WorkerPlace) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        _end_with_parent(self.pid)
        if self.admin_sock is not None:
            self.admin_sock.close()  # the supervisor's; this process only holds its fd
        mine = {id(sock) for sock in place.sockets.values()}
        for group in self.groups.values():
            for sock in group:
                if id(sock) not in mine:
                    sock.close()
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerField(place.index))
        install_uvloop()
        heap.settle()
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
            self.shared.reset_worker(index)  # the kernel closed its connections, its memory is gone
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

    async def _ask(self, slot: _Slot, path: str, within: float) -> str | None:
        """GET ``path`` of a worker over its Unix socket: the answer (and the worker marked as
        answering), or None when it gives none ``within`` seconds."""
        try:
            connector = aiohttp.UnixConnector(path=slot.place.admin_path)
            deadline = aiohttp.ClientTimeout(total=within)
            async with aiohttp.ClientSession(connector=connector, timeout=deadline) as http:
                async with http.get(f"http://worker{path}") as resp:
                    text = await resp.text()
        except (OSError, aiohttp.ClientError, TimeoutError):
            return None
        slot.answered = time.monotonic()
        return text

    async def _scrape(self) -> dict[int, str]:
        """Each running worker's /metrics, or the last it gave when it does not answer in time."""

        async def one(slot: _Slot) -> None:
            text = await self._ask(slot, "/metrics", SCRAPE_TIMEOUT)
            if text is not None:
                slot.metrics = text

        running = [s for s in self.slots if s.pid]
        await asyncio.gather(*(one(s) for s in running))
        return {s.place.index: s.metrics for s in running if s.metrics is not None}

    async def _watch(self) -> None:
        """The watchdog: probe every worker's /health each third of hang_timeout, and kill one
        that has answered nothing for hang_timeout (_reap forks it again, as any that ends)."""
        timeout = self.service.hang_timeout
        interval = timeout / 3
        while not self.stopping:
            await asyncio.sleep(interval)
            running = [s for s in self.slots if s.pid]
            await asyncio.gather(*(self._ask(s, "/health", interval) for s in running))
            now = time.monotonic()
            for slot in running:
                silent = now - slot.answered
                if self.stopping or not slot.pid or silent < timeout:
                    continue
                log.error(
                    "worker answers no probe; killing it",
                    extra={"worker": slot.place.index, "pid": slot.pid, "seconds": round(silent, 1)},
                )
                slot.hangs += 1
                slot.answered = now  # killed once: _reap restarts it
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

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
        service = self.service
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
        registry.register(tls.CertificateExpiry.of_files(*service.cert_files))
        app = web.Application()
        add_health_and_metrics(app, registry, lambda: not self.stopping and any(s.pid for s in self.slots))

        @web.middleware
        async def scrape_first(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/metrics":
                collector.texts = await self._scrape()  # read by generate_latest in the handler
            return await handler(request)

        app.middlewares.append(scrape_first)
        watchdog = asyncio.create_task(self._watch()) if service.hang_timeout > 0 else None
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in service.admin_address else socket.AF_INET
        self.admin_sock = socket.create_server(
            (service.admin_address, service.admin_port), family=family, reuse_port=False
        )
        await web.SockSite(runner, self.admin_sock).start()
        log.info(
            "supervising",
            extra={
                "workers": self.count,
                "address": service.listening,
                "admin": f"{service.admin_address}:{service.admin_port}",
            },
        )
        await stop.wait()

        self.stopping = True
        if watchdog is not None:
            watchdog.cancel()  # draining workers may answer slowly; the grace period bounds them
        log.info("stopping: draining %d workers", self.count)
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
        for group in self.groups.values():
            for sock in group:
                sock.close()  # the workers' copies are then the last: they close them
        self._signal_workers(signal.SIGTERM)
        self._reap()
        try:
            await asyncio.wait_for(self.all_gone.wait(), service.grace + 5.0)
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
    """The workers' metrics summed (``texts``: each worker's /metrics, scraped just before; the
    ``lowest`` families their minimum), the service's constants, per-worker series labelled
    ``worker``, and the workers and their restarts."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.texts: dict[int, str] = {}

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        service = sup.service
        summed: dict[str, Metric] = {}
        totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = defaultdict(dict)
        per_worker: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for index, text in sorted(self.texts.items()):
            for fam in text_string_to_metric_families(text):
                if fam.name in service.not_summed:
                    continue
                summed.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for sample in fam.samples:
                    if sample.name.endswith("_created"):
                        continue  # a process's start time: no sum of them means anything
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    before = totals[fam.name].get(key)
                    if before is None:
                        totals[fam.name][key] = sample.value
                    elif fam.name in service.lowest:
                        totals[fam.name][key] = min(before, sample.value)
                    else:
                        totals[fam.name][key] = before + sample.value
                    if fam.name in service.per_worker and not sample.labels:
                        per_worker[fam.name].append((str(index), sample.value))
        for name, metric in summed.items():
            for (sample_name, labels), value in totals[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
        yield from service.constants()
        for name, per_name in service.per_worker.items():
            kind = CounterMetricFamily if name.endswith(("_accepted", "_total")) else GaugeMetricFamily
            family = kind(per_name, f"{name}, per worker process", labels=["worker"])
            for worker, value in per_worker.get(name, []):
                family.add_metric([worker], value)
            yield family
        prefix = f"gatehouse_{service.name}"
        yield GaugeMetricFamily(f"{prefix}_workers", "Worker processes configured (Workers)", value=sup.count)
        yield GaugeMetricFamily(
            f"{prefix}_workers_running",
            "Worker processes running now",
            value=sum(1 for s in sup.slots if s.pid),
        )
        restarts = CounterMetricFamily(
            f"{prefix}_worker_restarts",
            "Worker processes that ended and were started again",
            labels=["worker"],
        )
        hangs = CounterMetricFamily(
            f"{prefix}_worker_hangs",
            "Worker processes killed for answering no probe for WorkerHangTimeout (counted in the restarts too)",
            labels=["worker"],
        )
        for slot in sup.slots:
            restarts.add_metric([str(slot.place.index)], slot.restarts)
            hangs.add_metric([str(slot.place.index)], slot.hangs)
        yield restarts
        yield hangs


def supervise(
    service: Service,
    groups: Mapping[str, list[socket.socket]],
    shared: SharedCounters,
    run_worker: Callable[[WorkerPlace], Coroutine[Any, Any, None]],
) -> None:
    """Run one worker per socket of each group (``run_worker(place)`` in its own process) until SIGTERM."""

    async def main() -> None:
        await Supervisor(service, groups, shared, run_worker).run()

    asyncio.run(main())
