"""gatehouse.access.docker through playbooks/site.yml against a real Debian host without Docker.

The host is a container of gatehouse/base (Debian, python3, apt; no Docker) on a network of the
test's own, managed over ``community.docker.docker``, as a Debian host is after installation:
the test gives it package lists and python3-apt first (the apt module's check mode predicts with
them). Packages come from the Debian archive. site.yml (tags docker, ``gatehouse_manage_docker``)
then runs three times:

1. ``--check --diff``: the engine and the SDK would be installed; nothing is (dpkg knows neither).
2. for real, with the defaults: docker.io and python3-docker are installed and the service is
   started, but dockerd cannot run in an unprivileged container, so the role must fail, bounded by
   ``docker_engine_wait``, saying that the engine does not answer and what to do, instead of
   leaving a dead engine to a later play.
3. for real with ``docker_manage_service=false``, as the message advises: ``changed=0``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, PlaybookRun, run_playbook
from deploy_helpers import unique_prefix

# Package downloads from the Debian archive (the engine is about 100 MB).
pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(1500)]

VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
IMAGE = f"gatehouse/base:{VERSION}"
INSTALL = "Install the Docker engine from the distribution"
SDK = "Install the Docker SDK for Python"


def _docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _exec(container: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _docker("exec", container, *command, timeout=timeout)


def installed(container: str, package: str) -> bool:
    proc = _exec(container, "dpkg-query", "--show", "--showformat=${db:Status-Status}", package)
    return proc.returncode == 0 and proc.stdout == "installed"


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    if _docker("image", "inspect", IMAGE).returncode != 0:
        pytest.skip(f"image {IMAGE} is missing: make images")
    prefix = unique_prefix("dockerrole")
    created = _docker("network", "create", "--label", "gatehouse.test=docker-role", prefix)
    assert created.returncode == 0, created.stderr
    try:
        run = _docker(
            "run", "--detach", f"--name={prefix}-host", "--hostname=node1", f"--network={prefix}",
            "--label=gatehouse.test=docker-role", "--entrypoint=/usr/bin/tini", IMAGE, "--", "sleep", "infinity",
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        container = f"{prefix}-host"
        assert _exec(container, "dockerd", "--version").returncode != 0, "the host must start without Docker"
        prepared = _exec(
            container, "sh", "-c",
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends python3-apt",
        )  # fmt: skip
        assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
        yield container
    finally:
        _docker("rm", "--force", f"{prefix}-host")
        _docker("network", "rm", prefix)


def site(host: str, tmp: Path, *extra: str, **role_vars: Any) -> PlaybookRun:
    inventory = {
        "all": {
            "vars": {
                "gatehouse_manage_docker": True,
                "gatehouse_secrets_dir": str(tmp / "secrets"),
                **role_vars,
            },
            "children": {
                "cmsg": {
                    "hosts": {
                        "node1": {
                            "ansible_connection": "community.docker.docker",
                            "ansible_host": host,
                            "ansible_python_interpreter": "/usr/bin/python3",
                            "ansible_pipelining": True,
                        }
                    }
                }
            },
        }
    }
    path = tmp / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return run_playbook(
        "-i", str(path), str(REPO_ROOT / "playbooks" / "site.yml"), "--tags", "docker", *extra, timeout=1200
    )


def task_results(run: PlaybookRun) -> dict[str, dict[str, Any]]:
    """The result of each task of the docker role on node1, by task name (unique in the role)."""
    role = "gatehouse.access.docker : "
    return {
        task["task"]["name"][len(role) :]: task["hosts"]["node1"]
        for play in run.report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].startswith(role) and "node1" in task["hosts"]
    }


def changed_tasks(run: PlaybookRun) -> set[str]:
    return {name for name, result in task_results(run).items() if result.get("changed")}


@pytest.fixture(scope="module")
def runs(host: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PlaybookRun]:
    tmp = tmp_path_factory.mktemp("docker-role")
    result = {"check": site(host, tmp, "--check", "--diff")}
    result["check_installed"] = installed(host, "docker.io")  # type: ignore[assignment]
    result["first"] = site(host, tmp, docker_engine_wait=6)
    result["second"] = site(host, tmp, docker_manage_service=False)
    return result


def test_check_mode_plans_the_engine_and_the_sdk_and_installs_nothing(runs: dict, host: str) -> None:
    check = runs["check"]
    assert check.returncode == 0, check.stdout[-6000:]
    assert changed_tasks(check) == {INSTALL, SDK}
    results = task_results(check)
    # The apt module's prediction (apt-get --simulate) names the packages it would unpack.
    assert "docker.io" in str(results[INSTALL].get("diff", results[INSTALL].get("stdout", "")))
    assert results["Start and enable the Docker engine"].get("skipped")
    assert runs["check_installed"] is False


def test_a_real_run_installs_and_an_engine_that_cannot_start_is_a_clear_error(runs: dict, host: str) -> None:
    first = runs["first"]
    assert first.returncode != 0
    assert changed_tasks(first) >= {INSTALL, SDK}
    assert installed(host, "docker.io") and installed(host, "python3-docker")
    assert _exec(host, "dockerd", "--version").returncode == 0
    assert _exec(host, "python3", "-c", "import docker").returncode == 0
    failed = {name: result for name, result in task_results(first).items() if result.get("failed")}
    assert list(failed) == ["Fail when the Docker engine does not answer"], failed
    message = failed["Fail when the Docker engine does not answer"]["msg"]
    assert "does not answer after 6 s" in message
    assert "docker_manage_service=false" in message


def test_a_second_run_changes_nothing(runs: dict) -> None:
    second = runs["second"]
    assert second.returncode == 0, second.stdout[-6000:]
    assert changed_tasks(second) == set()
    assert second.report["stats"]["node1"]["changed"] == 0
    assert task_results(second)["Report the Docker engine that is already there"]["msg"].startswith(
        "Docker is present"
    )
