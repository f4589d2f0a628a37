"""gatehouse.access.broker_migrate: an SQLite broker's data moved to PostgreSQL and back, every row kept.

A Docker network of its own (a /26 of GATEHOUSE_TEST_BROKER_MIGRATE_POOL, 10.231.2.0/24 by
default) holds a gatehouse/postgres server with TLS and a holder container whose network
namespace the broker joins (as in test_broker_postgresql.py). The broker module deploys an SQLite
broker with TOTP for CORP; the broker_* modules make a group, users (dave with an enrolled TOTP
secret), a persistent pool, desktops and entitlements; logins through the broker protocol make an
assignment, the placement counters and a used TOTP step. broker_migrate moves the database to
PostgreSQL (check mode first: nothing written, the broker keeps serving), the rows of every table
are compared here, engine against engine (counts and a digest of the content), and a second run
changes nothing. The broker module starts the broker on PostgreSQL, where dave logs in with his
next TOTP code, alice gets her assigned desktop again and a wrong password leaves throttle rows.
Back to SQLite with broker_migrate's defaults (the broker's own URL and password file): the old
file is refused with the broker still serving; then playbooks/broker-migrate.yml, on an inventory
without broker_database_url and with gatehouse_migrate_replace, moves it aside, copies the
PostgreSQL rows (throttle rows included) to a new file that holds exactly them, after a pg_dump
backup, deploys the broker on it through the role and checks it. No password reaches ansible's output.

The guard of playbooks/tasks/broker-settings.yml, in check mode on this host without a cluster or a
running broker: with a database cluster in the inventory, site.yml refuses a broker whose settings
name its SQLite file, before the broker is deployed; broker-migrate.yml (gatehouse__migrating)
passes the guard and takes the cluster's URL to the copy.

GATEHOUSE_TEST_BROKER_IMAGE_TAG picks the broker image's tag (default: the collection's version).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import docker
import pyotp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collection_helpers
from collection_helpers import (
    REPO_ROOT,
    PlaybookRun,
    ansible_env,
    collection_tree,
    run_module,
    run_playbook,
    tool,
)
from deploy_helpers import cleanup, docker_client, require_service_images
from pki import TestPKI
from postgres_server import BrokerHost

from gatehouse import protocol as p
from gatehouse.broker import migrate
from gatehouse.broker.db import SCHEMA_VERSION

pytestmark = [pytest.mark.docker, pytest.mark.images]

IMAGE_TAG = os.environ.get("GATEHOUSE_TEST_BROKER_IMAGE_TAG", "0.1.0")
ADMIN = "adm-mig-" + uuid.uuid4().hex
DB_PASSWORD = "Db-" + uuid.uuid4().hex
ALICE_PW = "Alice-" + uuid.uuid4().hex
DAVE_PW = "Dave-" + uuid.uuid4().hex
SECRETS = [ADMIN, DB_PASSWORD, ALICE_PW, DAVE_PW]  # and the TOTP key and secret, once made
SECOND_FACTOR = {"method": "totp", "domains": ["CORP"]}

# Every ansible run the tests check: none of SECRETS in its output.
no_secret = partial(collection_helpers.no_secret, secrets=SECRETS)
ok = partial(collection_helpers.ok, secrets=SECRETS)


class Site(BrokerHost):
    """The PostgreSQL server and broker host of postgres_server.py, with this module's broker (TOTP
    for CORP, IMAGE_TAG) on SQLite or on the server."""

    @property
    def sqlite(self) -> Path:
        return self.data_dir / "data" / "broker.db"

    @property
    def local_url(self) -> str:
        """The server as the test reads its rows (its 5432 on the host's loopback)."""
        return f"postgresql://broker@127.0.0.1:{self.pg_port}/broker"

    def migrate_args(self, **extra: Any) -> dict[str, Any]:
        return {
            "name_prefix": self.prefix,
            "database_url": self.url,
            "database_password": self.password,
            "database_ca_cert": str(self.pki.ca),
            **extra,
        }

    def deploy(self, postgresql: bool) -> None:
        args = self.broker_args(postgresql, image_tag=IMAGE_TAG, second_factor=SECOND_FACTOR)
        ok(run_module("broker", args))
        SECRETS.append((self.data_dir / "secrets" / "totp.key").read_text().strip())
        self.wait_broker()

    def playbook(self, *args: str) -> PlaybookRun:
        """playbooks/broker-migrate.yml on an inventory of this host that keeps the broker on SQLite."""
        ca_dir = self.tmp / "ca"
        ca_dir.mkdir(exist_ok=True)
        (ca_dir / "ca.pem").write_bytes(Path(self.pki.ca).read_bytes())
        certs = self.pki.issue(f"{self.prefix}-broker", ["localhost", "127.0.0.1"], role="broker")
        host = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "gatehouse_data_root": str(self.tmp),
            "gatehouse_name_prefix": self.prefix,
            "gatehouse_network_mode": f"container:{self.holder.name}",
            "gatehouse_version": IMAGE_TAG,
            "gatehouse_admin_token": self.admin_token,
            "gatehouse_secrets_dir": str(self.tmp / "secrets"),
            "gatehouse_backup_dir": str(self.tmp / "backups"),
            "gatehouse_ca_dir": str(ca_dir),
            "gatehouse_broker_api_url": f"https://localhost:{self.port}",
            "gatehouse_broker_ca_cert": str(self.pki.ca),
            "broker_ssl_cert": str(certs.cert),
            "broker_ssl_key": str(certs.key),
            "broker_domains": ["CORP", "LAB"],
            "broker_second_factor": SECOND_FACTOR,
        }
        inventory = self.tmp / "inventory.json"
        inventory.write_text(json.dumps({"all": {"children": {"brokers": {"hosts": {"localhost": host}}}}}))
        return run_playbook("-i", str(inventory), str(REPO_ROOT / "playbooks" / "broker-migrate.yml"), *args)

    def broker_running(self) -> bool:
        return bool(self.cli.containers.get(f"{self.prefix}-broker").attrs["State"]["Running"])


def run_tasks(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ansible-playbook run of ``tasks`` on localhost; the result of each task (cheaper than one run each)."""
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
    no_secret(proc)
    report = json.loads(proc.stdout)
    results = [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]]
    assert len(results) == len(tasks) and not any(r.get("failed") for r in results), proc.stdout[-3000:]
    return results


def rows(database: str, password: str = "") -> tuple[int, dict[str, migrate.TableDigest]]:
    """The schema version and each table's count and content digest, read here (not from the module)."""
    reader = migrate.Reader(database, password)
    try:
        version = reader.version()
        return version, {t.name: migrate.digest(t, reader.rows(t)) for t in migrate.schema(version)}
    finally:
        reader.close()


@pytest.fixture
def site(pki: TestPKI, tmp_path: Path) -> Iterator[Site]:
    cli = docker_client()
    require_service_images(cli, "broker")
    try:
        cli.images.get(f"gatehouse/broker:{IMAGE_TAG}")
    except docker.errors.ImageNotFound:
        pytest.fail(f"image gatehouse/broker:{IMAGE_TAG} is missing: run make images")
    prefix = f"ghm-{uuid.uuid4().hex[:8]}"  # ghm: gatehouse migrate
    try:
        pool = os.environ.get("GATEHOUSE_TEST_BROKER_MIGRATE_POOL", "10.231.2.0/24")
        yield Site.start(cli, pki, tmp_path, prefix, admin_token=ADMIN, password=DB_PASSWORD, pool=pool)
    finally:
        cleanup(cli, prefix)


def totp_login(site: Site, code: str) -> str:
    client = site.client()
    assert client.login("dave", DAVE_PW, "CORP") == p.AUTH_INCOMPLETE
    reply = client.send(p.Authenticate("dave", "", "CORP", p.METHOD_PASSCODE, code))
    assert isinstance(reply, p.AuthenticateResp), reply
    return reply.result_id


def alice_desktop(site: Site) -> str:
    """alice logs in and gets a desktop of her persistent pool; the desktop's address."""
    client = site.client()
    assert client.login("alice", ALICE_PW, "LAB") == p.AUTH_OK
    reply = client.allocate(client.resources()["Pool One"])
    assert reply.result_id == p.ALLOC_OK and reply.agent is not None, reply
    return reply.agent.ip_address


def assert_same_rows(one: tuple[int, dict], two: tuple[int, dict]) -> None:
    assert one[0] == two[0] == SCHEMA_VERSION
    assert {n: d.rows for n, d in one[1].items()} == {n: d.rows for n, d in two[1].items()}
    assert one[1] == two[1], [n for n in one[1] if one[1][n] != two[1].get(n)]


def test_sqlite_to_postgresql_and_back(site: Site) -> None:
    site.deploy(postgresql=False)
    api = site.connection()
    uri_file = site.tmp / "dave.uri"
    made = run_tasks(
        [
            {"gatehouse.access.broker_group": {**api, "name": "Staff", "domain": "LAB", "description": "Équipe"}},
            {"gatehouse.access.broker_user": {**api, "name": "alice", "domain": "LAB", "password": ALICE_PW, "groups": ["staff"]}},
            {"gatehouse.access.broker_user": {**api, "name": "Dave", "domain": "CORP", "password": DAVE_PW, "totp": "enrolled"},
             "no_log": True, "register": "dave"},
            {"ansible.builtin.copy": {"content": "{{ dave.totp.otpauth_uri }}", "dest": str(uri_file), "mode": "0600"},
             "no_log": True},
            {"gatehouse.access.broker_pool": {**api, "name": "Pool One", "persistent": True}},
            {"gatehouse.access.broker_desktop": {**api, "name": "desk-1", "address": "192.0.2.41", "pool": "Pool One"}},
            {"gatehouse.access.broker_desktop": {**api, "name": "Desk-2", "address": "192.0.2.42", "site": "east"}},
            {"gatehouse.access.broker_entitlement": {**api, "principal_type": "group", "principal": "staff",
                                                     "domain": "LAB", "resource_type": "pool", "resource": "Pool One"}},
            {"gatehouse.access.broker_entitlement": {**api, "principal_type": "user", "principal": "dave",
                                                     "domain": "CORP", "resource_type": "desktop", "resource": "desk-2"}},
        ]
    )  # fmt: skip
    assert made[2]["changed"]
    uri = uri_file.read_text()
    SECRETS.append(uri.split("secret=")[1].split("&")[0])
    totp = pyotp.parse_uri(uri)
    used_at = time.time()
    assert totp_login(site, totp.at(used_at)) == p.AUTH_OK  # the used time step is stored
    desktop = alice_desktop(site)  # an assignment and the placement counters
    assert site.client().login("alice", "wrong-" + ALICE_PW, "LAB") != p.AUTH_OK

    # Check mode: the counts that would be copied; nothing is written, the broker keeps serving.
    check = run_module("broker_migrate", site.migrate_args(), check=True, diff=True)
    result = ok(check)
    assert result["changed"] and result["status"] == "would-copy" and not result["broker_stopped"], result
    assert result["tables"]["users"] == {"source": 2, "target": None, "same": False}
    assert result["tables"]["assignments"]["source"] == 1 and result["tables"]["totp"]["source"] == 1
    assert "users: 2" in result["diff"]["after"]
    assert site.broker_running()
    assert site.psql("SELECT to_regclass('users') IS NULL") == "t"

    moved = ok(run_module("broker_migrate", site.migrate_args(), diff=True))
    assert moved["changed"] and moved["status"] == "copied" and moved["broker_stopped"], moved
    assert moved["source"] == "/data/broker.db" and moved["target"] == site.url.split("?")[0]
    assert moved["schema_version"] == SCHEMA_VERSION
    assert all(t["same"] and t["source"] == t["target"] for t in moved["tables"].values()), moved["tables"]
    assert not site.broker_running()
    before = rows(str(site.sqlite))
    assert_same_rows(before, rows(site.local_url, DB_PASSWORD))
    assert {n: t["source"] for n, t in moved["tables"].items()} == {n: d.rows for n, d in before[1].items()}
    for table in ("domains", "users", "groups", "group_members", "pools", "desktops", "entitlements",
                  "totp", "assignments", "desktop_load"):  # fmt: skip
        assert before[1][table].rows > 0, table

    # Idempotent: the target holds the same rows.
    again = ok(run_module("broker_migrate", site.migrate_args()))
    assert not again["changed"] and again["status"] == "same", again

    # The broker on PostgreSQL: the migrated users log in, the assignment holds, the throttle writes rows.
    site.deploy(postgresql=True)
    assert totp_login(site, totp.at(used_at)) == p.AUTH_FAILED  # that step was used on SQLite
    assert totp_login(site, totp.at(time.time() + 30)) == p.AUTH_OK
    assert alice_desktop(site) == desktop
    assert site.client().login("alice", "wrong-" + ALICE_PW, "LAB") != p.AUTH_OK
    in_use = ok(run_module("broker_migrate", site.migrate_args()))
    assert not in_use["changed"] and in_use["status"] == "in-use", in_use
    assert site.broker_running()

    # Back to SQLite: the old file holds other rows and is refused (the broker keeps serving) ...
    # Without database_url: the broker's own URL and password file (broker.properties, secrets/).
    back = {"name_prefix": site.prefix, "to": "sqlite"}
    refused = run_module("broker_migrate", back)
    assert refused.failed and "other rows" in refused.result["msg"] and not refused.changed, refused.result
    no_secret(refused)
    assert site.broker_running()
    # ... until replace moves it aside: playbooks/broker-migrate.yml with an inventory without
    # broker_database_url copies, redeploys the broker on SQLite through the role and checks it.
    playbook = site.playbook("-e", "gatehouse_migrate_replace=true")
    assert playbook.returncode == 0, playbook.stdout[-4000:]
    no_secret(playbook)
    tasks = {t["task"]["name"]: t["hosts"]["localhost"] for t in playbook.report["plays"][0]["tasks"]}
    returned = next(r for name, r in tasks.items() if name.startswith("Stop the broker, copy"))
    assert returned["changed"] and returned["status"] == "copied", returned
    assert returned["source"] == site.url.split("?")[0] and returned["target"] == "/data/broker.db"
    assert returned["previous"] == str(site.sqlite) + ".before-migrate"
    assert not tasks["Check that the broker serves the copied users"].get("failed")
    backup = tasks["Back up the broker's current database first"]["backup"]  # pg_dump, before the move
    assert (
        backup["new"]
        and backup["path"].endswith(".dump")
        and Path(backup["path"]).read_bytes()[:5] == b"PGDMP"
    )
    assert rows(returned["previous"]) == before
    on_postgresql = rows(site.local_url, DB_PASSWORD)
    assert on_postgresql[1]["login_failures"].rows > 0 and on_postgresql[1]["login_known_sources"].rows > 0
    assert_same_rows(on_postgresql, rows(str(site.sqlite)))
    assert oct(site.sqlite.stat().st_mode & 0o777) == "0o600" and site.sqlite.stat().st_uid == 10001
    properties = (site.data_dir / "data" / "broker.properties").read_text()
    assert "Database=/data/broker.db" in properties and "postgresql" not in properties
    assert site.broker_running() and alice_desktop(site) == desktop


def test_the_cluster_takes_an_sqlite_broker_only_through_broker_migrate(pki: TestPKI, tmp_path: Path) -> None:
    # A broker that ran on SQLite: its settings as the broker module writes them.
    data = tmp_path / "node" / "broker" / "data"
    data.mkdir(parents=True)
    (data / "broker.properties").write_text("Database=/data/broker.db\nListenPort=8443\n")
    # An operator certificate: check mode makes no key for one from the deployment CA.
    certs = pki.issue("guard-broker", ["localhost", "127.0.0.1"], role="broker")
    broker = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "gatehouse_address": "127.0.0.1",
        "gatehouse_data_root": str(tmp_path / "node"),
        "broker_ssl_cert": str(certs.cert),
        "broker_ssl_key": str(certs.key),
    }
    cluster = {f"db{n}": {"gatehouse_address": f"10.0.0.6{n}"} for n in (1, 2, 3)}  # never reached
    inventory = tmp_path / "inventory.json"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "vars": {
                        "gatehouse_secrets_dir": str(tmp_path / "secrets"),
                        # Of no other deployment on this engine.
                        "gatehouse_name_prefix": f"ghm-{uuid.uuid4().hex[:8]}",
                    },
                    "children": {"brokers": {"hosts": {"b1": broker}}, "databases": {"hosts": cluster}},
                }
            }
        )
    )
    guard = "Refuse to put a broker that runs on SQLite onto the cluster without its rows"

    def tasks(run: PlaybookRun) -> dict[str, dict[str, Any]]:
        generated = [f.read_text().strip() for f in (tmp_path / "secrets").glob("*") if f.is_file()]
        collection_helpers.no_secret(run, generated)
        return {
            t["task"]["name"]: t["hosts"]["b1"]
            for p in run.report["plays"]
            for t in p["tasks"]
            if "b1" in t["hosts"]
        }

    site = run_playbook(
        "-i", str(inventory), str(REPO_ROOT / "playbooks" / "site.yml"), "--check", "--limit", "b1"
    )
    assert site.returncode != 0
    ran = tasks(site)
    assert ran[guard].get("failed"), ran[guard]
    assert (
        "keeps its data in SQLite" in ran[guard]["msg"]
        and "playbooks/broker-migrate.yml" in ran[guard]["msg"]
    )
    # Stopped there: the broker is neither pointed at the cluster nor deployed.
    assert list(ran)[-1] == guard, list(ran)

    migrate = run_playbook(
        "-i", str(inventory), str(REPO_ROOT / "playbooks" / "broker-migrate.yml"), "--check", "--limit", "b1",
        "-e", "gatehouse_migrate_backup=false",
    )  # fmt: skip
    ran = tasks(migrate)
    assert not ran[guard].get("failed") and not ran[guard].get("skipped"), ran[guard]
    # The copy is asked for with the cluster's URL (and fails here, where check mode put no CA on the node).
    copy = next(r for name, r in ran.items() if name.startswith("Stop the broker, copy"))
    assert copy["invocation"]["module_args"]["to"] == "postgresql", copy
    assert copy["invocation"]["module_args"]["database_url"] == (
        "postgresql://gatehouse@10.0.0.61:5432,10.0.0.62:5432,10.0.0.63:5432/gatehouse?target_session_attrs=read-write"
    )
