"""Workers in SecurityGateway.conf, the state the SG's workers share, and the steering function.

The cross-worker behaviour with real processes is in tests/integration/services/test_sg_workers.py.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import time

import pytest

from gatehouse.config import Config, ConfigError
from gatehouse.grant import Grant, generate_secret
from gatehouse.sg.settings import MAX_WORKERS, SgSettings
from gatehouse.sg.shared import PROBE, ReplayTableFull, SharedState
from gatehouse.sg.workers import SKF_NET_OFF, steering_program, worker_for

ENV = {"GATEHOUSE_GRANTSECRET": generate_secret()}
BASE = {"AgentCaCert": "/ca.pem"}


def settings(**values: str) -> SgSettings:
    return SgSettings.from_config(Config({**BASE, **values}, ENV))


def grant(nonce: bytes, expires: float) -> Grant:
    return Grant("sid", "10.0.0.5", 4172, "tag", "192.0.2.1", expires, nonce)


def test_workers_default_to_the_cpus_this_process_may_use() -> None:
    assert settings().workers == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert settings(Workers="0").workers == settings().workers
    assert settings(Workers="1").workers == 1
    assert settings(Workers="3").workers == 3
    env = {**ENV, "GATEHOUSE_WORKERS": "2"}
    assert SgSettings.from_config(Config({**BASE, "Workers": "5"}, env)).workers == 2


@pytest.mark.parametrize("value", ["-1", str(MAX_WORKERS + 1), "two"])
def test_workers_out_of_range_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="Workers"):
        settings(Workers=value)


def test_the_worker_hang_timeout_is_the_same_key_as_the_cms() -> None:
    assert settings().worker_hang_timeout == 30.0
    assert settings(WorkerHangTimeout="0").worker_hang_timeout == 0.0
    with pytest.raises(ConfigError, match=r"WorkerHangTimeout must be 0 \(off\) or at least 3"):
        settings(WorkerHangTimeout="1")


def test_a_forwarder_runs_one_process() -> None:
    forwarder = {"ForwardTo": "10.20.0.5:4172"}
    assert SgSettings.from_config(Config(forwarder, {})).workers == 1
    assert SgSettings.from_config(Config({**forwarder, "Workers": "1"}, {})).workers == 1
    with pytest.raises(ConfigError, match="Workers: a forwarder runs as one process"):
        SgSettings.from_config(Config({**forwarder, "Workers": "2"}, {}))


def test_connection_slots_are_counted_across_workers() -> None:
    shared = SharedState(3)
    try:
        assert shared.take_slot(0, 3) and shared.take_slot(1, 3) and shared.take_slot(2, 3)
        assert not shared.take_slot(0, 3) and not shared.take_slot(2, 3)  # the sum is at the limit
        assert shared.total_open() == 3
        shared.give_slot(1)
        assert shared.take_slot(0, 3)  # the slot worker 1 gave back
        assert (shared.open_count(0), shared.open_count(1), shared.total_open()) == (2, 0, 3)
        shared.reset_worker(0)  # worker 0 died: its connections are gone
        assert shared.total_open() == 1
        shared.give_slot(1)  # never below zero
        assert shared.open_count(1) == 0
    finally:
        shared.close()


def test_a_grant_is_accepted_once_in_the_shared_table_until_it_expires() -> None:
    shared = SharedState(2, replay_slots=256)
    now = time.time()
    try:
        first = grant(b"n" * 12, now + 30)
        assert shared.accept_grant(first, now)
        assert not shared.accept_grant(first, now)
        assert not shared.accept_grant(first, now + 29)
        assert shared.accept_grant(grant(b"m" * 12, now + 30), now)
        # An expired entry's slot is reused (an expired grant is refused before this check).
        assert shared.accept_grant(first, now + 31)
    finally:
        shared.close()


def test_a_full_replay_window_refuses_rather_than_forgets() -> None:
    shared = SharedState(1, replay_slots=PROBE)  # every nonce shares the one window
    now = time.time()
    try:
        for i in range(PROBE):
            assert shared.accept_grant(grant(i.to_bytes(12, "little"), now + 30), now)
        with pytest.raises(ReplayTableFull):
            shared.accept_grant(grant(b"x" * 12, now + 30), now)
        for i in range(PROBE):  # none was dropped to make room
            assert not shared.accept_grant(grant(i.to_bytes(12, "little"), now + 30), now)
        assert shared.accept_grant(grant(b"x" * 12, now + 60), now + 31)  # the others expired
    finally:
        shared.close()


def test_the_shared_table_is_shared_with_a_forked_process() -> None:
    shared = SharedState(2, replay_slots=256)
    now = time.time()
    try:
        pid = os.fork()
        if pid == 0:
            ok = shared.take_slot(1, 5) and shared.accept_grant(grant(b"c" * 12, now + 30), now)
            os._exit(0 if ok else 1)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert shared.open_count(1) == 1
        assert not shared.accept_grant(grant(b"c" * 12, now + 30), now)
    finally:
        shared.close()


def test_steering_keeps_a_source_on_one_worker() -> None:
    # IPv4-mapped addresses are IPv4 packets on a dual-stack socket: the same worker.
    for ip in ("192.0.2.1", "198.51.100.77", "10.1.2.3"):
        assert worker_for(f"::ffff:{ip}", 4) == worker_for(ip, 4)
    # An IPv6 /64 is one source (web.source_key): one worker for the whole prefix.
    assert len({worker_for(f"2001:db8:1:2::{i:x}", 4) for i in range(1, 200)}) == 1
    # Addresses spread over all workers.
    assert {worker_for(f"192.0.2.{i}", 4) for i in range(1, 64)} == {0, 1, 2, 3}
    assert len(steering_program(4)) % 8 == 0


def run_classic_bpf(program: bytes, network_header: bytes) -> int:
    """A classic BPF interpreter for the instructions the steering program uses; loads at
    SKF_NET_OFF + k read the packet's network header, as the kernel's do."""
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    a = x = pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code in (0x30, 0x20):  # ld b / ld w, absolute, below SKF_NET_OFF
            offset = k - (SKF_NET_OFF & 0xFFFFFFFF)
            size = 1 if code == 0x30 else 4
            a = int.from_bytes(network_header[offset : offset + size], "big")
        elif code == 0x74:
            a >>= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x05:
            pc += k
        elif code == 0x07:
            x = a
        elif code == 0xAC:
            a ^= x
        elif code == 0x94:
            a %= k
        elif code == 0x16:
            return a
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_the_kernel_program_computes_worker_for(workers: int) -> None:
    program = steering_program(workers)
    for ip in ("127.0.0.1", "127.0.0.2", "192.0.2.77", "10.255.0.9", *(f"198.51.100.{i}" for i in range(40))):
        header = bytes([0x45]) + bytes(11) + ipaddress.IPv4Address(ip).packed + bytes(4)
        assert run_classic_bpf(program, header) == worker_for(ip, workers), ip
    for ip in (
        "::1",
        "2001:db8::1",
        "2001:db8:0:1::1",
        "fd00:10:101::5",
        *(f"2001:db8:{i:x}::9" for i in range(40)),
    ):
        header = bytes([0x60]) + bytes(7) + ipaddress.IPv6Address(ip).packed + bytes(16)
        assert run_classic_bpf(program, header) == worker_for(ip, workers), ip
