"""Checks shared by the Molecule scenarios' testinfra tests.

The scenario's hosts are containers; the services run as sibling containers labelled
``gatehouse.host=<inventory host>``. The controller talks to the engine with the Docker SDK,
and runs the real client in a throwaway container on the scenario's network.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

CLIENT_IMAGE = "gatehouse/cm:0.1.0"
STATE_ROOT = Path(os.environ.get("GATEHOUSE_MOLECULE_STATE", "/var/lib/gatehouse-molecule"))
NET = os.environ.get("GATEHOUSE_MOLECULE_NET", "10.230")
NET6 = os.environ.get("GATEHOUSE_MOLECULE_NET6", "fd00:10:230")

# TLS ports in each host's network namespace, by service.
TLS_PORTS = {"broker": [8443], "cm": [8443], "sg": [4172], "agent": [60443, 4172]}


def engine() -> docker.DockerClient:
    return docker.from_env()


def address(third_octet: int, last: int) -> str:
    return f"{NET}.{third_octet}.{last}"


def address6(subnet: int, last: int) -> str:
    """The IPv6 twin of ``address``: ``<NET6>:<subnet>::<last>`` (written in hex as in molecule.yml)."""
    return f"{NET6}:{subnet}::{last}"


def services(host: str) -> dict[str, list[Any]]:
    """The service containers of one inventory host, by gatehouse.role."""
    found: dict[str, list[Any]] = {}
    for container in engine().containers.list(all=True, filters={"label": f"gatehouse.host={host}"}):
        found.setdefault(container.labels.get("gatehouse.role", ""), []).append(container)
    return found


def expected_roles(groups: list[str], gateway: bool = True) -> set[str]:
    roles: set[str] = set()
    if "brokers" in groups:
        roles.add("broker")
    if "desktops" in groups:
        roles.add("agent")
    if "cmsg" in groups:
        roles |= {"cm", "sg"} if gateway else {"cm"}
    if "halb" in groups:
        roles.add("halb")
    if "monitoring" in groups:
        roles.add("prometheus")
    if "databases" in groups:
        roles |= {"database-etcd", "database-patroni"}
    return roles


def secret_files(data_root: str, groups: list[str], agents: list[str]) -> list[str]:
    files: list[str] = []
    if "brokers" in groups:
        files += [f"{data_root}/broker/data/broker.env", f"{data_root}/broker/certs/key.pem"]
        files += [f"{data_root}/pki/broker.key"]
    if "cmsg" in groups:
        files += [f"{data_root}/cmsg/data/cmsg.env", f"{data_root}/cmsg/certs/key.pem"]
        files += [f"{data_root}/cmsg/certs/identity-key.pem", f"{data_root}/pki/cm.key"]
    for name in agents:
        # Agents have no token file: they authenticate with their certificate from the deployment CA.
        files += [f"{data_root}/agent/pki/{name}.key"]
    return files


def password(scenario: str, user: str = "demo", domain: str = "corp") -> str:
    return (STATE_ROOT / scenario / "secrets" / f"user-{domain}-{user}").read_text(encoding="utf-8").strip()


def run_client(
    network: str,
    url: str,
    secret: str,
    *args: str,
    name: str | None = None,
    user: str = "demo",
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One session with gatehouse-client in a container on the network; the parsed --json report.

    The password (and any passcode, from ``environment``) goes in through the environment, never
    on the command line.
    """
    container = engine().containers.run(
        CLIENT_IMAGE,
        entrypoint=["gatehouse-client"],
        command=[
            "--url",
            url,
            "--user",
            user,
            "--password-env",
            "GH_PASSWORD",
            "--insecure",
            "--json",
            *args,
        ],
        environment={"GH_PASSWORD": secret, **(environment or {})},
        network=network,
        name=name,
        labels={"gatehouse.role": "client"},
        detach=True,
    )
    try:
        container.wait(timeout=180)
        output = container.logs(stdout=True, stderr=False)
        errors = container.logs(stdout=False, stderr=True)
    finally:
        container.remove(force=True)
    try:
        return json.loads(output.decode("utf-8"))
    except ValueError:
        raise AssertionError(
            "gatehouse-client printed no report: " + errors.decode("utf-8", "replace")
        ) from None


def client_failure(report: dict[str, Any]) -> str:
    return "; ".join(f"{s['name']}: {s['result']} {s['detail']}" for s in report["steps"] if not s["ok"])


def assert_session(report: dict[str, Any], target_ip: str | None = None) -> None:
    assert report["ok"], client_failure(report)
    steps = {s["name"]: s for s in report["steps"]}
    for step in ("authenticate", "allocate-resource", "connect", "tcp-echo", "udp-echo", "bye"):
        assert steps[step]["ok"], f"{step}: {steps[step]}"
    if target_ip is not None:
        assert report["target"].rsplit(":", 1)[0] == target_ip


# Shows that openssl s_client in a host negotiates TLS 1.1 with SECLEVEL=0, against a local
# s_server that allows it (port 14433 on the host's loopback, one connection, then it exits).
_CALIBRATE_TLS_1_1 = (
    "d=$(mktemp -d); "
    "openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=probe -days 1 -keyout $d/k -out $d/c >/dev/null 2>&1; "
    "sleep 10 </dev/null 2>/dev/null | openssl s_server -accept 127.0.0.1:14433 -tls1_1 "
    "-cipher DEFAULT:@SECLEVEL=0 -cert $d/c -key $d/k -naccept 1 >/dev/null 2>&1 & "
    "for _ in 1 2 3 4 5 6 7 8 9 10; do sleep 0.2; "
    "out=$(openssl s_client -connect 127.0.0.1:14433 -tls1_1 -cipher DEFAULT:@SECLEVEL=0 </dev/null 2>&1) && break; "
    "done; rm -rf $d; printf '%s\\n' \"$out\" | grep -E '^ *Protocol *: *TLSv1\\.1$'"
)
_CALIBRATED: set[str] = set()


def tls_version_results(host: Any, ip: str, port: int) -> tuple[int, int]:
    """(exit code with TLS 1.1 offered, exit code with TLS 1.2) of openssl s_client in the host.

    SECLEVEL=0 lets this client offer TLS 1.1 at all; that it really does is shown once per host
    against a local server that accepts TLS 1.1, so a failure below is the server's refusal.
    """
    if host.backend.hostname not in _CALIBRATED:
        calibration = host.run(_CALIBRATE_TLS_1_1)
        assert calibration.rc == 0, f"openssl s_client cannot offer TLS 1.1 here: {calibration.stdout}"
        _CALIBRATED.add(host.backend.hostname)
    target = f"{ip}:{port}"
    old = host.run("openssl s_client -connect %s -tls1_1 -cipher DEFAULT:@SECLEVEL=0 </dev/null", target)
    new = host.run("openssl s_client -connect %s -tls1_2 </dev/null", target)
    return old.rc, new.rc


def holds_vip(node: str, vip: str) -> bool:
    """Whether the host container `node` has the VIP on one of its interfaces."""
    container = engine().containers.get(node)
    if container.status != "running":
        return False
    code, output = container.exec_run(["ip", "-o", "-4", "addr", "show"])
    return code == 0 and f" {vip}/" in output.decode()


def wait_for(predicate: Callable[[], bool], attempts: int = 60, interval: float = 0.5) -> bool:
    """Poll until predicate() is true; a bounded wait for a state change, not a timing assertion."""
    for attempt in range(attempts):
        if predicate():
            return True
        if attempt + 1 < attempts:
            time.sleep(interval)
    return False


REPO = Path(__file__).resolve().parents[2]


def run_playbook(playbook: str, *extra: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """ansible-playbook on the scenario's inventory with the checkout as the collection."""
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=str(REPO / "build" / "collections"),
        ANSIBLE_PIPELINING="true",
        ANSIBLE_NOCOLOR="true",
    )
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(REPO / "playbooks" / playbook),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:[a-z]+=\d+\s*)+)$")


def play_recap(stdout: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of an ansible-playbook run: its counters (ok, changed, failed, ...) by host."""
    _head, found, tail = stdout.rpartition("PLAY RECAP")
    assert found, "no PLAY RECAP in the output: " + stdout[-2000:]
    recap: dict[str, dict[str, int]] = {}
    for line in tail.splitlines()[1:]:
        match = _RECAP_LINE.match(line.strip())
        if match is None:
            if recap:
                break  # the recap is over (the profile_tasks callback may follow)
            continue
        counts = dict(item.split("=") for item in match["counts"].split())
        recap[match["host"]] = {key: int(value) for key, value in counts.items()}
    return recap


# --- hostile-internet hardening ----------------------------------------------------------------

# What every service container runs with (plugins/module_utils/_docker/containers.py SERVICE_HARDENING).
HARDENING_CAP_ADD = {
    "cm": [],
    "sg": [],
    "broker": [],
    "agent": [],
    "halb": ["KILL", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW", "SETGID", "SETUID"],
    "prometheus": [],
}
NOFILE = 65536


@functools.cache
def engine_nofile() -> int:
    """The open files limit the engine gives containers by default; container limits are capped by it."""
    out = engine().containers.run(
        CLIENT_IMAGE, entrypoint=["sh", "-c", "ulimit -Hn"], command=[], network_mode="none", remove=True
    )
    text = out.decode().strip()
    return int(text) if text.isdigit() else 1 << 30


def assert_locked_down(container: Any, nofile: int) -> None:
    """CapDrop ALL plus the role's capabilities, no-new-privileges, read-only root, memory/pids/nofile limits."""
    role = container.labels["gatehouse.role"]
    host_config = container.attrs["HostConfig"]
    what = f"{container.name} ({role})"
    assert host_config.get("CapDrop") == ["ALL"], what
    assert sorted(host_config.get("CapAdd") or []) == HARDENING_CAP_ADD[role], what
    assert any(opt.startswith("no-new-privileges") for opt in host_config.get("SecurityOpt") or []), what
    assert host_config.get("ReadonlyRootfs") is True, what
    assert "/tmp" in (host_config.get("Tmpfs") or {}), what  # noqa: S108 - inside the container
    assert (host_config.get("Memory") or 0) > 0, what
    assert (host_config.get("PidsLimit") or 0) > 0, what
    expected = min(NOFILE, nofile)
    assert {"Name": "nofile", "Soft": expected, "Hard": expected} in (host_config.get("Ulimits") or []), what


# One process per client container that starts a session every `period` seconds (or as soon as the
# previous one ended) for a bounded time and prints one JSON line per session (start and end on
# the engine host's clock, outcome, target). The pace keeps the placements within the desktops'
# capacity between two load reports (agent ReportInterval 10 s, Capacity 10): the broker counts
# every placement until the desktop's next report.
SESSION_LOOP = r"""
import json, os, subprocess, sys, time
url, seconds, period = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
end = time.time() + seconds
for attempt in range(500):
    if attempt:
        time.sleep(max(0.0, start + period - time.time()))
    if time.time() >= end:
        break
    start = time.time()
    argv = ["gatehouse-client", "--url", url, "--user", "demo", "--password-env", "GH_PASSWORD",
            "--insecure", "--json", "--timeout", "10"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        report = json.loads(proc.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        report = {"ok": False, "steps": [{"name": "run", "ok": False, "result": "error", "detail": str(exc)}]}
    failed = [s["name"] + ": " + str(s.get("detail", "")) for s in report.get("steps", []) if not s.get("ok")]
    print(json.dumps({"start": start, "end": time.time(), "ok": bool(report.get("ok")),
                      "target": report.get("target") or "", "failure": "; ".join(failed)[:300]}), flush=True)
"""


def start_client_script(network: str, script: str, *args: str, secret: str, name: str | None = None) -> Any:
    """A Python script with the client image's gatehouse package, in a container on the network
    (detached). The password goes in through GH_PASSWORD, never on the command line."""
    return engine().containers.run(
        CLIENT_IMAGE,
        entrypoint=["python3", "-c", script, *args],
        command=[],
        environment={"GH_PASSWORD": secret},
        network=network,
        name=name,
        labels={"gatehouse.role": "client"},
        detach=True,
    )


def client_script_result(container: Any, timeout: float = 120) -> dict[str, Any]:
    """Wait for a start_client_script container, remove it, and parse its last line of output (JSON)."""
    try:
        container.wait(timeout=timeout)
        output = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        errors = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
    finally:
        remove_quietly(container)
    assert output.strip(), errors[-2000:]
    return json.loads(output.strip().splitlines()[-1])


def start_session_loop(
    network: str, url: str, secret: str, seconds: float, name: str, period: float = 1.0
) -> Any:
    """A client container running sessions through ``url`` for ``seconds``; read it with session_loop_results."""
    return start_client_script(
        network, SESSION_LOOP, url, str(seconds), str(period), secret=secret, name=name
    )


def remove_quietly(container: Any) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass


def wait_for_first_session(container: Any, timeout: float = 30.0) -> None:
    """Until a start_session_loop() container has finished a session: a loaded machine may take
    longer than usual to start the client, and a test that disturbs the service must not begin
    before there is a session to compare with."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b'"start"' in container.logs(stdout=True, stderr=False):
            return
        time.sleep(0.5)
    raise AssertionError(f"the session loop {container.name} finished no session in {timeout:.0f} s")


def session_loop_results(container: Any, timeout: float) -> list[dict[str, Any]]:
    """The sessions a start_session_loop() container ran (waits for it to finish, then removes it)."""
    try:
        container.wait(timeout=timeout)
        output = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        errors = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    sessions = []
    for line in output.splitlines():
        try:
            sessions.append(json.loads(line))
        except ValueError:
            continue
    assert sessions, "the session loop ran no session: " + errors[-1000:]
    return sessions
