"""Workers > 1 for the SG: the steering of clients to workers and the SG's supervisor (the
supervisor itself is gatehouse.workers).

The supervisor makes, in worker order, one TCP listener and one UDP socket per worker on
ListenAddress:Port (SO_REUSEPORT), and attaches to each group a classic BPF program
(:func:`steering_program`) that picks the worker from the client's source address. Sockets are
indexed in the order they joined their group, so both programs send everything from one client
address (an IPv4 address, or an IPv6 /64, as web.source_key counts it) to the same worker index:

- a client's UDP bind reaches the worker that holds its TCP session (udp_table.py needs both);
- MaxConnectionsPerSource and the per-source deadlines stay exact, each source being one worker's;
- through a forwarder (ProxyProtocolSources), everything of that forwarder is one worker's.

What must be global lives in :class:`~gatehouse.sg.shared.SharedState` (MaxConnections across
workers, a grant accepted once across workers). ``/metrics`` of the supervisor adds per-worker
series of the sessions and connections.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from gatehouse import workers
from gatehouse.sg.settings import SHUTDOWN_GRACE, SgSettings
from gatehouse.sg.shared import SharedState
from gatehouse.sg.udp import SOCKET_BUFFER, _set_buffers
from gatehouse.workers import WorkerPlace, insn

SKF_NET_OFF = -0x100000
# Families that are the same in every worker: the supervisor gives its own, not a sum.
_NOT_SUMMED = frozenset(
    {"gatehouse_sg_max_connections", "gatehouse_tls_certificate_expiry_timestamp_seconds"}
)
# Per-worker series (label ``worker``) of these worker families.
_PER_WORKER = {
    "gatehouse_sg_connections_open": "gatehouse_sg_worker_connections_open",
    "gatehouse_sg_sessions_active": "gatehouse_sg_worker_sessions_active",
    "gatehouse_sg_sessions_accepted": "gatehouse_sg_worker_sessions_accepted",
}


# ---------------------------------------------------------------- steering


def steering_program(workers: int) -> bytes:
    """Classic BPF for SO_ATTACH_REUSEPORT_CBPF: the worker index of a packet's source address,
    :func:`worker_for` computed in the kernel (IPv4: the address; IPv6: its /64)."""
    ld_b, ld_w, alu, jmp, ret, misc = 0x30, 0x20, 0x04, 0x05, 0x06, 0x07  # ld with BPF_ABS
    rsh, xor, mod, jeq, ja, x_src, tax, ret_a = 0x70, 0xA0, 0x90, 0x10, 0x00, 0x08, 0x00, 0x10
    return b"".join(
        [
            insn(ld_b, SKF_NET_OFF),  # 0: first byte of the IP header
            insn(alu | rsh, 4),  # 1: its version
            insn(jmp | jeq, 6, jt=2),  # 2: IPv6: to 5
            insn(ld_w, SKF_NET_OFF + 12),  # 3: IPv4 source address
            insn(jmp | ja, 4),  # 4: to 9
            insn(ld_w, SKF_NET_OFF + 8),  # 5: IPv6 source, first word
            insn(misc | tax),  # 6
            insn(ld_w, SKF_NET_OFF + 12),  # 7: second word (the /64)
            insn(alu | xor | x_src),  # 8
            insn(misc | tax),  # 9: fold the bits down
            insn(alu | rsh, 16),
            insn(alu | xor | x_src),
            insn(misc | tax),
            insn(alu | rsh, 8),
            insn(alu | xor | x_src),
            insn(alu | mod, workers),
            insn(ret | ret_a),
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


def supervise(settings: SgSettings, run_worker: Callable[[WorkerPlace], Coroutine[Any, Any, None]]) -> None:
    """Run ``settings.workers`` workers (each ``run_worker(place)`` in its own process) until SIGTERM.

    A worker's place has its ``tcp`` and ``udp`` sockets (both steered by the client's address)."""
    count = settings.workers
    program = steering_program(count)
    host, port = settings.listen_address, settings.port
    groups = {
        "tcp": workers.reuseport_sockets(host, port, socket.SOCK_STREAM, count, program),
        "udp": workers.reuseport_sockets(
            host, port, socket.SOCK_DGRAM, count, program, prepare=lambda s: _set_buffers(s, SOCKET_BUFFER)
        ),
    }

    def constants() -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gatehouse_sg_max_connections", "MaxConnections setting", value=settings.max_connections
        )

    service = workers.Service(
        name="sg",
        admin_address=settings.admin_address,
        admin_port=settings.admin_port,
        cert_files=(settings.ssl_cert,),
        listening=f"{host}:{port}",
        grace=SHUTDOWN_GRACE,
        hang_timeout=settings.worker_hang_timeout,
        not_summed=_NOT_SUMMED,
        per_worker=_PER_WORKER,
        constants=constants,
    )
    workers.supervise(service, groups, SharedState(count), run_worker)
