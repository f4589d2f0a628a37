# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""System requirements of a connection manager / security gateway host (private to the collection).

Minimums from the product documentation: 2 or more CPUs (2.5 GHz or higher), 4 GB of RAM, 4 GB of
swap space, 10 GB of free disk space, Docker 20.10.0 or higher, and no podman or buildah (they
conflict with Docker). Facts are gathered by ``gather_facts`` and judged by the pure ``evaluate``.
"""

from __future__ import annotations

import os
import platform
import re

DEFAULT_MIN_DOCKER = "20.10.0"
GIB = 1024**3


def parse_meminfo(text: str) -> dict:
    """``/proc/meminfo`` -> {"MemTotal": bytes, ...}."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+):\s+(\d+)(?:\s+kB)?\s*$", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values


def parse_cpu_mhz(text: str) -> float | None:
    """Highest ``cpu MHz`` in ``/proc/cpuinfo`` (None when the kernel does not report it)."""
    speeds = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)\s*$", text, re.MULTILINE)]
    return max(speeds) if speeds else None


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``20.10.24+dfsg1`` -> (20, 10, 24); ``24.0`` -> (24, 0, 0); None when unparseable."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def parse_os_release(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def existing_ancestor(path: str) -> str:
    """The path itself or its nearest existing parent (the data directory may not exist before install)."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def gather_facts(
    disk_path: str, run_command, find_binary, conflicting_commands: list[str], docker_host=None
) -> dict:
    """Measure the host. ``run_command(argv) -> (rc, out, err)``; ``find_binary(name) -> path | None``."""
    meminfo = parse_meminfo(_read("/proc/meminfo"))
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = None
    checked_path = existing_ancestor(disk_path)
    try:
        stats = os.statvfs(checked_path)
        disk_free = stats.f_bavail * stats.f_frsize
        disk_total = stats.f_blocks * stats.f_frsize
    except OSError:
        disk_free = disk_total = None
    os_release = parse_os_release(_read("/etc/os-release"))
    facts = {
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "cpu_mhz": parse_cpu_mhz(_read("/proc/cpuinfo")),
        "memory_mb": meminfo["MemTotal"] // (1024 * 1024) if "MemTotal" in meminfo else None,
        "swap_mb": meminfo["SwapTotal"] // (1024 * 1024) if "SwapTotal" in meminfo else None,
        "disk_path": disk_path,
        "disk_path_checked": checked_path,
        "disk_free_gb": round(disk_free / GIB, 2) if disk_free is not None else None,
        "disk_total_gb": round(disk_total / GIB, 2) if disk_total is not None else None,
        "os": {
            "name": os_release.get("NAME"),
            "id": os_release.get("ID"),
            "version_id": os_release.get("VERSION_ID"),
            "pretty_name": os_release.get("PRETTY_NAME"),
            "kernel": platform.release(),
            "architecture": platform.machine(),
        },
        "docker": docker_facts(run_command, find_binary, docker_host),
        "conflicting_commands": {},
    }
    for name in conflicting_commands:
        found = find_binary(name)
        if found:
            facts["conflicting_commands"][name] = found
    return facts


def docker_facts(run_command, find_binary, docker_host=None) -> dict:
    cli = find_binary("docker")
    result = {"cli": cli, "client_version": None, "server_version": None, "error": None}
    if not cli:
        result["error"] = "the docker command is not installed"
        return result
    argv = [cli]
    if docker_host:
        argv += ["--host", docker_host]
    rc, out, err = run_command([*argv, "version", "--format", "{{.Client.Version}}|{{.Server.Version}}"])
    parts = (out or "").strip().split("|")
    result["client_version"] = (parts[0] or None) if parts else None
    if len(parts) == 2 and parts[1]:
        result["server_version"] = parts[1]
    if rc != 0 or not result["server_version"]:
        detail = (err or out or "").strip().splitlines()
        result["error"] = "cannot reach the Docker engine: %s" % (detail[-1] if detail else "rc=%d" % rc)
    return result


def _check(name: str, passed: bool, measured, required, msg: str) -> dict:
    return {"name": name, "passed": passed, "measured": measured, "required": required, "msg": msg}


def evaluate(facts: dict, params: dict) -> tuple[list[dict], list[str]]:
    """Judge the facts; returns every check (passed or not) and the warnings."""
    checks = []
    warnings = []
    tolerance = params["memory_tolerance_percent"] / 100.0

    cpus = facts["usable_cpus"] or facts["cpus"] or 0
    checks.append(
        _check(
            "cpus",
            cpus >= params["min_cpus"],
            cpus,
            params["min_cpus"],
            "%d CPU(s) usable, at least %d required" % (cpus, params["min_cpus"]),
        )
    )
    mhz = facts.get("cpu_mhz")
    if params["min_cpu_mhz"] and mhz is not None and mhz < params["min_cpu_mhz"]:
        warnings.append(
            "CPU clock is %.0f MHz, %d MHz or more is recommended (virtual machines may report a lower "
            "current clock)" % (mhz, params["min_cpu_mhz"])
        )

    for name, fact, option in (("memory", "memory_mb", "min_memory_mb"), ("swap", "swap_mb", "min_swap_mb")):
        required = params[option]
        measured = facts[fact]
        if not required:
            continue
        threshold = int(required * (1.0 - tolerance))
        if measured is None:
            checks.append(_check(name, False, None, required, "%s size is unknown (no /proc/meminfo)" % name))
            continue
        checks.append(
            _check(
                name,
                measured >= threshold,
                measured,
                required,
                "%s is %d MB, at least %d MB required (%d MB accepted: %g%% tolerance for what the kernel "
                "and firmware reserve)"
                % (name, measured, required, threshold, params["memory_tolerance_percent"]),
            )
        )

    free = facts["disk_free_gb"]
    disk_ok = free is not None and free >= params["min_disk_gb"]
    disk_msg = "%s GB free at %s (checked at %s), at least %g GB required" % (
        free,
        facts["disk_path"],
        facts["disk_path_checked"],
        params["min_disk_gb"],
    )
    if params["ignore_disk_req"]:
        if not disk_ok:
            warnings.append("disk requirement ignored (ignore_disk_req): " + disk_msg)
    else:
        checks.append(_check("disk", disk_ok, free, params["min_disk_gb"], disk_msg))

    if params["check_docker"]:
        docker = facts["docker"]
        minimum = parse_version(params["min_docker_version"])
        found = parse_version(docker["server_version"] or "")
        if docker["error"]:
            checks.append(
                _check(
                    "docker", False, docker["server_version"], params["min_docker_version"], docker["error"]
                )
            )
        elif found is None:
            checks.append(
                _check(
                    "docker",
                    False,
                    docker["server_version"],
                    params["min_docker_version"],
                    "cannot parse the Docker engine version %r" % docker["server_version"],
                )
            )
        else:
            checks.append(
                _check(
                    "docker",
                    found >= minimum,
                    docker["server_version"],
                    params["min_docker_version"],
                    "Docker engine %s, %s or higher required"
                    % (docker["server_version"], params["min_docker_version"]),
                )
            )

    conflicts = facts["conflicting_commands"]
    checks.append(
        _check(
            "conflicting_packages",
            not conflicts,
            sorted(conflicts),
            [],
            (
                "%s installed (%s); they conflict with Docker, remove them (dnf remove %s)"
                % (
                    " and ".join(sorted(conflicts)),
                    ", ".join(conflicts[n] for n in sorted(conflicts)),
                    " ".join(sorted(conflicts)),
                )
            )
            if conflicts
            else "no %s installed" % " or ".join(params["conflicting_commands"]),
        )
    )
    return checks, warnings


def validate_params(params: dict) -> list[str]:
    problems = []
    for option in ("min_cpus", "min_memory_mb", "min_swap_mb"):
        if params[option] < 0:
            problems.append("%s must not be negative" % option)
    if params["min_disk_gb"] < 0:
        problems.append("min_disk_gb must not be negative")
    if not 0 <= params["memory_tolerance_percent"] < 50:
        problems.append("memory_tolerance_percent must be between 0 and 50")
    if parse_version(params["min_docker_version"]) is None:
        problems.append("min_docker_version %r is not a version like 20.10.0" % params["min_docker_version"])
    return problems


def run(params: dict, run_command, find_binary) -> dict:
    problems = validate_params(params)
    if problems:
        return {"failed": True, "changed": False, "msg": "; ".join(problems)}
    facts = gather_facts(
        params["disk_path"],
        run_command,
        find_binary,
        params["conflicting_commands"],
        params.get("docker_host"),
    )
    checks, warnings = evaluate(facts, params)
    failed = [{"name": c["name"], "msg": c["msg"]} for c in checks if not c["passed"]]
    result = {
        "changed": False,
        "facts": facts,
        "checks": checks,
        "failed_checks": failed,
        "warnings_list": warnings,
    }
    if failed:
        result["failed"] = True
        result["msg"] = "%d system requirement(s) not met: %s" % (
            len(failed),
            "; ".join("%s: %s" % (f["name"], f["msg"]) for f in failed),
        )
    else:
        result["msg"] = "all system requirements met"
    return result
