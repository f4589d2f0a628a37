"""The broker object modules (broker_user/group/desktop/pool/entitlement) through ansible against a real broker.

One broker process with real TLS on loopback. Every module goes check -> real -> idempotent check ->
idempotent real, and the stored state is read back through the admin API (not taken from the module's
report). The admin token and the passwords must never show in ansible's output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_helpers import ADMIN_TOKEN, OTHER_TOKEN, Broker, module_connection, running_broker
from collection_helpers import AnsibleRun, ansible_env, collection_tree, no_secret, ok, run_module, tool
from pki import TestPKI as CertAuthority
from services import free_port

from gatehouse import protocol as p

ALICE_PW = "alice-" + uuid.uuid4().hex
ALICE_PW2 = "alice2-" + uuid.uuid4().hex
BOB_PW = "bob-" + uuid.uuid4().hex
SECRETS = (ADMIN_TOKEN, OTHER_TOKEN, ALICE_PW, ALICE_PW2, BOB_PW)


@pytest.fixture(scope="module")
def broker(pki: CertAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_broker(pki, tmp_path_factory.mktemp("broker-objects"), SECRETS) as b:
        yield b


def run(module: str, args: dict[str, Any], **kwargs: Any) -> AnsibleRun:
    return no_secret(run_module(module, args, diff=True, **kwargs), SECRETS)


def run_tasks(module: str, args: dict[str, Any], check_modes: list[bool]) -> list[dict[str, Any]]:
    """One ansible-playbook run of the same task with per-task check_mode (cheaper than one run each)."""
    tasks = [
        {"name": f"step {i}", f"gatehouse.access.{module}": args, "check_mode": check, "diff": True}
        for i, check in enumerate(check_modes)
    ]
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as handle:
        json.dump(play, handle)  # JSON is YAML
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
    no_secret(proc, SECRETS)
    try:
        report = json.loads(proc.stdout)
        results = [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]]
    except (ValueError, KeyError, IndexError) as exc:
        raise AssertionError(f"no json report ({exc}):\n{proc.stdout}\n{proc.stderr}") from None
    for result in results:
        assert not result.get("failed"), result.get("msg", result)
    assert len(results) == len(check_modes), proc.stdout[-3000:]
    return results


def cycle(module: str, args: dict[str, Any], expect_change: bool = True) -> dict[str, Any]:
    """check -> real -> check -> real; the check run reports exactly what the real run then does."""
    check, real, again_check, again = run_tasks(module, args, [True, False, True, False])
    assert check["changed"] is expect_change
    assert real["changed"] is expect_change
    assert check["diff"] == real["diff"]
    assert again_check["changed"] is False, again_check["diff"]
    assert again["changed"] is False, again["diff"]
    assert again["diff"]["before"] == again["diff"]["after"]
    return real


def get(broker: Broker, path: str) -> Any:
    status, body = broker.admin.call("GET", path)
    return body if status == 200 else None


def login(broker: Broker, user: str, password: str, domain: str = "CORP") -> str:
    return broker.client().login(user, password, domain)


# ---------------------------------------------------------------- groups


def test_group_present_and_absent(broker: Broker) -> None:
    args = module_connection(broker, name="staff-g", domain="CORP", description="all staff")
    real = cycle("broker_group", args)
    assert real["diff"]["before"] == {}
    assert get(broker, "/groups/CORP/staff-g") == {
        "domain": "CORP",
        "name": "staff-g",
        "description": "all staff",
        "members": [],
    }
    # A changed description is an update with before/after.
    real = cycle("broker_group", {**args, "description": "everyone"})
    assert real["diff"]["before"]["description"] == "all staff"
    assert get(broker, "/groups/CORP/staff-g")["description"] == "everyone"
    # Without domain the broker's default domain (the first configured one) is used.
    assert (
        ok(run("broker_group", module_connection(broker, name="staff-g", description="everyone")))["changed"]
        is False
    )

    real = cycle("broker_group", {**args, "state": "absent"})
    assert real["group"] is None and real["diff"]["after"] == {}
    assert get(broker, "/groups/CORP/staff-g") is None


# ---------------------------------------------------------------- users


def test_user_lifecycle_and_passwords(broker: Broker) -> None:
    broker.admin.put("/groups/CORP/u-staff")
    broker.admin.put("/groups/CORP/u-eng")
    args = module_connection(
        broker,
        name="alice-u",
        domain="CORP",
        display_name="Alice",
        password=ALICE_PW,
        groups=["u-staff", "u-eng"],
    )
    real = cycle("broker_user", args)
    assert real["password_changed"] is True
    assert real["diff"]["after"]["password"] == "(changed)"
    stored = get(broker, "/users/CORP/alice-u")
    assert stored == {
        "domain": "CORP",
        "name": "alice-u",
        "display_name": "Alice",
        "enabled": True,
        "groups": ["u-eng", "u-staff"],
        "password_set": True,
        "source": "local",
        "totp_enrolled": False,
    }
    assert login(broker, "alice-u", ALICE_PW) == p.AUTH_OK

    # A new password is detected (check mode changes nothing), set, and works; the old one stops working.
    changed = {**args, "password": ALICE_PW2}
    check = ok(run("broker_user", changed, check=True))
    assert check["changed"] is True and check["password_changed"] is True
    assert check["diff"]["after"]["password"] == "(changed)"
    assert "password" not in check["diff"]["before"]
    assert login(broker, "alice-u", ALICE_PW) == p.AUTH_OK
    real = ok(run("broker_user", changed))
    assert real["changed"] is True and real["password_changed"] is True
    assert login(broker, "alice-u", ALICE_PW2) == p.AUTH_OK
    assert login(broker, "alice-u", ALICE_PW) != p.AUTH_OK
    status, answer = broker.admin.call("POST", "/users/CORP/alice-u/check-password", {"password": ALICE_PW2})
    assert status == 200 and answer["match"] is True
    again = ok(run("broker_user", changed))
    assert again["changed"] is False and again["password_changed"] is False
    assert "password" not in again["diff"]["after"]

    # on_create: an existing user keeps the password it has.
    on_create = {**args, "password": ALICE_PW, "update_password": "on_create"}
    assert ok(run("broker_user", on_create, check=True))["changed"] is False
    assert ok(run("broker_user", on_create))["changed"] is False
    assert login(broker, "alice-u", ALICE_PW2) == p.AUTH_OK

    # Disable: the account can no longer log in; omitted options keep their values.
    real = cycle("broker_user", module_connection(broker, name="alice-u", domain="corp", enabled=False))
    assert real["diff"]["before"]["enabled"] is True and real["diff"]["after"]["enabled"] is False
    stored = get(broker, "/users/CORP/alice-u")
    assert stored["enabled"] is False and stored["groups"] == ["u-eng", "u-staff"]
    assert stored["display_name"] == "Alice"
    assert login(broker, "alice-u", ALICE_PW2) != p.AUTH_OK

    # groups is the exact list; append adds.
    cycle("broker_user", module_connection(broker, name="alice-u", groups=["u-staff"]))
    assert get(broker, "/users/CORP/alice-u")["groups"] == ["u-staff"]
    cycle("broker_user", module_connection(broker, name="alice-u", groups=["u-eng"], append=True))
    assert get(broker, "/users/CORP/alice-u")["groups"] == ["u-eng", "u-staff"]
    cycle("broker_user", module_connection(broker, name="alice-u", groups=[]))
    assert get(broker, "/users/CORP/alice-u")["groups"] == []

    real = cycle("broker_user", module_connection(broker, name="alice-u", domain="CORP", state="absent"))
    assert real["user"] is None and real["password_changed"] is False
    assert get(broker, "/users/CORP/alice-u") is None


def test_user_on_create_sets_the_first_password(broker: Broker) -> None:
    args = module_connection(broker, name="bob-u", domain="LAB", password=BOB_PW, update_password="on_create")
    real = cycle("broker_user", args)
    assert real["user"]["domain"] == "LAB" and real["password_changed"] is True
    assert login(broker, "bob-u", BOB_PW, "LAB") == p.AUTH_OK
    run("broker_user", {**args, "state": "absent"})


def test_user_errors_are_clear_and_change_nothing(broker: Broker) -> None:
    result = run("broker_user", module_connection(broker, name="carol-u", groups=["no-such-group"]))
    assert result.failed
    assert "no such group" in result.result["msg"] and "no-such-group" in result.result["msg"]
    assert get(broker, "/users/CORP/carol-u") is None

    result = run("broker_user", module_connection(broker, name="carol-u", domain="NOPE", password=BOB_PW))
    assert result.failed and "NOPE" in result.result["msg"] and "Domains" in result.result["msg"]

    result = run("broker_user", module_connection(broker, name="carol-u", display_name="x" * 300))
    assert result.failed and result.result["msg"].startswith("the broker rejected the request: display_name")
    assert get(broker, "/users/CORP/carol-u") is None


# ---------------------------------------------------------------- desktops and pools


def test_desktop_agent_verification_and_logon(broker: Broker) -> None:
    """logon, a pinned agent certificate and a desktop's own CA: stored normalised, idempotent."""
    pin = ":".join(["AB"] * 32)  # as openssl prints it
    cycle(
        "broker_desktop",
        module_connection(broker, name="dv-desk", address="127.0.0.41", agent_cert_sha256=pin),
    )
    stored = get(broker, "/desktops/dv-desk")
    assert (stored["agent_cert_sha256"], stored["logon"]) == ("ab" * 32, "windows-password")
    # The same pin without colons is the same pin: no change.
    assert not run(
        "broker_desktop", module_connection(broker, name="dv-desk", agent_cert_sha256="AB" * 32)
    ).changed

    ca_pem = broker.pki.ca.read_text()
    # A CA in place of the pin (the pin cleared in the same task), and a kiosk logon.
    real = cycle(
        "broker_desktop",
        module_connection(
            broker, name="dv-desk", agent_ca_pem="\n" + ca_pem + "\n", agent_cert_sha256="", logon="none"
        ),
    )
    stored = get(broker, "/desktops/dv-desk")
    assert stored["agent_ca_pem"].strip() == ca_pem.strip() and stored["agent_cert_sha256"] == ""
    assert stored["logon"] == "none" and real["diff"]["before"]["logon"] == "windows-password"

    # Bad values fail before anything changes.
    for bad, words in (
        ({"agent_cert_sha256": "abc"}, "64 hexadecimal digits"),
        ({"agent_ca_pem": "not a certificate"}, "not PEM certificates"),
        ({"agent_ca_pem": ca_pem, "agent_cert_sha256": "ab" * 32}, "mutually exclusive"),
        ({"agent_cert_sha256": "ab" * 32}, "mutually exclusive"),  # the stored CA stays
        ({"logon": "smartcard"}, "logon"),
    ):
        result = run("broker_desktop", module_connection(broker, name="dv-desk", **bad))
        assert result.failed and words in result.result["msg"], (bad, result.result.get("msg"))
    assert get(broker, "/desktops/dv-desk") == stored


def test_desktop_and_pool(broker: Broker) -> None:
    d1 = module_connection(broker, name="dp-desk1", address="127.0.0.31", hostname="desk1.example")
    real = cycle("broker_desktop", d1)
    assert get(broker, "/desktops/dp-desk1") == {
        "name": "dp-desk1",
        "address": "127.0.0.31",
        "hostname": "desk1.example",
        "agent_port": 60443,
        "session_port": 4172,
        "enabled": True,
        "pool": None,
        "logon": "windows-password",
        "agent_ca_pem": "",
        "agent_cert_sha256": "",
        "site": "",
    }
    assert real["desktop"] == get(broker, "/desktops/dp-desk1")
    cycle(
        "broker_desktop",
        module_connection(broker, name="dp-desk2", address="DESK2.Example", agent_port=60444),
    )
    assert get(broker, "/desktops/dp-desk2")["address"] == "desk2.example"

    # A new desktop needs an address: clear failure, nothing stored.
    result = run("broker_desktop", module_connection(broker, name="dp-desk3"))
    assert result.failed and "address is required" in result.result["msg"]
    assert get(broker, "/desktops/dp-desk3") is None
    result = run(
        "broker_desktop", module_connection(broker, name="dp-desk3", address="127.0.0.33", session_port=70000)
    )
    assert result.failed and "session_port" in result.result["msg"]
    assert get(broker, "/desktops/dp-desk3") is None

    pool = module_connection(broker, name="dp-pool", persistent=True, members=["dp-desk1"])
    real = cycle("broker_pool", pool)
    assert get(broker, "/pools/dp-pool") == {
        "name": "dp-pool",
        "persistent": True,
        "description": "",
        "members": ["dp-desk1"],
    }
    assert get(broker, "/desktops/dp-desk1")["pool"] == "dp-pool"
    # append keeps dp-desk1; the exact list then drops it again.
    cycle("broker_pool", module_connection(broker, name="dp-pool", members=["dp-desk2"], append=True))
    assert get(broker, "/pools/dp-pool")["members"] == ["dp-desk1", "dp-desk2"]
    cycle("broker_pool", module_connection(broker, name="dp-pool", members=["dp-desk2"]))
    assert get(broker, "/pools/dp-pool")["members"] == ["dp-desk2"]
    assert get(broker, "/desktops/dp-desk1")["pool"] is None

    # The desktop side of the membership, and pool "" to leave it.
    cycle("broker_desktop", module_connection(broker, name="dp-desk1", pool="dp-pool", enabled=False))
    stored = get(broker, "/desktops/dp-desk1")
    assert stored["pool"] == "dp-pool" and stored["enabled"] is False and stored["address"] == "127.0.0.31"
    real = cycle("broker_desktop", module_connection(broker, name="dp-desk1", pool=""))
    assert real["diff"]["after"]["pool"] is None
    assert get(broker, "/desktops/dp-desk1")["pool"] is None

    result = run("broker_pool", module_connection(broker, name="dp-pool", members=["dp-missing"]))
    assert result.failed and "no such desktop" in result.result["msg"]
    assert get(broker, "/pools/dp-pool")["members"] == ["dp-desk2"]

    cycle("broker_pool", module_connection(broker, name="dp-pool", state="absent"))
    assert get(broker, "/pools/dp-pool") is None
    assert get(broker, "/desktops/dp-desk2")["pool"] is None
    for name in ("dp-desk1", "dp-desk2"):
        cycle("broker_desktop", module_connection(broker, name=name, state="absent"))
        assert get(broker, f"/desktops/{name}") is None


# ---------------------------------------------------------------- entitlements


def test_entitlement_grants_access(broker: Broker) -> None:
    broker.admin.put("/groups/CORP/e-staff")
    broker.admin.put("/users/CORP/e-user", {"password": BOB_PW, "groups": ["e-staff"]})
    broker.admin.put("/desktops/e-desk", {"address": "127.0.0.41"})
    broker.admin.put("/pools/e-pool", {"members": ["e-desk"]})
    args = module_connection(
        broker,
        principal_type="group",
        domain="CORP",
        principal="e-staff",
        resource_type="pool",
        resource="e-pool",
    )
    real = cycle("broker_entitlement", args)
    expected = {
        "principal_type": "group",
        "domain": "CORP",
        "principal": "e-staff",
        "resource_type": "pool",
        "resource": "e-pool",
    }
    assert real["entitlement"] == expected
    assert get(broker, "/entitlements/group/CORP/e-staff/pool/e-pool") == expected
    client = broker.client()
    assert client.login("e-user", BOB_PW) == p.AUTH_OK
    assert "e-pool" in client.resources()

    cycle("broker_entitlement", {**args, "state": "absent"})
    assert get(broker, "/entitlements/group/CORP/e-staff/pool/e-pool") is None
    client = broker.client()
    assert client.login("e-user", BOB_PW) == p.AUTH_OK
    assert "e-pool" not in client.resources()

    # A principal that does not exist: a real run fails clearly; absent is no change.
    missing = {**args, "principal_type": "user", "principal": "e-nobody"}
    result = run("broker_entitlement", missing)
    assert result.failed and "e-nobody" in result.result["msg"] and "does not exist" in result.result["msg"]
    assert ok(run("broker_entitlement", {**missing, "state": "absent"}))["changed"] is False


def test_check_mode_with_objects_an_earlier_task_would_create(broker: Broker) -> None:
    """A whole access-as-code run in check mode: later objects refer to ones not created yet."""
    user = module_connection(broker, name="cm-user", password=BOB_PW, groups=["cm-group"])
    result = ok(run("broker_user", user, check=True))
    assert result["changed"] is True and result["user"]["groups"] == ["cm-group"]
    assert any("does not exist yet" in w for w in result.get("warnings", []))
    ent = module_connection(
        broker, principal_type="user", principal="cm-user", resource_type="desktop", resource="cm-desk"
    )
    result = ok(run("broker_entitlement", ent, check=True))
    assert result["changed"] is True and result["entitlement"]["principal"] == "cm-user"
    result = ok(
        run("broker_pool", module_connection(broker, name="cm-pool", members=["cm-desk"]), check=True)
    )
    assert result["changed"] is True and result["pool"]["members"] == ["cm-desk"]
    # Nothing was stored.
    assert get(broker, "/users/CORP/cm-user") is None
    assert get(broker, "/pools/cm-pool") is None


# ---------------------------------------------------------------- connection and token errors


def test_connection_errors_are_clear(broker: Broker) -> None:
    result = run("broker_group", module_connection(broker, name="x-group", admin_token="wrong-" + "z" * 20))
    assert result.failed and "the broker refused the admin token" in result.result["msg"]
    assert get(broker, "/groups/CORP/x-group") is None

    result = run("broker_group", module_connection(broker, name="x-group", admin_token=OTHER_TOKEN))
    assert result.failed and "refused the admin token" in result.result["msg"]

    port = free_port()
    result = run(
        "broker_group",
        {**module_connection(broker, name="x-group"), "broker_url": f"https://127.0.0.1:{port}"},
    )
    assert result.failed and f"https://127.0.0.1:{port}" in result.result["msg"]
    assert "connection refused" in result.result["msg"]

    no_ca = module_connection(broker, name="x-group")
    del no_ca["ca_cert"]
    result = run("broker_group", no_ca)
    assert result.failed and "TLS verification" in result.result["msg"] and "ca_cert" in result.result["msg"]

    result = run(
        "broker_group",
        {**module_connection(broker, name="x-group"), "broker_url": f"http://localhost:{broker.port}"},
    )
    assert result.failed and "https://" in result.result["msg"]
    assert get(broker, "/groups/CORP/x-group") is None


def test_admin_token_from_the_environment(broker: Broker) -> None:
    args = module_connection(broker, name="env-group")
    del args["admin_token"]
    result = ok(run("broker_group", args, env={"GATEHOUSE_ADMIN_TOKEN": ADMIN_TOKEN}))
    assert result["changed"] is True
    assert get(broker, "/groups/CORP/env-group") is not None
    result = run("broker_group", args, env={"GATEHOUSE_ADMIN_TOKEN": ""})
    assert result.failed and "admin_token" in result.result["msg"]
    ok(run("broker_group", {**args, "state": "absent"}, env={"GATEHOUSE_ADMIN_TOKEN": ADMIN_TOKEN}))
    assert get(broker, "/groups/CORP/env-group") is None


# ---------------------------------------------------------------- the documented access-as-code example


def doc_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[3] / "docs" / "access-as-code.md").read_text(encoding="utf-8")
    return re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)


def run_playbook(playbook: Path, extra_vars: Path, *flags: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            tool("ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"@{extra_vars}",
            *flags,
            str(playbook),
        ],
        capture_output=True,
        text=True,
        env=ansible_env(),
        timeout=600,
        cwd=str(collection_tree()),
        check=False,
    )
    for secret in SECRETS:
        assert secret not in proc.stdout and secret not in proc.stderr, "a secret leaked from the playbook"
    report = json.loads(proc.stdout)
    stats = report["stats"]["localhost"]
    assert stats["failures"] == 0 and stats["unreachable"] == 0, proc.stdout[-4000:]
    return stats


def test_documented_access_as_code_example(broker: Broker, tmp_path: Path) -> None:
    access_vars, playbook = doc_blocks()
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(access_vars, encoding="utf-8")
    book = tmp_path / "access.yml"
    book.write_text(playbook, encoding="utf-8")
    secrets = tmp_path / "secrets.json"
    secrets.write_text(
        json.dumps(
            {
                "broker_url": f"https://localhost:{broker.port}",
                "broker_ca_cert": str(broker.pki.ca),
                "vault_broker_admin_token": ADMIN_TOKEN,
                "vault_access_passwords": {"alice": ALICE_PW, "bob": BOB_PW},
            }
        ),
        encoding="utf-8",
    )
    # Objects the file marks absent exist before the run.
    broker.admin.put("/users/CORP/mallory", {"password": ALICE_PW2})
    broker.admin.put("/groups/CORP/contractors")
    broker.admin.put("/desktops/old-desk", {"address": "127.0.0.99"})

    stats = run_playbook(book, secrets, "--check", "--diff")
    assert stats["changed"] > 0
    assert get(broker, "/users/CORP/alice") is None and get(broker, "/users/CORP/mallory") is not None

    assert run_playbook(book, secrets, "--diff")["changed"] > 0
    assert get(broker, "/users/CORP/alice")["groups"] == ["engineering", "staff"]
    assert get(broker, "/users/CORP/bob")["password_set"] is True
    assert get(broker, "/users/CORP/mallory") is None
    assert get(broker, "/groups/CORP/contractors") is None
    assert get(broker, "/desktops/old-desk") is None
    assert get(broker, "/desktops/lab-desk")["enabled"] is False
    assert get(broker, "/pools/engineering-pool")["members"] == ["desk1", "desk2"]
    assert get(broker, "/entitlements/group/CORP/engineering/pool/engineering-pool") is not None
    client = broker.client()
    assert client.login("alice", ALICE_PW) == p.AUTH_OK
    assert set(client.resources()) == {"desk1", "lab-desk", "engineering-pool"}

    # The same file again: no change, in check mode and for real.
    assert run_playbook(book, secrets, "--check", "--diff")["changed"] == 0
    assert run_playbook(book, secrets)["changed"] == 0
