"""Run the collection's plugins through real Ansible from a plain checkout.

Ansible finds collections only below ``ansible_collections/<namespace>/<name>``; a checkout is not
laid out that way, so a temporary tree with a symlink ``ansible_collections/gatehouse/access`` ->
repository root is created once per test process.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
_tree: Path | None = None


def collection_tree() -> Path:
    """Directory to put in ANSIBLE_COLLECTIONS_PATH (or sys.path) for ``gatehouse.access``."""
    global _tree
    if _tree is None:
        base = Path(tempfile.mkdtemp(prefix="gatehouse-collections-"))
        namespace = base / "ansible_collections" / "gatehouse"
        namespace.mkdir(parents=True)
        (namespace / "access").symlink_to(REPO_ROOT, target_is_directory=True)
        atexit.register(shutil.rmtree, base, True)
        _tree = base
    return _tree


def ensure_importable() -> None:
    """Make ``ansible_collections.gatehouse.access`` importable in this interpreter (unit tests)."""
    try:
        import ansible_collections.gatehouse.access.plugins.module_utils  # noqa: F401
    except ImportError:
        # ansible_collections is a namespace package: its search path follows sys.path changes.
        sys.path.insert(0, str(collection_tree()))
        importlib.invalidate_caches()


def tool(name: str) -> str:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


def ansible_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_COLLECTIONS_PATH": str(collection_tree()),
            "ANSIBLE_STDOUT_CALLBACK": "json",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        }
    )
    env.update(extra or {})
    return env


@dataclass
class AnsibleRun:
    """Result of one task: the module result, plus the raw output to check for leaked secrets."""

    result: dict[str, Any]
    stdout: str
    stderr: str
    returncode: int
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))


def run_adhoc(
    module: str,
    args: dict[str, Any],
    *,
    check: bool = False,
    diff: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    prefix: Sequence[str] = (),
) -> AnsibleRun:
    """``ansible localhost -m <module> -a <json>`` with the json callback; returns the task result.

    ``prefix`` runs ansible through a wrapper command (e.g. ``unshare ...``)."""
    command = [*prefix, tool("ansible"), "localhost", "-m", module, "-a", json.dumps(args)]
    if check:
        command.append("--check")
    if diff:
        command.append("--diff")
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=ansible_env(env),
        timeout=timeout,
        cwd=str(collection_tree()),
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
        result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError) as exc:
        raise AssertionError(
            f"ansible output is not the json callback's report ({exc})\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        ) from None
    return AnsibleRun(result, proc.stdout, proc.stderr, proc.returncode, list(result.get("warnings", [])))


def no_secret(run: Any, secrets: Iterable[str], *, result_only: bool = False) -> Any:
    """Fail the test when one of ``secrets`` is in the output of ``run`` (an AnsibleRun, a PlaybookRun or a
    finished process: its stdout and stderr) or, with ``result_only``, in the module's result; ``run``."""
    for secret in secrets:
        if result_only:
            assert secret not in str(run.result), "a secret is in the module's result"
        else:
            assert secret not in run.stdout and secret not in run.stderr, "a secret is in ansible's output"
    return run


def ok(run: AnsibleRun, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The result of a task that must succeed, with none of ``secrets`` in its output."""
    assert not run.failed, run.result.get("msg", run.stdout[-3000:])
    no_secret(run, secrets)
    return run.result


def run_module(name: str, args: dict[str, Any], **kwargs: Any) -> AnsibleRun:
    """Run ``gatehouse.access.<name>`` on localhost."""
    return run_adhoc(f"gatehouse.access.{name}", args, **kwargs)


@dataclass
class PlaybookRun:
    """Result of one ansible-playbook run: the json callback's report and the raw process output."""

    report: dict[str, Any]
    stdout: str
    stderr: str
    returncode: int


def run_playbook(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> PlaybookRun:
    """``ansible-playbook <args>`` with the json callback, from the collection tree; ``env`` adds
    to the environment (e.g. a notification callback besides the json one)."""
    proc = subprocess.run(
        [tool("ansible-playbook"), *args],
        capture_output=True,
        text=True,
        env=ansible_env(env),
        cwd=str(collection_tree()),
        timeout=timeout,
        check=False,
    )
    # Interactive modules (pause) print a line before the callback's report.
    start = proc.stdout.find("{\n")
    try:
        report = json.loads(proc.stdout[max(start, 0) :])
    except ValueError:
        raise AssertionError(f"no json report\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}") from None
    return PlaybookRun(report, proc.stdout, proc.stderr, proc.returncode)


def cmsg_params(**overrides: Any) -> dict[str, Any]:
    """cmsg module parameters as AnsibleModule would give them: the spec defaults, the options a valid
    run needs, then ``overrides``."""
    ensure_importable()
    cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
    result = {name: spec.get("default") for name, spec in cmsg.ARGUMENT_SPEC.items()}
    result.update(
        accept_policies=True,
        broker_url="https://broker.example.test:8443",
        external_pcoip_ip=["203.0.113.10"],
        self_signed=True,
        agent_ca_cert="/opt/gatehouse/pki/ca.pem",
    )
    result.update(overrides)
    return result


def broker_spec_check(**options: Any) -> Any:
    """The broker module's argument spec validation (its ValidationResult) of a valid run's options
    (admin token, self-signed, domains CORP and LAB) updated with ``options``."""
    ensure_importable()
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    broker = importlib.import_module(
        "ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker"
    )
    given = {
        "admin_token": "a" * 24,
        "self_signed": True,
        "client_tls_verify": False,
        "domains": ["CORP", "LAB"],
    }
    given.update(options)
    return ArgumentSpecValidator(broker.ARGUMENT_SPEC, required_if=broker.REQUIRED_IF).validate(given)


def broker_params(**options: Any) -> dict[str, Any]:
    """Broker module parameters as AnsibleModule gives them (defaults of options and suboptions filled in)."""
    result = broker_spec_check(**options)
    assert not result.error_messages, result.error_messages
    return result.validated_parameters
