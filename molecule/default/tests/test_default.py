"""default: broker, one CM/SG (gateway), two desktops in a pool, one user."""

from __future__ import annotations

import tarfile
from typing import Any

import gatehouse_verify as gv
import pytest

SCENARIO = "default"
NETWORK = "gh-mol-default"
CM = gv.address(1, 21)
CM6 = gv.address6(1, 21)
HOSTS = ["gh-default-broker", "gh-default-cmsg1", "gh-default-desk1", "gh-default-desk2"]


def test_services_run_with_labels(host: Any, groups: list[str]) -> None:
    name = host.backend.get_hostname()
    found = gv.services(name)
    assert set(found) == gv.expected_roles(groups)
    for role, containers in found.items():
        for container in containers:
            assert container.status == "running", f"{container.name}: {container.status}"
            assert container.labels["gatehouse.host"] == name
            # Each service shares the host container's network namespace: one address per host.
            assert container.attrs["HostConfig"]["NetworkMode"].startswith("container:"), role


def test_service_containers_are_locked_down(host: Any) -> None:
    nofile = gv.engine_nofile()
    for containers in gv.services(host.backend.get_hostname()).values():
        for container in containers:
            gv.assert_locked_down(container, nofile)


def test_ports_listening(host: Any, groups: list[str]) -> None:
    expected = []
    if "brokers" in groups:
        expected += ["tcp://0.0.0.0:8443"]
    if "cmsg" in groups:
        expected += ["tcp://0.0.0.0:8443", "tcp://0.0.0.0:8080", "tcp://0.0.0.0:4172", "udp://0.0.0.0:4172"]
    if "desktops" in groups:
        expected += ["tcp://0.0.0.0:60443", "tcp://0.0.0.0:4172", "udp://0.0.0.0:4172"]
    for spec in expected:
        assert host.socket(spec).is_listening, spec


def test_secrets_are_private(host: Any, groups: list[str], hostvars: dict[str, Any]) -> None:
    name = host.backend.get_hostname()
    agents = [a["name"] for a in hostvars.get("agent_instances", [])] if "desktops" in groups else []
    files = gv.secret_files(str(gv.STATE_ROOT / SCENARIO / name), groups, agents)
    assert files
    for path in files:
        f = host.file(path)
        assert f.exists, path
        assert f.mode == 0o600, f"{path}: {oct(f.mode)}"


def test_tls_1_1_refused(host: Any, groups: list[str], hostvars: dict[str, Any]) -> None:
    ip = hostvars["gatehouse_address"]
    ports = {p for role in gv.expected_roles(groups) for p in gv.TLS_PORTS.get(role, [])}
    for port in sorted(ports):
        old, new = gv.tls_version_results(host, ip, port)
        assert new == 0, f"{ip}:{port} refused TLS 1.2"
        assert old != 0, f"{ip}:{port} accepted TLS 1.1"


@pytest.mark.parametrize("attempt", [1, 2])
def test_session_through_the_gateway(attempt: int) -> None:
    report = gv.run_client(NETWORK, f"https://{CM}:8443", gv.password(SCENARIO))
    # Gateway mode: the target is the SG on the CM/SG host, never a desktop.
    gv.assert_session(report, target_ip=CM)


def test_session_over_ipv6() -> None:
    """A client on IPv6 only: the CM over IPv6, the target is the SG's IPv6 address, TCP and UDP relayed."""
    report = gv.run_client(NETWORK, f"https://[{CM6}]:8443", gv.password(SCENARIO), "--ipv6")
    gv.assert_session(report, target_ip=CM6)


def test_wrong_password_is_refused() -> None:
    report = gv.run_client(NETWORK, f"https://{CM}:8443", "not-the-password")
    assert not report["ok"]
    steps = {s["name"]: s for s in report["steps"]}
    assert not steps["authenticate"]["ok"]


def test_diagnose_fetches_redacted_bundles(tmp_path) -> None:
    run = gv.run_playbook("diagnose.yml", "-e", f"gatehouse_bundle_dir={tmp_path}")
    assert run.returncode == 0, run.stdout[-3000:]
    bundles = sorted(p.name for p in tmp_path.glob("*.tar.gz"))
    assert bundles == sorted(f"{h}.tar.gz" for h in HOSTS)
    secrets_dir = gv.STATE_ROOT / SCENARIO / "secrets"
    secrets = [f.read_text(encoding="utf-8").strip().encode() for f in secrets_dir.iterdir() if f.is_file()]
    for bundle in tmp_path.glob("*.tar.gz"):
        with tarfile.open(bundle) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    data = tar.extractfile(member).read()
                    assert not any(s in data for s in secrets), f"{bundle.name}:{member.name} holds a secret"


def test_uninstall_removes_every_service() -> None:
    run = gv.run_playbook("uninstall.yml")
    assert run.returncode == 0, run.stdout[-3000:]
    for host in HOSTS:
        assert gv.services(host) == {}, host
