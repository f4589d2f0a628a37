"""lan: security gateway disabled; sessions go straight to the desktops."""

from __future__ import annotations

from typing import Any

import gatehouse_verify as gv

SCENARIO = "lan"
NETWORK = "gh-mol-lan"
CM = gv.address(3, 21)
DESKTOPS = {gv.address(3, 31), gv.address(3, 32)}
HOSTS = {"gh-lan-broker", "gh-lan-cmsg1", "gh-lan-desk1", "gh-lan-desk2"}


def test_services_run_without_gateway(host: Any, groups: list[str]) -> None:
    name = host.backend.get_hostname()
    found = gv.services(name)
    assert set(found) == gv.expected_roles(groups, gateway=False)
    for containers in found.values():
        assert all(c.status == "running" for c in containers)


def test_ports(host: Any, groups: list[str]) -> None:
    if "cmsg" in groups:
        assert host.socket("tcp://0.0.0.0:8443").is_listening
        # No gateway: nothing listens on the PCoIP port of the CM host.
        assert not host.socket("tcp://0.0.0.0:4172").is_listening
        assert not host.socket("udp://0.0.0.0:4172").is_listening
    if "desktops" in groups:
        assert host.socket("tcp://0.0.0.0:60443").is_listening
        assert host.socket("tcp://0.0.0.0:4172").is_listening


def test_secrets_are_private(host: Any, groups: list[str], hostvars: dict[str, Any]) -> None:
    name = host.backend.get_hostname()
    agents = [a["name"] for a in hostvars.get("agent_instances", [])] if "desktops" in groups else []
    for path in gv.secret_files(str(gv.STATE_ROOT / SCENARIO / name), groups, agents):
        assert host.file(path).mode == 0o600, path


def test_tls_1_1_refused(host: Any, groups: list[str], hostvars: dict[str, Any]) -> None:
    ports = {p for role in gv.expected_roles(groups, gateway=False) for p in gv.TLS_PORTS.get(role, [])}
    for port in sorted(ports):
        old, new = gv.tls_version_results(host, hostvars["gatehouse_address"], port)
        assert new == 0 and old != 0, port


def test_direct_sessions_reach_the_desktops() -> None:
    targets = set()
    for attempt in range(4):
        report = gv.run_client(NETWORK, f"https://{CM}:8443", gv.password(SCENARIO))
        assert report["ok"], f"session {attempt + 1}: {gv.client_failure(report)}"
        gv.assert_session(report)
        targets.add(report["target"].split(":")[0])
    assert targets <= DESKTOPS, targets


def test_check_mode_after_converge_predicts_no_change() -> None:
    """site.yml --check --diff on the converged scenario: every host would change nothing, and no
    task fails (check mode must not trip over values that only a real run produces)."""
    run = gv.run_playbook("site.yml", "--check", "--diff")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    recap = gv.play_recap(run.stdout)
    assert set(recap) == HOSTS, recap
    for name, counts in recap.items():
        assert counts["failed"] == 0 and counts["unreachable"] == 0, (name, counts)
        assert counts["changed"] == 0, (name, counts, changed_tasks(run.stdout))


def changed_tasks(stdout: str) -> list[str]:
    """The "changed: [host]" lines of a run with the task each belongs to, to say what would change."""
    found, task = [], ""
    for line in stdout.splitlines():
        if line.startswith("TASK ["):
            task = line
        elif line.startswith("changed: "):
            found.append(f"{task} {line}")
    return found
