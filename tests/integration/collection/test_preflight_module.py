"""gatehouse.access.preflight through ansible against this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module

# This machine has no swap; the documented 4 GB swap minimum is checked in its own test.
LAB = {"min_swap_mb": 0, "disk_path": "/opt/gatehouse", "min_disk_gb": 1}


def snapshot(path: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*"))


def test_passes_on_this_machine_and_changes_nothing(tmp_path: Path) -> None:
    args = dict(LAB, disk_path=str(tmp_path / "opt" / "gatehouse"))
    before = snapshot(tmp_path)
    runs = [
        run_module("preflight", args, check=True),
        run_module("preflight", args),
        run_module("preflight", args, check=True),
        run_module("preflight", args),
    ]
    for run in runs:
        assert not run.failed, run.result
        assert run.changed is False
        assert run.result["failed_checks"] == []
    facts = runs[1].result["facts"]
    assert facts["cpus"] == os.cpu_count()
    assert facts["disk_path_checked"] == str(tmp_path)
    assert facts["docker"]["server_version"]
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "opt").exists()


def test_documented_swap_minimum_is_checked() -> None:
    with open("/proc/meminfo") as handle:
        swap_kb = int(next(line for line in handle if line.startswith("SwapTotal:")).split()[1])
    run = run_module("preflight", {"disk_path": "/opt", "min_disk_gb": 1})
    names = [c["name"] for c in run.result["failed_checks"]]
    if swap_kb // 1024 >= int(4096 * 0.9):
        assert "swap" not in names
    else:
        assert run.failed
        assert "swap" in names
        assert run.result["facts"]["swap_mb"] == swap_kb // 1024


def test_all_failures_at_once(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("podman", "buildah"):
        tool = fake_bin / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    args = {
        "min_cpus": 512,
        "min_memory_mb": 64 * 1024 * 1024,
        "min_disk_gb": 10**7,
        "docker_host": f"unix://{tmp_path}/no-such-docker.sock",
        "disk_path": str(tmp_path),
    }
    run = run_module("preflight", args, env=env)
    assert run.failed
    names = [c["name"] for c in run.result["failed_checks"]]
    assert {"cpus", "memory", "disk", "docker", "conflicting_packages"} <= set(names)
    assert run.result["facts"]["conflicting_commands"] == {
        "buildah": str(fake_bin / "buildah"),
        "podman": str(fake_bin / "podman"),
    }
    assert "cannot reach the Docker engine" in next(
        c["msg"] for c in run.result["failed_checks"] if c["name"] == "docker"
    )
    ignored = run_module("preflight", dict(LAB, min_disk_gb=10**7, ignore_disk_req=True))
    assert not ignored.failed, ignored.result
    assert any("ignore_disk_req" in w for w in ignored.warnings)
