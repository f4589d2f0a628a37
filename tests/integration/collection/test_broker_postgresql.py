"""gatehouse.access.broker on PostgreSQL (database_url) against the local Docker engine.

A Docker network of its own (a /26 of GATEHOUSE_TEST_BROKER_PG_POOL, 10.231.4.0/24 by default)
holds a gatehouse/postgres server with TLS (a certificate of the test CA for its container name)
and a holder container whose network namespace the broker joins (``network_mode:
container:<holder>``, the way the collection runs services on a node); the holder publishes the
broker's port on the host's loopback. The broker module deploys the broker with the URL, the
password and the database's CA: check mode first, then for real, then again with no change.
A user made by the broker_user module logs in through the broker protocol (a CM's certificate),
and the user is a row of the PostgreSQL database, read over TLS. The password is never in
ansible's output, the broker's logs or its container's configuration. A URL with a password and
one without a host are refused with nothing changed, on a first deployment and on a running
one. broker_backup backs the database up with pg_dump while the broker serves (no new backup
when nothing changed), restores a backup into it (a user made later is gone, alice logs in), and
refuses an SQLite backup for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collection_helpers
from collection_helpers import run_module
from deploy_helpers import cleanup, docker_client, require_service_images, unique_prefix
from pki import TestPKI
from postgres_server import BrokerHost

from gatehouse import protocol as p
from gatehouse.broker.db import SCHEMA_VERSION

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "adm-pg-" + uuid.uuid4().hex
DB_PASSWORD = "Db-" + uuid.uuid4().hex
ALICE_PW = "Alice-" + uuid.uuid4().hex
SECRETS = (ADMIN, DB_PASSWORD, ALICE_PW)

# Every ansible run the tests check: none of SECRETS in its output.
no_secret = partial(collection_helpers.no_secret, secrets=SECRETS)
ok = partial(collection_helpers.ok, secrets=SECRETS)


@pytest.fixture
def site(pki: TestPKI, tmp_path: Path) -> Iterator[BrokerHost]:
    cli = docker_client()
    require_service_images(cli, "broker")
    prefix = unique_prefix("brokerpg")
    try:
        pool = os.environ.get("GATEHOUSE_TEST_BROKER_PG_POOL", "10.231.4.0/24")
        yield BrokerHost.start(cli, pki, tmp_path, prefix, admin_token=ADMIN, password=DB_PASSWORD, pool=pool)
    finally:
        cleanup(cli, prefix)


def test_broker_on_postgresql(site: BrokerHost) -> None:
    cli, data_dir = site.cli, site.data_dir
    args = site.broker_args(host_label="broker-pg")

    # A bad URL is refused before anything exists, and its password is not shown.
    with_password = site.url.replace("broker@", f"broker:{DB_PASSWORD}@")
    refused = run_module("broker", dict(args, database_url=with_password))
    assert refused.failed and not refused.changed
    assert any("database_url holds a password" in e for e in refused.result["errors"]), refused.result
    no_secret(refused)
    refused = run_module("broker", dict(args, database_url="postgresql:///broker"))
    assert refused.failed and any("database_url names no host" in e for e in refused.result["errors"])
    assert not data_dir.exists()

    check = run_module("broker", args, check=True, diff=True)
    assert check.changed, ok(check)
    assert (
        not data_dir.exists()
        and cli.containers.list(all=True, filters={"name": f"{site.prefix}-broker"}) == []
    )
    real = run_module("broker", args, diff=True)
    assert real.changed, ok(real)
    for key in ("changed_files", "containers"):
        assert check.result[key] == real.result[key], key
    assert "database.password" in str(real.result["diff"]) and "not shown" in str(real.result["diff"])
    assert not run_module("broker", args, check=True).changed
    again = run_module("broker", args, diff=True)
    assert not again.changed, ok(again)

    props = ok(real)["config"]["broker_properties"]
    assert props["Database"] == site.url + "&sslmode=verify-full&sslrootcert=/certs/database-ca.pem"
    assert props["DatabasePasswordFile"] == "/secrets/database.password"
    assert real.result["config"]["database"] == props["Database"]
    password_file = data_dir / "secrets" / "database.password"
    assert password_file.read_text() == DB_PASSWORD + "\n"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert (data_dir / "certs" / "database-ca.pem").read_bytes() == Path(site.pki.ca).read_bytes()
    assert not (data_dir / "data" / "broker.db").exists(), "a PostgreSQL broker has no SQLite file"
    container = cli.containers.get(f"{site.prefix}-broker")
    secrets_mount = [m for m in container.attrs["Mounts"] if m["Destination"] == "/secrets"]
    assert secrets_mount and secrets_mount[0]["RW"] is False

    site.wait_broker()
    ok(run_module("broker_user", site.connection(name="alice", domain="LAB", password=ALICE_PW)))
    assert site.client().login("alice", ALICE_PW, "LAB") == p.AUTH_OK
    assert site.client().login("alice", "wrong-" + ALICE_PW, "LAB") != p.AUTH_OK
    # The state is in PostgreSQL, and the broker reaches it over verified TLS.
    assert site.psql("SELECT name FROM users") == "alice"
    assert (
        site.psql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = 'gatehouse-broker'"
        )
        == "t"
    )
    # Same options once more with the user in the database: still no change.
    assert not ok(run_module("broker", args))["changed"]

    container.reload()
    logs = container.logs().decode(errors="replace")
    assert "postgresql://broker@" in logs, logs[-2000:]
    inspected = str(container.attrs["Config"]) + str(container.attrs["HostConfig"])
    for secret in (DB_PASSWORD, ALICE_PW):
        assert secret not in logs and secret not in inspected

    # A bad URL on the running broker: refused, the files and the container stay as they were.
    properties = data_dir / "data" / "broker.properties"
    before = (
        properties.read_bytes(),
        password_file.read_bytes(),
        container.id,
        container.attrs["State"]["StartedAt"],
    )
    refused = run_module("broker", dict(args, database_url=site.url + "&password=" + DB_PASSWORD))
    assert refused.failed and any("holds a password parameter" in e for e in refused.result["errors"])
    no_secret(refused)
    refused = run_module("broker", dict(args, database_url="mysql://broker@db/broker"))
    assert refused.failed and any("must be a libpq URL" in e for e in refused.result["errors"])
    container = cli.containers.get(f"{site.prefix}-broker")
    after = (
        properties.read_bytes(),
        password_file.read_bytes(),
        container.id,
        container.attrs["State"]["StartedAt"],
    )
    assert after == before

    # broker_backup: pg_dump in a one-off container of the postgres image while the broker serves.
    backups = site.tmp / "backups"
    backup_args = {"backup_dir": str(backups), "name_prefix": site.prefix}
    first = ok(run_module("broker_backup", backup_args, diff=True))
    assert first["changed"] and first["backup"]["new"], first
    dump = Path(first["backup"]["path"])
    assert dump.parent == backups and dump.suffix == ".dump" and dump.read_bytes()[:5] == b"PGDMP"
    assert sorted(x.name for x in backups.iterdir()) == sorted(
        [dump.name, dump.name + ".sha256", dump.stem + ".json"]
    )
    for item in backups.iterdir():
        assert stat.S_IMODE(item.stat().st_mode) == 0o600, item
    check = subprocess.run(
        ["sha256sum", "-c", dump.name + ".sha256"], cwd=backups, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    metadata = json.loads((backups / (dump.stem + ".json")).read_text())
    assert metadata["engine"] == "postgresql" and metadata["schema_version"] == SCHEMA_VERSION
    assert metadata["database"] == f"postgresql://broker@{site.postgres.name}:5432/broker"
    assert len(metadata["content_sha256"]) == 64 and metadata["totp_key"] is None
    # Nothing changed in the database: no new backup (a new dump differs only in its time).
    same = ok(run_module("broker_backup", backup_args))
    assert not same["changed"] and same["backup"]["path"] == str(dump) and not same["backup"]["new"], same
    assert same["backup"]["sha256"] == first["backup"]["sha256"]
    # A user more: a new backup.
    ok(run_module("broker_user", site.connection(name="bob", domain="LAB", password=ALICE_PW + "b")))
    second = ok(run_module("broker_backup", dict(backup_args, keep=2)))
    assert (
        second["changed"]
        and second["backup"]["new"]
        and second["backups"] == [str(dump), second["backup"]["path"]]
    )

    # Restore the first backup: the broker stops, the database is replaced in one transaction, the
    # broker starts on it; bob (made after the backup) is gone, alice logs in.
    restore_args = {"state": "restored", "restore_from": str(dump), "name_prefix": site.prefix}
    predicted = ok(run_module("broker_backup", restore_args, check=True))
    assert predicted["changed"] and site.psql("SELECT name FROM users ORDER BY name") == "alice\nbob"
    restored = ok(run_module("broker_backup", restore_args))
    assert restored["changed"] and restored["database"] == metadata["database"], restored
    assert restored["previous"] == str(data_dir / "data" / "broker.before-restore.dump")
    assert Path(restored["previous"]).read_bytes()[:5] == b"PGDMP"
    assert site.psql("SELECT name FROM users ORDER BY name") == "alice"
    assert site.client().login("alice", ALICE_PW, "LAB") == p.AUTH_OK
    # The one-off containers are gone, and no password reached a log of the broker.
    assert [
        c.name for c in cli.containers.list(all=True) if c.name.startswith(f"{site.prefix}-broker-")
    ] == []
    logs = cli.containers.get(f"{site.prefix}-broker").logs().decode(errors="replace")
    assert DB_PASSWORD not in logs and ALICE_PW not in logs

    # An SQLite backup does not go into a broker on PostgreSQL: refused, nothing changed.
    sqlite_backup = backups / "broker-20260101T000000Z.db"
    sqlite_backup.write_bytes(b"SQLite format 3\x00")
    digest = hashlib.sha256(sqlite_backup.read_bytes()).hexdigest()
    (backups / (sqlite_backup.name + ".sha256")).write_text(f"{digest}  {sqlite_backup.name}\n")
    (backups / (sqlite_backup.stem + ".json")).write_text(
        json.dumps({"format": 2, "engine": "sqlite", "sha256": digest, "totp_key": None, "schema_version": 1})
    )
    started = cli.containers.get(f"{site.prefix}-broker").attrs["State"]["StartedAt"]
    wrong = run_module("broker_backup", dict(restore_args, restore_from=str(sqlite_backup)))
    assert wrong.failed and "uses postgresql" in wrong.result["msg"], wrong.result
    assert cli.containers.get(f"{site.prefix}-broker").attrs["State"]["StartedAt"] == started
    assert site.psql("SELECT name FROM users ORDER BY name") == "alice"

    gone = run_module("broker", {"state": "absent", "data_dir": str(data_dir), "name_prefix": site.prefix})
    assert gone.changed, ok(gone)
    assert not password_file.exists()
    assert site.psql("SELECT name FROM users") == "alice", "the database is not the module's to delete"
