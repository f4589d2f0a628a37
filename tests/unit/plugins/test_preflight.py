"""System requirement checks (module_utils._ops.preflight): parsing, judging, and measuring this host."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
pf = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._ops.preflight")

DEFAULTS = {
    "min_cpus": 2,
    "min_cpu_mhz": 2500,
    "min_memory_mb": 4096,
    "min_swap_mb": 4096,
    "memory_tolerance_percent": 10,
    "min_disk_gb": 10,
    "disk_path": "/opt",
    "ignore_disk_req": False,
    "check_docker": True,
    "min_docker_version": "20.10.0",
    "docker_host": None,
    "conflicting_commands": ["podman", "buildah"],
}


def facts(**overrides) -> dict:
    base = {
        "cpus": 2,
        "usable_cpus": 2,
        "cpu_mhz": 2600.0,
        "memory_mb": 3800,
        "swap_mb": 4095,
        "disk_path": "/opt",
        "disk_path_checked": "/opt",
        "disk_free_gb": 12.0,
        "docker": {
            "cli": "/usr/bin/docker",
            "client_version": "20.10.24",
            "server_version": "20.10.24",
            "error": None,
        },
        "conflicting_commands": {},
    }
    base.update(overrides)
    return base


def failed_names(checks: list[dict]) -> list[str]:
    return [c["name"] for c in checks if not c["passed"]]


def test_minimum_host_passes_within_tolerance() -> None:
    # A nominal 4 GB machine reports ~3.8 GB; a 4 GB swap partition reports 4 KB less.
    checks, warnings = pf.evaluate(facts(), DEFAULTS)
    assert failed_names(checks) == []
    assert warnings == []
    assert [c["name"] for c in checks] == ["cpus", "memory", "swap", "disk", "docker", "conflicting_packages"]


def test_tolerance_boundary() -> None:
    threshold = int(4096 * 0.9)
    assert failed_names(pf.evaluate(facts(memory_mb=threshold), DEFAULTS)[0]) == []
    assert failed_names(pf.evaluate(facts(memory_mb=threshold - 1), DEFAULTS)[0]) == ["memory"]
    strict = dict(DEFAULTS, memory_tolerance_percent=0)
    assert failed_names(pf.evaluate(facts(memory_mb=4095, swap_mb=4096), strict)[0]) == ["memory"]


def test_every_failure_reported_at_once() -> None:
    bad = facts(
        cpus=1,
        usable_cpus=1,
        memory_mb=2048,
        swap_mb=0,
        disk_free_gb=3.5,
        docker=dict(facts()["docker"], server_version="19.03.15"),
        conflicting_commands={"podman": "/usr/bin/podman", "buildah": "/usr/bin/buildah"},
    )
    checks, _warnings = pf.evaluate(bad, DEFAULTS)
    assert failed_names(checks) == ["cpus", "memory", "swap", "disk", "docker", "conflicting_packages"]
    messages = {c["name"]: c["msg"] for c in checks}
    assert "19.03.15" in messages["docker"] and "20.10.0" in messages["docker"]
    assert "buildah and podman" in messages["conflicting_packages"]
    assert "3.5 GB free" in messages["disk"]


def test_affinity_limits_cpus() -> None:
    checks, _warnings = pf.evaluate(facts(cpus=8, usable_cpus=1), DEFAULTS)
    assert failed_names(checks) == ["cpus"]


def test_ignore_disk_req_turns_failure_into_warning() -> None:
    checks, warnings = pf.evaluate(facts(disk_free_gb=1.0), dict(DEFAULTS, ignore_disk_req=True))
    assert "disk" not in [c["name"] for c in checks]
    assert any("ignore_disk_req" in w for w in warnings)


def test_swap_check_disabled_with_zero() -> None:
    checks, _warnings = pf.evaluate(facts(swap_mb=0), dict(DEFAULTS, min_swap_mb=0))
    assert "swap" not in [c["name"] for c in checks]


def test_unreachable_docker_fails() -> None:
    docker = {
        "cli": "/usr/bin/docker",
        "client_version": "24.0.7",
        "server_version": None,
        "error": "cannot reach",
    }
    checks, _warnings = pf.evaluate(facts(docker=docker), DEFAULTS)
    assert failed_names(checks) == ["docker"]
    assert failed_names(pf.evaluate(facts(docker=docker), dict(DEFAULTS, check_docker=False))[0]) == []


def test_slow_cpu_only_warns() -> None:
    checks, warnings = pf.evaluate(facts(cpu_mhz=2000.0), DEFAULTS)
    assert failed_names(checks) == []
    assert any("2000 MHz" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20.10.24+dfsg1", (20, 10, 24)),
        ("20.10.0", (20, 10, 0)),
        ("24.0", (24, 0, 0)),
        ("v27.3.1", (27, 3, 1)),
        ("19.03.15", (19, 3, 15)),
        ("garbage", None),
    ],
)
def test_parse_version(text: str, expected) -> None:
    assert pf.parse_version(text) == expected


def test_version_comparison_is_numeric() -> None:
    assert pf.parse_version("20.9.0") < pf.parse_version("20.10.0") <= pf.parse_version("20.10.0")


def test_parse_meminfo_and_cpuinfo() -> None:
    meminfo = "MemTotal:        3880000 kB\nSwapTotal:       4194300 kB\nHugePages_Total:       0\n"
    values = pf.parse_meminfo(meminfo)
    assert values["MemTotal"] == 3880000 * 1024
    assert values["SwapTotal"] // (1024 * 1024) == 4095
    assert pf.parse_cpu_mhz("cpu MHz\t\t: 2400.000\ncpu MHz\t\t: 2600.123\n") == pytest.approx(2600.123)
    assert pf.parse_cpu_mhz("processor : 0\n") is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"min_cpus": -1},
        {"memory_tolerance_percent": 60},
        {"min_docker_version": "latest"},
        {"min_disk_gb": -2},
    ],
)
def test_bad_parameters(overrides: dict) -> None:
    probed: list[Any] = []

    def run_command(argv: Any) -> tuple[int, str, str]:
        probed.append(argv)
        return 0, "", ""

    result = pf.run(dict(DEFAULTS, **overrides), run_command, lambda name: None)
    assert result["failed"] is True and result["changed"] is False
    # Refused by the parameter check, naming the option, before the host is probed.
    (option,) = overrides
    assert option in result["msg"]
    assert probed == []


def test_existing_ancestor(tmp_path: Path) -> None:
    assert pf.existing_ancestor(str(tmp_path / "a" / "b")) == str(tmp_path)
    assert pf.existing_ancestor(str(tmp_path)) == str(tmp_path)


def _real_run(argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_gather_facts_measures_this_host(tmp_path: Path) -> None:
    measured = pf.gather_facts(str(tmp_path / "not-yet"), _real_run, shutil.which, ["podman", "buildah"])
    assert measured["cpus"] == os.cpu_count()
    assert measured["memory_mb"] > 0
    assert measured["disk_path_checked"] == str(tmp_path)
    stats = os.statvfs(tmp_path)
    assert measured["disk_free_gb"] == pytest.approx(stats.f_bavail * stats.f_frsize / 1024**3, abs=0.5)
    with open("/proc/meminfo") as handle:
        mem_kb = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1])
    assert measured["memory_mb"] == mem_kb // 1024


@pytest.mark.docker
@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_docker_version_from_real_engine() -> None:
    proc = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip("docker engine not reachable")
    docker = pf.docker_facts(_real_run, shutil.which)
    assert docker["error"] is None
    assert docker["server_version"] == proc.stdout.strip()
