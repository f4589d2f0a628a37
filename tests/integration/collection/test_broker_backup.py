"""broker_backup and playbooks/restore.yml against brokers that the broker module deploys on the local Docker engine.

A broker is deployed and filled through the broker object modules (a user, a desktop, an
entitlement); it is backed up while a CM keeps logging in and the admin API keeps answering. A
fresh broker, deployed next to it, gets the backup through playbooks/restore.yml, and the
restored user then logs in there through the broker protocol (the CM's certificate) and sees the
restored desktop. A backup whose database does not match its checksum is refused and the broker
it was meant for keeps its database and keeps serving; retention keeps the newest N.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker_helpers import Admin, BrokerClient, Http
from collection_helpers import AnsibleRun, run_module, run_playbook
from deploy_helpers import cleanup, docker_client, require_service_images, unique_prefix
from pki import TestPKI as CertAuthority
from services import free_port

from gatehouse import protocol as p
from gatehouse.broker.db import SCHEMA_VERSION

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "adm-backup-" + uuid.uuid4().hex
ALICE_PW = "Alice-" + uuid.uuid4().hex
CAROL_PW = "Carol-" + uuid.uuid4().hex
REPO = Path(__file__).resolve().parents[3]


@dataclass
class Deployment:
    """One broker deployed by the broker module: container ``<prefix>-broker``, its port and data."""

    prefix: str
    data_dir: Path
    port: int
    cm: ssl.SSLContext
    ca: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "data" / "broker.db"

    def client(self) -> BrokerClient:
        return BrokerClient(Http(self.port, self.cm))

    def admin(self) -> Admin:
        return Admin(Http(self.port, ssl.create_default_context(cafile=str(self.ca))), ADMIN)

    def login(self, user: str, password: str) -> str:
        return self.client().login(user, password, "LAB")

    def connection(self, **extra: Any) -> dict[str, Any]:
        return {
            "broker_url": f"https://localhost:{self.port}",
            "admin_token": ADMIN,
            "ca_cert": str(self.ca),
            **extra,
        }


def ok(run: AnsibleRun) -> dict[str, Any]:
    assert not run.failed, run.result.get("msg", run.stdout[-3000:])
    for secret in (ADMIN, ALICE_PW, CAROL_PW):
        assert secret not in run.stdout and secret not in run.stderr
    return run.result


def deploy(pki: CertAuthority, tmp: Path, prefix: str) -> Deployment:
    certs = pki.issue(f"{prefix}-broker", ["localhost", "127.0.0.1"], role="broker")
    cm = pki.issue(f"{prefix}-cm", ["localhost"], role="cm")
    port = free_port()
    args = {
        "admin_token": ADMIN,
        "client_ca_cert": str(pki.ca),
        "domains": ["CORP", "LAB"],
        "ssl_cert": str(certs.cert),
        "ssl_key": str(certs.key),
        "data_dir": str(tmp / prefix),
        "name_prefix": prefix,
        "https_port": port,
    }
    ok(run_module("broker", args))
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(cm.cert), str(cm.key))
    deployed = Deployment(prefix, tmp / prefix, port, context, Path(pki.ca))
    deadline = time.monotonic() + 60
    while True:
        try:
            if deployed.admin().call("GET", "/domains")[0] == 200:
                return deployed
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the broker {prefix} does not answer"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def env(pki: CertAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path]]:
    cli = docker_client()
    require_service_images(cli, "broker")
    prefix = unique_prefix("backup")
    try:
        yield cli, prefix, tmp_path_factory.mktemp("backup")
    finally:
        cleanup(cli, prefix)


@pytest.fixture(scope="module")
def source(env, pki: CertAuthority) -> Deployment:
    """The broker that is backed up, with a user, a desktop and an entitlement made by the modules."""
    _cli, prefix, tmp = env
    broker = deploy(pki, tmp, f"{prefix}-a")
    ok(run_module("broker_user", broker.connection(name="alice", domain="LAB", password=ALICE_PW)))
    ok(run_module("broker_desktop", broker.connection(name="desk-1", address="192.0.2.41")))
    entitle = {"principal_type": "user", "principal": "alice", "domain": "LAB"}
    ok(
        run_module(
            "broker_entitlement", broker.connection(**entitle, resource_type="desktop", resource="desk-1")
        )
    )
    assert broker.login("alice", ALICE_PW) == p.AUTH_OK
    return broker


def take(broker: Deployment, backup_dir: Path, keep: int = 7, check: bool = False) -> dict[str, Any]:
    args = {"backup_dir": str(backup_dir), "keep": keep, "name_prefix": f"{broker.prefix}"}
    return ok(run_module("broker_backup", args, check=check, diff=True))


def files_of(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir()) if backup_dir.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_backup(env, source: Deployment) -> dict[str, Any]:
    """A backup taken while a CM logs in again and again and the admin API is read."""
    _cli, _prefix, tmp = env
    stop = threading.Event()
    outcomes: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                outcomes.append(source.login("alice", ALICE_PW))
                outcomes.append(f"admin-{source.admin().call('GET', '/users')[0]}")
            except OSError as exc:  # a refused or dropped connection is a failed session
                outcomes.append(f"error: {exc}")

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)
        started = len(outcomes)
        result = take(source, tmp / "backups")
        during = len(outcomes) - started
    finally:
        stop.set()
        worker.join(30)
    assert during > 0, "no login ran while the backup was taken"
    assert set(outcomes) == {p.AUTH_OK, "admin-200"}, sorted(set(outcomes))
    return result


def test_backup_is_complete_verified_and_private(env, first_backup: dict[str, Any]) -> None:
    _cli, _prefix, tmp = env
    backup_dir = tmp / "backups"
    result = first_backup
    assert result["changed"] and result["backup"]["new"]
    db = Path(result["backup"]["path"])
    assert db.parent == backup_dir and files_of(backup_dir) == sorted(
        [db.name, db.stem + ".json", db.name + ".sha256"]
    )
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    for name in files_of(backup_dir):
        assert stat.S_IMODE((backup_dir / name).stat().st_mode) == 0o600, name
    # The checksum file is in sha256sum's format.
    check = subprocess.run(
        ["sha256sum", "-c", db.name + ".sha256"], cwd=backup_dir, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    metadata = json.loads((backup_dir / (db.stem + ".json")).read_text())
    assert metadata["engine"] == "sqlite" and metadata["format"] == 1
    assert metadata["sha256"] == sha256(db) == result["backup"]["sha256"]
    assert metadata["schema_version"] == SCHEMA_VERSION == result["backup"]["schema_version"]
    assert metadata["created"].endswith("Z") and metadata["collection_version"]
    # A database of its own, holding what the modules made.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert ("alice",) in conn.execute("SELECT name FROM users").fetchall()
    assert db.name in result["diff"]["after"] and db.name not in result["diff"]["before"]


def test_unchanged_database_writes_no_second_backup(
    env, source: Deployment, first_backup: dict[str, Any]
) -> None:
    _cli, _prefix, tmp = env
    backup_dir = tmp / "backups"
    # Whatever the broker wrote after the first snapshot is caught up by one more backup; then
    # nothing changes any more.
    take(source, backup_dir)
    before = files_of(backup_dir)
    again = take(source, backup_dir)
    assert not again["changed"] and not again["backup"]["new"], again
    assert again["backup"]["path"] == again["backups"][-1]
    assert files_of(backup_dir) == before
    assert take(source, backup_dir, check=True)["changed"] is False
    assert files_of(backup_dir) == before


def test_check_mode_predicts_a_backup_and_writes_nothing(env, source: Deployment, first_backup) -> None:
    _cli, _prefix, tmp = env
    backup_dir = tmp / "backups"
    ok(run_module("broker_user", source.connection(name="carol", domain="LAB", password=CAROL_PW)))
    before = files_of(backup_dir)
    leftovers = sorted(p.name for p in (source.data_dir / "data").iterdir())
    predicted = take(source, backup_dir, check=True)
    assert predicted["changed"] and predicted["backup"]["new"]
    assert Path(predicted["backup"]["path"]).name in predicted["diff"]["after"]
    assert files_of(backup_dir) == before
    # The snapshot that was compared is gone again.
    assert sorted(p.name for p in (source.data_dir / "data").iterdir()) == leftovers
    real = take(source, backup_dir)
    assert real["changed"] and real["backup"]["new"]
    assert real["backup"]["sha256"] == predicted["backup"]["sha256"]


def test_retention_keeps_the_newest(env, source: Deployment, first_backup) -> None:
    _cli, _prefix, tmp = env
    backup_dir = tmp / "retention"
    taken = []
    for n in range(3):
        ok(run_module("broker_desktop", source.connection(name=f"retention-{n}", address="192.0.2.42")))
        taken.append(take(source, backup_dir, keep=2)["backup"]["path"])
    assert len(set(taken)) == 3
    listed = take(source, backup_dir, keep=2)
    assert listed["backups"] == taken[1:] and listed["removed"] == []
    names = files_of(backup_dir)
    oldest = Path(taken[0])
    assert not any(n.startswith(oldest.stem) for n in names), names
    assert len(names) == 6
    # A smaller keep in check mode reports what would go and removes nothing.
    predicted = take(source, backup_dir, keep=1, check=True)
    assert predicted["removed"] == [taken[1]] and predicted["changed"]
    assert files_of(backup_dir) == names


def test_backup_playbook_takes_one_and_then_nothing(env, source: Deployment, first_backup) -> None:
    _cli, _prefix, tmp = env
    backup_dir = tmp / "playbook"
    inventory = tmp / "inventory-backup.json"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    group_vars = {
        "gatehouse_name_prefix": source.prefix,
        "gatehouse_backup_dir": str(backup_dir),
        "gatehouse_backup_keep": 1,
    }
    inventory.write_text(json.dumps({"brokers": {"hosts": {"localhost": host}, "vars": group_vars}}))
    changed = []
    for _run in range(2):
        run = run_playbook("-i", str(inventory), str(REPO / "playbooks" / "backup.yml"), timeout=240)
        assert run.returncode == 0, run.stdout[-3000:]
        changed.append(run.report["stats"]["localhost"]["changed"])
    assert changed == [1, 0]
    assert len(files_of(backup_dir)) == 3


def restore_play(env, target: Deployment, restore_from: str) -> Any:
    _cli, _prefix, tmp = env
    inventory = tmp / f"inventory-{target.prefix}.json"
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    group_vars = {
        "gatehouse_name_prefix": target.prefix,
        "gatehouse_backup_dir": str(tmp / "backups"),
        "gatehouse_restore_from": restore_from,
    }
    inventory.write_text(json.dumps({"brokers": {"hosts": {"localhost": host}, "vars": group_vars}}))
    return run_playbook("-i", str(inventory), str(REPO / "playbooks" / "restore.yml"), timeout=240)


def restore_task(run: Any) -> dict[str, Any]:
    for play in run.report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].startswith("Verify the backup"):
                return task["hosts"]["localhost"]
    raise AssertionError(run.stdout[-3000:])


def started_at(cli, deployed: Deployment) -> str:
    return cli.containers.get(f"{deployed.prefix}-broker").attrs["State"]["StartedAt"]


def untouched(cli, deployed: Deployment) -> tuple[int, str]:
    """The database file (a restore renames a new one into place) and the container's last start."""
    return deployed.database.stat().st_ino, started_at(cli, deployed)


@pytest.fixture(scope="module")
def fresh(env, pki: CertAuthority) -> Deployment:
    _cli, prefix, tmp = env
    broker = deploy(pki, tmp, f"{prefix}-b")
    assert broker.login("alice", ALICE_PW) == p.AUTH_FAILED
    return broker


def test_a_corrupted_backup_is_refused_and_nothing_changes(env, fresh: Deployment, first_backup) -> None:
    cli, _prefix, tmp = env
    original = Path(first_backup["backup"]["path"])
    corrupt_dir = tmp / "corrupt"
    corrupt_dir.mkdir()
    for path in original.parent.glob(original.stem + "*"):
        shutil.copy(path, corrupt_dir / path.name)
    damaged = corrupt_dir / original.name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    before = untouched(cli, fresh)

    run = restore_play(env, fresh, str(damaged))
    assert run.returncode != 0
    result = restore_task(run)
    assert result.get("failed") and "does not match its checksum" in result["msg"], result
    assert "nothing was changed" in result["msg"]
    assert untouched(cli, fresh) == before
    assert not (fresh.data_dir / "data" / "broker.db.before-restore").exists()
    # The broker kept serving: an administrator still works, the restored user does not exist there.
    assert fresh.admin().call("GET", "/users")[0] == 200
    assert fresh.login("alice", ALICE_PW) == p.AUTH_FAILED


def test_restore_into_a_fresh_broker_and_log_in(env, fresh: Deployment, first_backup) -> None:
    cli, _prefix, _tmp = env
    backup = Path(first_backup["backup"]["path"])
    replaced = fresh.database.stat().st_ino
    before_start = started_at(cli, fresh)
    # Check mode verifies and predicts; the broker keeps running on its database.
    args = {"state": "restored", "restore_from": str(backup), "name_prefix": fresh.prefix}
    predicted = ok(run_module("broker_backup", args, check=True, diff=True))
    assert predicted["changed"] and predicted["sha256"] == first_backup["backup"]["sha256"]
    assert str(backup) in predicted["diff"]["after"]
    assert untouched(cli, fresh) == (replaced, before_start)
    run = restore_play(env, fresh, backup.name)  # a file of gatehouse_backup_dir, by its name
    assert run.returncode == 0, run.stdout[-3000:]
    result = restore_task(run)
    assert result["changed"] and result["restored_from"] == str(backup)
    assert result["sha256"] == first_backup["backup"]["sha256"]
    assert result["schema_version"] == SCHEMA_VERSION
    assert started_at(cli, fresh) != before_start
    # The database that was replaced is kept beside it (the same file), the backup took its place.
    assert Path(result["previous"]).stat().st_ino == replaced != fresh.database.stat().st_ino
    # The restored user logs in through the broker protocol and sees the restored desktop; carol,
    # made after this backup, does not exist.
    client = fresh.client()
    assert client.login("alice", ALICE_PW, "LAB") == p.AUTH_OK
    assert "desk-1" in client.resources()
    assert fresh.login("carol", CAROL_PW) == p.AUTH_FAILED
    assert fresh.login("alice", "wrong-" + ALICE_PW) == p.AUTH_FAILED


def forged_backup(directory: Path, database_version: int, recorded_version: int) -> Path:
    """A well-formed backup (checksum and metadata match) of a database with ``database_version``
    whose metadata records ``recorded_version``."""
    directory.mkdir()
    db = directory / "broker-20990101T000000Z.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (database_version,))
    conn.close()
    digest = sha256(db)
    (directory / (db.name + ".sha256")).write_text(f"{digest}  {db.name}\n")
    metadata = {"format": 1, "engine": "sqlite", "sha256": digest, "schema_version": recorded_version}
    (directory / (db.stem + ".json")).write_text(json.dumps(metadata))
    return db


def test_a_backup_newer_than_the_broker_is_refused_before_it_stops(env, fresh: Deployment) -> None:
    cli, _prefix, tmp = env
    db = forged_backup(tmp / "newer", SCHEMA_VERSION + 1, SCHEMA_VERSION + 1)
    before = untouched(cli, fresh)
    run = restore_play(env, fresh, str(db))
    result = restore_task(run)
    assert result.get("failed") and "newer than the broker" in result["msg"], result
    assert untouched(cli, fresh) == before


def test_a_database_the_broker_cannot_start_on_is_rolled_back(env, fresh: Deployment) -> None:
    """The metadata passes, the database does not: the broker fails on it, the previous one comes back."""
    cli, _prefix, tmp = env
    db = forged_backup(tmp / "mislabelled", SCHEMA_VERSION + 1, SCHEMA_VERSION)
    users = fresh.admin().call("GET", "/users")
    run = restore_play(env, fresh, str(db))
    result = restore_task(run)
    assert result.get("failed") and "previous database was put back" in result["msg"], result
    assert fresh.admin().call("GET", "/users") == users
    assert cli.containers.get(f"{fresh.prefix}-broker").attrs["State"]["Running"]
    # The broker serves the database it had: the user restored earlier still logs in.
    assert fresh.login("alice", ALICE_PW) == p.AUTH_OK
