"""broker_user's TOTP enrollment and broker_entitlement's directory-group through ansible against a real broker.

One broker process (the services from this checkout) with SecondFactor = totp and a domain LAB
whose source is ldap (its directory is never contacted: the admin API does not need it). The
otpauth URI is returned once, only to a task with no_log, and is never in ansible's output; the
stored state is read back through the admin API.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_helpers import Broker, module_connection, running_broker
from collection_helpers import ansible_env, collection_tree, run_module, tool
from pki import TestPKI as CertAuthority

BIND_PW = "bind-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def broker(pki: CertAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("broker-identity-objects")
    key_file = workdir / "totp.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    password_file = workdir / "ldap-LAB.password"
    password_file.write_text(BIND_PW + "\n")
    config = {
        "SecondFactor": "totp",
        "TotpKeyFile": key_file,
        "TotpIssuer": "Gatehouse Test",
        "Domain.LAB.Source": "ldap",
        "Domain.LAB.LdapServers": "ldaps://127.0.0.1:9",
        "Domain.LAB.LdapBindDn": "cn=gatehouse-svc,ou=services,dc=lab,dc=example",
        "Domain.LAB.LdapBindPasswordFile": password_file,
        "Domain.LAB.LdapBaseDn": "ou=people,dc=lab,dc=example",
    }
    with running_broker(pki, workdir, (BIND_PW,), **config) as b:
        yield b


def play(tasks: list[dict[str, Any]], outdir: Path) -> tuple[list[dict[str, Any]], str]:
    """Run the tasks in one playbook; returns the task results of the report and the raw output."""
    document = [
        {"hosts": "localhost", "gather_facts": False, "vars": {"outdir": str(outdir)}, "tasks": tasks}
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        json.dump(document, handle)
    try:
        proc = subprocess.run(
            [tool("ansible-playbook"), "-i", "localhost,", "-c", "local", handle.name],
            capture_output=True,
            text=True,
            env=ansible_env(),
            timeout=300,
            cwd=str(collection_tree()),
            check=False,
        )
    finally:
        Path(handle.name).unlink()
    report = json.loads(proc.stdout[max(proc.stdout.find("{\n"), 0) :])
    results = [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]]
    return results, proc.stdout + proc.stderr


def enroll_tasks(args: dict[str, Any], check: bool = False) -> list[dict[str, Any]]:
    """The documented pattern: enroll with no_log, keep the URI in a file of mode 0600."""
    return [
        {
            "name": "enroll",
            "gatehouse.access.broker_user": args,
            "register": "enrolled",
            "no_log": True,
            "check_mode": check,
        },
        {
            "name": "keep the URI",
            "ansible.builtin.copy": {
                "content": "{{ enrolled.totp.otpauth_uri }}",
                "dest": "{{ outdir }}/uri",
                "mode": "0600",
            },
            "when": "enrolled.totp.otpauth_uri is defined",
            "no_log": True,
        },
        {
            "name": "what the task reported (without the URI)",
            "ansible.builtin.copy": {
                "content": "{{ enrolled | dict2items | rejectattr('key', 'eq', 'totp') | items2dict | to_json }}"
                "\n{{ (enrolled.totp | default({})) | dict2items | rejectattr('key', 'eq', 'otpauth_uri') "
                "| items2dict | to_json }}",
                "dest": "{{ outdir }}/result",
                "mode": "0600",
            },
        },
    ]


def read_result(outdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    first, second = (outdir / "result").read_text().splitlines()
    return json.loads(first), json.loads(second)


def user(broker: Broker, domain: str, name: str) -> dict[str, Any] | None:
    status, body = broker.admin.call("GET", f"/users/{domain}/{name}")
    return body if status == 200 else None


def test_totp_enrollment_is_returned_once_and_never_shown(broker: Broker, tmp_path: Path) -> None:
    args = module_connection(broker, domain="LAB", name="erin", display_name="Erin", totp="enrolled")

    # Check mode: the user would be created and enrolled; nothing is stored, no URI.
    results, output = play(enroll_tasks(args, check=True), tmp_path)
    result, totp = read_result(tmp_path)
    assert result["changed"] and totp == {"enrolled": True, "changed": True}
    assert not (tmp_path / "uri").exists() and user(broker, "LAB", "erin") is None

    results, output = play(enroll_tasks(args), tmp_path)
    result, totp = read_result(tmp_path)
    assert result["changed"] and totp == {"enrolled": True, "changed": True}
    uri = (tmp_path / "uri").read_text()
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    query = parse_qs(parts.query)
    assert query["issuer"] == ["Gatehouse Test"]
    secret = query["secret"][0]
    assert uri not in output and secret not in output
    assert results[0].get("censored"), "the enrolling task must be censored (no_log)"
    stored = user(broker, "LAB", "erin")
    assert stored["totp_enrolled"] is True and stored["password_set"] is False
    assert secret not in json.dumps(stored)

    # Enrolled already: no change, no new secret.
    (tmp_path / "uri").unlink()
    _results, output = play(enroll_tasks(args), tmp_path)
    result, totp = read_result(tmp_path)
    assert not result["changed"] and totp == {"enrolled": True, "changed": False}
    assert not (tmp_path / "uri").exists()

    # totp_reset: a new secret, again returned once.
    _results, output = play(enroll_tasks(dict(args, totp_reset=True)), tmp_path)
    result, totp = read_result(tmp_path)
    assert result["changed"] and totp["changed"]
    new_uri = (tmp_path / "uri").read_text()
    assert new_uri != uri and new_uri not in output

    # absent: removed, then no change.
    gone = run_module(
        "broker_user", module_connection(broker, domain="LAB", name="erin", totp="absent"), diff=True
    )
    assert gone.changed and gone.result["totp"] == {"enrolled": False, "changed": True}, gone.result
    assert gone.result["diff"]["after"]["totp_enrolled"] is False
    assert user(broker, "LAB", "erin")["totp_enrolled"] is False
    again = run_module("broker_user", module_connection(broker, domain="LAB", name="erin", totp="absent"))
    assert not again.changed and again.result["totp"] == {"enrolled": False, "changed": False}


def test_enrollment_needs_no_log(broker: Broker) -> None:
    run = run_module("broker_user", module_connection(broker, domain="LAB", name="frank", totp="enrolled"))
    assert run.failed and "set no_log: true on the task" in run.result["msg"], run.result
    assert user(broker, "LAB", "frank") is None
    run = run_module("broker_user", module_connection(broker, domain="LAB", name="frank", totp_reset=True))
    assert run.failed and "totp_reset is only used with totp=enrolled" in run.result["msg"]


def test_directory_group_entitlement(broker: Broker) -> None:
    assert not run_module(
        "broker_desktop", module_connection(broker, name="lab-desk", address="10.0.0.50")
    ).failed
    args = module_connection(
        broker,
        principal_type="directory-group",
        domain="LAB",
        principal="CN=VDI Users,OU=Groups,DC=lab,DC=example",
        resource_type="desktop",
        resource="lab-desk",
    )
    check = run_module("broker_entitlement", args, check=True, diff=True)
    assert check.changed and not check.failed, check.result
    real = run_module("broker_entitlement", args, diff=True)
    assert real.changed and real.result["entitlement"]["principal_type"] == "directory-group", real.result
    assert not run_module("broker_entitlement", args, check=True).changed
    assert not run_module("broker_entitlement", args).changed
    # Only in a domain whose source is ldap.
    local = run_module("broker_entitlement", dict(args, domain="CORP"))
    assert local.failed and "directory-group" in local.result["msg"], local.result
    gone = run_module("broker_entitlement", dict(args, state="absent"))
    assert gone.changed and not gone.failed, gone.result
