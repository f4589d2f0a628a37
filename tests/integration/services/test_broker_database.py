"""The broker's database on both engines (SQLite file, PostgreSQL server): one schema, one API.

``broker_database`` (tests/integration/conftest.py; its BrokerDatabase is in postgres_server.py) runs each engine-neutral test on SQLite and on
a real PostgreSQL (gatehouse/postgres) reached by a multi-host URL whose first host is down. The
PostgreSQL-only tests start their own servers: a restart, and a switchover between two servers
that libpq tells apart by whether they take writes.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from broker_helpers import ALICE_PW, WRONG_PW, running_broker
from pki import TestPKI
from postgres_server import BrokerDatabase, PostgresServer, running

from gatehouse import protocol as p
from gatehouse.broker import passwords
from gatehouse.broker.db import MIGRATIONS, POSTGRESQL, SCHEMA_VERSION, Database, DatabaseError
from gatehouse.broker.store import Store
from gatehouse.broker.throttle import (
    ACCOUNT_LOCKOUT,
    DELAY,
    LOCKOUT,
    LoginThrottle,
    ThrottlePolicy,
    account_key,
)

pytestmark = [pytest.mark.docker, pytest.mark.images]

PASSWORD = "Correct-Horse-7731"
POLICY = ThrottlePolicy(
    delay_after_failures=3,
    max_delay=8.0,
    lockout_after_failures=10,
    source_lockout_after_failures=50,
    account_lockout_after_failures=30,
    lockout_seconds=900.0,
    failure_window=900.0,
)
ALICE = account_key("CORP", "alice")


def _seed(store: Store) -> None:
    store.sync_domains(["CORP"])
    with store.db.transaction():
        store.put_group("CORP", "staff", {"description": "everyone"})
        store.put_user(
            "CORP", "alice", {"display_name": "Alice", "groups": ["staff"]}, passwords.hash_password(PASSWORD)
        )
        store.put_user("CORP", "Bob", {"display_name": "Bob", "groups": ["STAFF"]}, None)
        store.put_pool("pool1", {"persistent": True, "members": []})
        store.put_desktop("d1", {"address": "Desk1.corp.example", "pool": "pool1"})
        store.put_desktop("D0", {"address": "10.0.0.2", "pool": "POOL1"})
        store.put_entitlement(("group", "CORP", "staff", "pool", "pool1"))
        store.put_entitlement(("directory-group", "CORP", "CN=Lab,DC=corp", "desktop", "d1"))


def test_migrations_from_empty_and_reopen(broker_database: BrokerDatabase) -> None:
    db = broker_database.open()
    try:
        assert db.engine == broker_database.engine
        assert db.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert db.ready()
        assert "pw-" not in db.name and "password" not in db.name
    finally:
        db.close()
    again = broker_database.open()
    try:
        assert again.migrate() == []
    finally:
        again.close()


def test_older_schema_is_migrated_and_keeps_data(broker_database: BrokerDatabase) -> None:
    old = broker_database.open(upto=1)
    assert old.schema_version() == 1
    with old.transaction() as conn:
        conn.execute("INSERT INTO domains (name) VALUES ('CORP')")
        conn.execute(
            "INSERT INTO users (domain_id, name, display_name, password_hash) "
            "SELECT id, 'bob', 'Bob', ? FROM domains",
            (passwords.hash_password(PASSWORD),),
        )
    old.close()
    db = broker_database.open()
    try:
        assert db.schema_version() == SCHEMA_VERSION
        store = Store(db)
        assert store.get_user("corp", "BOB")["display_name"] == "Bob"  # type: ignore[index]
        assert store.get_user("CORP", "bob")["source"] == "local"  # type: ignore[index]
    finally:
        db.close()


def test_newer_schema_is_refused(broker_database: BrokerDatabase) -> None:
    db = broker_database.open()
    with db.transaction() as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(
        DatabaseError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this broker"
    ) as info:
        broker_database.open()
    if broker_database.password:
        assert broker_database.password not in str(info.value)


def test_two_nodes_starting_together_migrate_once(broker_database: BrokerDatabase) -> None:
    opened: list[Database] = []
    failed: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(broker_database.open())
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=start) for _n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not failed and len(opened) == 2
        assert [db.schema_version() for db in opened] == [SCHEMA_VERSION] * 2
        assert opened[0].one("SELECT COUNT(*) FROM schema_version")[0] == 1
    finally:
        for db in opened:
            db.close()


def test_store_objects_names_without_case_and_constraints(broker_database: BrokerDatabase) -> None:
    db = broker_database.open()
    try:
        store = Store(db)
        _seed(store)
        db.close()
        db = broker_database.open()
        store = Store(db)
        assert store.get_user("corp", "ALICE")["groups"] == ["staff"]  # type: ignore[index]
        assert [u["name"] for u in store.list_users("CORP")] == ["alice", "Bob"]
        assert store.get_group("CORP", "Staff")["members"] == ["alice", "Bob"]  # type: ignore[index]
        assert store.get_pool("POOL1") == {
            "name": "pool1",
            "persistent": True,
            "description": "",
            "members": ["D0", "d1"],
        }
        assert [d["name"] for d in store.list_desktops()] == ["D0", "d1"]
        record = store.user_record("CORP", "alice")
        assert record is not None and passwords.verify_password(PASSWORD, record.password_hash)
        assert [e["principal_type"] for e in store.list_entitlements({})] == ["directory-group", "group"]
        assert store.directory_entitlement_ids("CORP", ["cn=lab,dc=corp"]) == (
            {store.desktop_record("d1").id},  # type: ignore[union-attr]
            set(),
        )
        desktops, pools = store.entitled(record.id)
        assert desktops == [] and [p["name"] for p in pools] == ["pool1"]
        # Names are unique without case: a second "ALICE" violates the constraint.
        with pytest.raises(db.integrity_errors), db.transaction() as conn:
            conn.execute(
                "INSERT INTO users (domain_id, name) VALUES (?, 'ALICE')", (store.domain_id("CORP"),)
            )
        # Check mode: the work is done, then undone.
        with db.transaction(rollback=True):
            store.put_user("CORP", "ghost", {}, None)
            assert store.get_user("CORP", "ghost") is not None
        assert store.get_user("CORP", "ghost") is None
        # Cascades.
        with db.transaction():
            store.delete_group("CORP", "staff")
        assert [e["principal_type"] for e in store.list_entitlements({})] == ["directory-group"]
        assert store.get_user("CORP", "alice")["groups"] == []  # type: ignore[index]
        with db.transaction():
            store.delete_pool("pool1")
        assert store.get_desktop("d1")["pool"] is None  # type: ignore[index]
    finally:
        db.close()


def test_placement_state_and_second_factor_rows(broker_database: BrokerDatabase) -> None:
    db = broker_database.open()
    try:
        store = Store(db)
        _seed(store)
        desktop = store.desktop_record("d1")
        user = store.user_record("CORP", "alice")
        pool_id = store.pool_id("pool1")
        assert desktop is not None and user is not None and pool_id is not None
        with db.transaction():
            store.record_placement(desktop.id)
            store.record_placement(desktop.id)
            store.set_assignment(user.id, pool_id, desktop.id)
        assert store.assignment(user.id, pool_id) == desktop.id
        assert [a["desktop"] for a in store.list_assignments("POOL1")] == ["d1"]
        # An agent reports by the desktop's host name in another case.
        (found,) = store.report_desktops("192.0.2.50", "DESK1.corp.example", 60443)
        assert found.id == desktop.id
        report = {
            "address": "192.0.2.50",
            "hostname": "DESK1.corp.example",
            "agent_port": 60443,
            "session_port": 4172,
            "active_sessions": 1,
            "capacity": 5,
        }
        with db.transaction():
            store.record_report([desktop.id], report, 1234.5)
            store.record_report([desktop.id], report, 1700000000.25)
        (member,) = store.members(desktop_id=desktop.id)
        assert (member.placed_since_report, member.placed_total) == (0, 2)
        assert (member.active_sessions, member.capacity, member.reported_at) == (1, 5, 1700000000.25)
        # TOTP secrets are bytes; a time step is accepted once.
        with db.transaction():
            store.set_totp(user.id, b"\x00\xffsecret")
        assert store.totp(user.id) == (b"\x00\xffsecret", 0)
        with db.transaction():
            assert store.accept_totp_step(user.id, 56_666_666)
            assert not store.accept_totp_step(user.id, 56_666_666)
        assert store.get_user("CORP", "alice")["totp_enrolled"] is True  # type: ignore[index]
    finally:
        db.close()


def test_throttle_counters_are_shared_by_two_broker_nodes(broker_database: BrokerDatabase) -> None:
    one, two = broker_database.open(), broker_database.open()
    try:
        node1, node2 = LoginThrottle(POLICY, one), LoginThrottle(POLICY, two)
        now = 1_700_000_000.0
        for _n in range(3):
            assert node1.check(ALICE, "198.51.100.7", now) is None
            node1.failure(ALICE, "198.51.100.7", now)
        # The third failure on node 1 delays the pair on node 2 as well.
        assert node2.check(ALICE, "198.51.100.7", now + 0.5) == DELAY
        assert node2.check(ALICE, "198.51.100.7", now + 1.0) is None
        node2.failure(ALICE, "198.51.100.7", now + 1.0)
        assert node1.pairs.get((ALICE, "198.51.100.7"), now + 1.0).failures == 4  # type: ignore[union-attr]
        # Up to the lockout, alternating nodes.
        t = now + 1.0
        started: list[str] = []
        for n in range(6):
            t += 9.0
            node = (node1, node2)[n % 2]
            assert node.check(ALICE, "198.51.100.7", t) is None
            started += node.failure(ALICE, "198.51.100.7", t)
        assert started == ["account_source"]
        assert node1.check(ALICE, "198.51.100.7", t + 1) == LOCKOUT
        assert node2.check(ALICE, "198.51.100.7", t + 1) == LOCKOUT
        node1.release(ALICE, "198.51.100.7")
        node2.release(ALICE, "198.51.100.7")
        # A success on node 2 makes the source known on node 1: spared the account lockout.
        bob = account_key("CORP", "bob")
        node2.success(bob, "192.0.2.10", t)
        for n in range(2, 5):
            for _n in range(10):
                t += 9.0
                assert node1.check(bob, f"198.51.100.{n}", t) is None
                node1.failure(bob, f"198.51.100.{n}", t)
        assert node2.check(bob, "203.0.113.99", t + 1) == ACCOUNT_LOCKOUT
        assert node2.check(bob, "192.0.2.10", t + 1) is None
        node2.release(bob, "192.0.2.10")
        assert len(node1) == len(node2) > 0
        # Swept once the window and the blocks have passed (a sweep runs at most once a minute).
        node1.check(ALICE, "192.0.2.10", t + 100_000)
        assert len(node2) == 1  # the known source stays for KNOWN_SOURCE_TTL
        # At most ``cap`` rows per scope: the oldest go first.
        node1.sources.cap = 3
        with one.transaction():
            for n in range(6):
                node1.sources.add_failure(f"203.0.113.{n}", t + 100_000 + n)
            node1.sources.sweep(t + 100_010)
        assert len(node2.sources) == 3
        assert node2.sources.get("203.0.113.5", t + 100_010) is not None
        assert node2.sources.get("203.0.113.2", t + 100_010) is None
    finally:
        one.close()
        two.close()


# ---------------------------------------------------------------- PostgreSQL only


def test_a_transaction_is_retried_across_a_server_restart() -> None:
    with running() as server:
        db = Database.open(server.url(), password=server.password)
        try:
            store = Store(db)
            store.sync_domains(["CORP"])
            server.restart()  # the broker's connection ends with the old server process
            with db.transaction():
                store.put_pool("after-restart", {"persistent": False})
            assert db.conn.reconnects == 1
            server.restart()  # and a read outside a transaction
            assert [p["name"] for p in store.list_pools()] == ["after-restart"]
            assert db.conn.reconnects == 2
            assert db.ready()
        finally:
            db.close()


def test_the_url_follows_the_writable_server() -> None:
    shared = f"pw-{uuid.uuid4().hex}"  # one password for both hosts, like a replicated cluster
    with running(password=shared) as first, running(password=shared) as second:
        for server in (first, second):
            server.create_database("gatehouse")
            Database.open(server.url("gatehouse"), password=server.password).close()
        first.set_read_only(True)  # a standby, to libpq
        hosts = f"{first.host},{second.host}"
        db = Database.open(second.url("gatehouse", hosts=hosts), password=second.password)
        try:
            assert db.name == f"postgresql://broker@{hosts}/gatehouse?target_session_attrs=read-write"
            store = Store(db)
            with db.transaction():
                store.put_pool("on-second", {})
            # Switchover: the second server stops taking writes, the first one takes them.
            second.set_read_only(True)
            first.set_read_only(False)
            with db.transaction():
                store.put_pool("on-first", {})
            assert first.psql("SELECT name FROM pools", "gatehouse") == "on-first"
            assert second.psql("SELECT name FROM pools", "gatehouse") == "on-second"
        finally:
            db.close()


def test_tls_to_the_database_verifies_the_server(pki: TestPKI, tmp_path: Path) -> None:
    certs = pki.issue("postgres", ["localhost", "127.0.0.1"])
    tls = tmp_path / "tls"
    tls.mkdir()
    # Readable by the image's user; the entrypoint copies the key into PGDATA with mode 0600.
    for source, name in ((certs.cert, "server.crt"), (certs.key, "server.key")):
        (tls / name).write_bytes(Path(source).read_bytes())
        (tls / name).chmod(0o644)
    tls.chmod(0o755)
    with running(tls_dir=str(tls)) as server:
        url = server.url() + f"&sslmode=verify-full&sslrootcert={pki.ca}"
        db = Database.open(url, password=server.password)
        try:
            assert db.one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0] is True
        finally:
            db.close()
        # Another CA (of the same name): the server is not trusted, no password is sent.
        other = TestPKI(tmp_path / "other")
        with pytest.raises(DatabaseError, match="SSL error"):
            Database.open(
                server.url() + f"&sslmode=verify-full&sslrootcert={other.ca}", password=server.password
            )


def test_a_wrong_password_or_no_server_is_one_clear_error(postgres: PostgresServer) -> None:
    with pytest.raises(DatabaseError, match="cannot connect to postgresql://broker@") as info:
        Database.open(postgres.url(), password="wrong-Secret-1")
    assert "wrong-Secret-1" not in str(info.value)
    with pytest.raises(DatabaseError, match="cannot connect"):
        Database.open("postgresql://broker@127.0.0.1:1/broker?connect_timeout=2", password="x")


def test_the_schema_uses_case_insensitive_text_and_8_byte_floats(postgres: PostgresServer) -> None:
    name = postgres.create_database()
    Database.open(postgres.url(name), password=postgres.password).close()
    types = postgres.psql(
        "SELECT table_name || '.' || column_name || '=' || udt_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name IN ('name', 'reported_at', 'secret', 'id') "
        "AND table_name IN ('users', 'agent_reports', 'totp', 'pools') ORDER BY 1",
        name,
    ).splitlines()
    assert types == [
        "agent_reports.reported_at=float8",
        "pools.id=int4",
        "pools.name=citext",
        "totp.secret=bytea",
        "users.id=int4",
        "users.name=citext",
    ]
    assert psycopg.__version__ == "3.3.9"
    assert POSTGRESQL == "postgresql"


def test_two_broker_nodes_share_objects_sessions_state_and_lockouts(
    postgres: PostgresServer, pki: TestPKI, tmp_path: Path
) -> None:
    """Two broker processes on one PostgreSQL database: what one node writes the other serves,
    and a lockout started on one node refuses the login on the other."""
    secret = tmp_path / "db.password"
    secret.write_text(postgres.password + "\n")
    secret.chmod(0o600)
    config = {
        "Database": postgres.url(postgres.create_database()),
        "DatabasePasswordFile": secret,
        "LoginDelayAfterFailures": 5,
        "LoginLockoutAfterFailures": 2,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_broker(pki, tmp_path / "a", [postgres.password, ALICE_PW, WRONG_PW], **config) as node_a,
        running_broker(pki, tmp_path / "b", [postgres.password, ALICE_PW, WRONG_PW], **config) as node_b,
    ):
        node_a.admin.put("/users/CORP/alice", {"password": ALICE_PW})
        node_a.admin.put("/users/CORP/bob", {"password": ALICE_PW})
        assert node_b.admin.call("GET", "/users/CORP/ALICE")[1]["name"] == "alice"
        assert node_b.client().login("alice", ALICE_PW) == p.AUTH_OK
        # Two wrong passwords for bob through node A lock bob from that client address...
        for _n in range(2):
            assert node_a.client().login("bob", WRONG_PW) == p.AUTH_FAILED
        assert 'gatehouse_broker_login_lockouts_total{scope="account_source"} 1.0' in node_a.metrics()
        # ...on node B too: the right password is answered like a wrong one, unchecked.
        assert node_b.client().login("bob", ALICE_PW) == p.AUTH_FAILED
        assert 'gatehouse_broker_login_throttled_total{reason="lockout"} 1.0' in node_b.metrics()
        assert node_b.client().login("alice", ALICE_PW) == p.AUTH_OK
        for node in (node_a, node_b):
            assert f"postgresql://broker@{postgres.host}/" in node.logs()
