"""Checks shared by the Molecule scenarios' testinfra tests.

The scenario's hosts are containers; the services run as sibling containers labelled
``gatehouse.host=<inventory host>``. The controller talks to the engine with the Docker SDK,
and runs the real client in a throwaway container on the scenario's network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

CLIENT_IMAGE = "gatehouse/cm:0.1.0"
STATE_ROOT = Path(os.environ.get("GATEHOUSE_MOLECULE_STATE", "/var/lib/gatehouse-molecule"))
NET = os.environ.get("GATEHOUSE_MOLECULE_NET", "10.230")

# TLS ports in each host's network namespace, by service.
TLS_PORTS = {"broker": [8443], "cm": [8443], "sg": [4172], "agent": [60443, 4172]}


def engine() -> docker.DockerClient:
    return docker.from_env()


def address(third_octet: int, last: int) -> str:
    return f"{NET}.{third_octet}.{last}"


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
    return roles


def secret_files(data_root: str, groups: list[str], agents: list[str]) -> list[str]:
    files: list[str] = []
    if "brokers" in groups:
        files += [f"{data_root}/broker/data/broker.env", f"{data_root}/broker/certs/key.pem"]
    if "cmsg" in groups:
        files += [f"{data_root}/cmsg/data/cmsg.env", f"{data_root}/cmsg/certs/key.pem"]
    for name in agents:
        files += [f"{data_root}/agent/{name}/data/agent.env", f"{data_root}/agent/{name}/certs/key.pem"]
    return files


def password(scenario: str, user: str = "demo", domain: str = "corp") -> str:
    return (STATE_ROOT / scenario / "secrets" / f"user-{domain}-{user}").read_text(encoding="utf-8").strip()


def run_client(network: str, url: str, secret: str, *args: str, name: str | None = None) -> dict[str, Any]:
    """One session with gatehouse-client in a container on the network; the parsed --json report.

    The password goes in through the environment, never on the command line.
    """
    container = engine().containers.run(
        CLIENT_IMAGE,
        entrypoint=["gatehouse-client"],
        command=[
            "--url",
            url,
            "--user",
            "demo",
            "--password-env",
            "GH_PASSWORD",
            "--insecure",
            "--json",
            *args,
        ],
        environment={"GH_PASSWORD": secret},
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
        assert report["target"].split(":")[0] == target_ip


def tls_version_results(host: Any, ip: str, port: int) -> tuple[int, int]:
    """(exit code with TLS 1.1 offered, exit code with TLS 1.2) of openssl s_client in the host.

    SECLEVEL=0 lets this client offer TLS 1.1 at all, so a failure is the server's refusal.
    """
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
