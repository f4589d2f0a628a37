"""The alert rules of the monitoring role, checked and unit-tested by promtool in gatehouse/prometheus.

``promtool check rules`` parses roles/monitoring/files/gatehouse-alerts.yml; ``promtool test rules``
runs monitoring/gatehouse-alerts.test.yml against it, in which every alert fires on a recorded
series and a series of the same metric that must not fire sits beside it (its expected alerts are
the complete list). The test also proves the test file covers every alert of the rules file, and
that promtool fails on a rule that does not fire as the test expects (so a pass means something).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT
from deploy_helpers import IMAGE_TAG, docker_client

pytestmark = [pytest.mark.docker, pytest.mark.images]

IMAGE = f"gatehouse/prometheus:{IMAGE_TAG}"
RULES = REPO_ROOT / "roles" / "monitoring" / "files" / "gatehouse-alerts.yml"
TESTS = Path(__file__).resolve().parent / "monitoring" / "gatehouse-alerts.test.yml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cli = docker_client()
    try:
        cli.images.get(IMAGE)
    except Exception:
        pytest.skip(f"image {IMAGE} is not built yet (make images)")
    path = tmp_path_factory.mktemp("rules")
    path.chmod(0o755)
    return path


def promtool(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """promtool ``args`` in a throwaway gatehouse/prometheus container with ``workdir`` at /rules
    (its unit tests keep their series in a database under /tmp)."""
    return subprocess.run(
        [
            "docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
            "--volume", f"{workdir}:/rules:ro", "--workdir", "/rules",
            "--entrypoint", "/usr/bin/promtool", IMAGE, *args,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def alerts_of(rules: dict) -> set[str]:
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}


def test_rules_are_valid(workdir: Path) -> None:
    shutil.copy(RULES, workdir / RULES.name)
    result = promtool(workdir, "check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts_of(yaml.safe_load(RULES.read_text())))} rules found" in result.stdout


def test_every_alert_fires_on_a_recorded_series(workdir: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    tests = yaml.safe_load(TESTS.read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts_of(rules) == fired, "each alert needs a test case in which it fires"
    shutil.copy(RULES, workdir / RULES.name)
    shutil.copy(TESTS, workdir / TESTS.name)
    result = promtool(workdir, "test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_fails_when_a_rule_does_not_fire(workdir: Path) -> None:
    # The same tests against rules whose SG alert needs the gateway down for an hour: its case fails.
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "GatehouseSecurityGatewayDown":
                rule["for"] = "1h"
    broken = workdir / "broken"
    broken.mkdir(mode=0o755)
    (broken / RULES.name).write_text(yaml.safe_dump(rules))
    shutil.copy(TESTS, broken / TESTS.name)
    result = promtool(workdir, "test", "rules", f"broken/{TESTS.name}")
    assert result.returncode != 0
    assert "GatehouseSecurityGatewayDown" in result.stdout + result.stderr
