"""The broker's SQLite store: migrations, persistence, password storage, cascades, check-mode rollback."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from gatehouse.broker import passwords
from gatehouse.broker.db import MIGRATIONS, SCHEMA_VERSION, Database, DatabaseError
from gatehouse.broker.store import Store

PASSWORD = "Correct-Horse-7731"


def _seed(store: Store) -> None:
    store.sync_domains(["CORP"])
    with store.db.transaction():
        store.put_group("CORP", "staff", {"description": "everyone"})
        store.put_user(
            "CORP", "alice", {"display_name": "Alice", "groups": ["staff"]}, passwords.hash_password(PASSWORD)
        )
        store.put_pool("pool1", {"persistent": True})
        store.put_desktop("d1", {"address": "10.0.0.1", "pool": "pool1"})
        store.put_entitlement(("group", "CORP", "staff", "pool", "pool1"))


def test_new_database_is_at_current_version(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        assert db.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert db.ready()
        assert db.one("PRAGMA journal_mode")[0] == "wal"
        assert db.one("PRAGMA foreign_keys")[0] == 1
    finally:
        db.close()
    assert stat.S_IMODE((tmp_path / "b.db").stat().st_mode) == 0o600


def test_older_schema_is_migrated_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = Database.open(path, upto=1)
    assert old.schema_version() == 1
    assert old.one("SELECT name FROM sqlite_master WHERE name = 'assignments'") is None
    # Written with version 1's columns: the Store writes the current schema only.
    with old.transaction() as conn:
        conn.execute("INSERT INTO domains (name) VALUES ('CORP')")
        conn.execute(
            "INSERT INTO users (domain_id, name, display_name, password_hash) VALUES (1, 'bob', 'Bob', ?)",
            (passwords.hash_password(PASSWORD),),
        )
    old.close()

    db = Database.open(path)
    try:
        assert db.schema_version() == SCHEMA_VERSION
        store = Store(db)
        assert store.get_user("CORP", "bob")["display_name"] == "Bob"  # type: ignore[index]
        pool_id = None
        with db.transaction():
            store.put_pool("p", {})
            store.put_desktop("d", {"address": "10.0.0.2", "pool": "p"})
            pool_id = store.pool_id("p")
            store.set_assignment(store.user_record("CORP", "bob").id, pool_id, store.desktop_record("d").id)  # type: ignore[union-attr, arg-type]
        assert store.list_assignments()[0]["desktop"] == "d"
    finally:
        db.close()


def test_migrate_is_a_no_op_when_current(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        assert db.migrate() == []
    finally:
        db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    Database.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this broker"):
        Database.open(path)


def test_postgresql_url_with_a_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    for url in (
        "postgresql://broker:Sup3rSecret@db:5432/broker",
        "postgresql://broker@db1,db2/broker?password=Sup3rSecret",
    ):
        with pytest.raises(DatabaseError, match="holds a password; give it in DatabasePasswordFile") as info:
            Database.open(url)
        assert "Sup3rSecret" not in str(info.value)
    with pytest.raises(DatabaseError, match="needs host") as info:
        Database.open("postgresql:///broker")


def test_missing_directory_and_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="does not exist"):
        Database.open(tmp_path / "nope" / "b.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="not a database"):
        Database.open(junk)


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    db = Database.open(path)
    _seed(Store(db))
    db.close()
    db = Database.open(path)
    try:
        store = Store(db)
        assert store.get_user("CORP", "ALICE")["groups"] == ["staff"]  # type: ignore[index]
        assert store.get_pool("pool1") == {
            "name": "pool1",
            "persistent": True,
            "description": "",
            "members": ["d1"],
        }
        assert store.list_entitlements({}) == [
            {
                "principal_type": "group",
                "domain": "CORP",
                "principal": "staff",
                "resource_type": "pool",
                "resource": "pool1",
            }
        ]
        record = store.user_record("CORP", "alice")
        assert record is not None and passwords.verify_password(PASSWORD, record.password_hash)
    finally:
        db.close()


def test_password_is_never_stored_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    db = Database.open(path)
    _seed(Store(db))
    stored = db.one("SELECT password_hash FROM users")[0]
    db.close()
    assert stored.startswith("scrypt$32768$8$3$")
    assert PASSWORD not in stored
    for file in tmp_path.iterdir():
        assert PASSWORD.encode() not in file.read_bytes()


def test_password_hashes_are_salted_and_verify() -> None:
    first, second = passwords.hash_password(PASSWORD), passwords.hash_password(PASSWORD)
    assert first != second
    assert passwords.verify_password(PASSWORD, first) and passwords.verify_password(PASSWORD, second)
    assert not passwords.verify_password(PASSWORD + "x", first)
    assert not passwords.verify_password(PASSWORD, None)
    assert not passwords.verify_password(PASSWORD, "md5$abc")
    assert not passwords.verify_password(PASSWORD, "scrypt$x$y$z$!!$??")


def test_stored_parameters_are_honoured() -> None:
    weak = passwords.hash_password(PASSWORD, n=2**10, r=4, p=1)
    assert weak.startswith("scrypt$1024$4$1$")
    assert passwords.verify_password(PASSWORD, weak)


def test_deletes_cascade(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        store = Store(db)
        _seed(store)
        with db.transaction():
            store.delete_group("CORP", "staff")
        assert store.list_entitlements({}) == []
        assert store.get_user("CORP", "alice")["groups"] == []  # type: ignore[index]
        with db.transaction():
            store.delete_pool("pool1")
        assert store.get_desktop("d1")["pool"] is None  # type: ignore[index]
    finally:
        db.close()


def test_rollback_transaction_leaves_nothing(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        store = Store(db)
        store.sync_domains(["CORP"])
        with db.transaction(rollback=True):
            store.put_user("CORP", "ghost", {}, None)
            assert store.get_user("CORP", "ghost") is not None
        assert store.get_user("CORP", "ghost") is None
    finally:
        db.close()


def test_agent_report_resets_placements_since_report(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        store = Store(db)
        _seed(store)
        desktop_id = store.desktop_record("d1").id  # type: ignore[union-attr]
        with db.transaction():
            store.record_placement(desktop_id)
            store.record_placement(desktop_id)
        (member,) = store.members(pool_id=store.pool_id("pool1"))
        assert (member.placed_since_report, member.placed_total, member.reported_at) == (2, 2, None)
        report = {
            "address": "10.0.0.1",
            "hostname": "",
            "agent_port": 60443,
            "session_port": 4172,
            "active_sessions": 1,
            "capacity": 5,
        }
        (found,) = store.report_desktops("10.0.0.1", "", 60443)
        assert found.id == desktop_id
        assert store.report_desktops("10.0.0.9", "", 60443) == []
        with db.transaction():
            store.record_report([desktop_id], report, 1234.0)
            store.record_report([desktop_id], report, 1235.0)  # one row per desktop, replaced
        (member,) = store.members(desktop_id=desktop_id)
        assert (member.placed_since_report, member.placed_total) == (0, 2)
        assert (member.active_sessions, member.capacity, member.reported_at) == (1, 5, 1235.0)
        assert [r["desktop"] for r in store.list_reports()] == ["d1"]
        # The report goes with its desktop.
        with db.transaction():
            store.delete_desktop("d1")
        assert store.list_reports() == []
    finally:
        db.close()


def test_password_hash_is_replaced_only_if_unchanged(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "b.db")
    try:
        store = Store(db)
        _seed(store)
        record = store.user_record("CORP", "alice")
        assert record is not None and record.password_hash
        with db.transaction():
            assert not store.replace_password_hash(record.id, "scrypt$other", "scrypt$new")
            assert store.replace_password_hash(record.id, record.password_hash, "scrypt$new")
        assert store.user_record("CORP", "alice").password_hash == "scrypt$new"  # type: ignore[union-attr]
    finally:
        db.close()


def test_the_postgresql_translation_covers_every_migration() -> None:
    from gatehouse.broker import pg

    sqlite_only = (
        "AUTOINCREMENT",
        "WITHOUT ROWID",
        "PRAGMA",
        "GLOB",
        "IFNULL",
        "strftime",
        "datetime(",
        "rowid",
    )
    for step in MIGRATIONS:
        for statement in step:
            translated = pg.translate(statement)
            assert "COLLATE NOCASE" not in translated and "?" not in translated
            assert not any(word.lower() in statement.lower() for word in sqlite_only), statement
            if statement.lstrip().startswith("CREATE TABLE"):
                assert " REAL" not in translated and "BLOB" not in translated
    assert pg.translate(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE)"
    ) == (
        "CREATE TABLE t (id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name CITEXT NOT NULL UNIQUE)"
    )
    assert pg.translate("INSERT OR IGNORE INTO domains (name) VALUES (?)") == (
        "INSERT INTO domains (name) VALUES (%s) ON CONFLICT DO NOTHING"
    )
    assert pg.translate("SELECT name FROM pools WHERE name = ? ORDER BY name COLLATE NOCASE") == (
        "SELECT name FROM pools WHERE name = %s ORDER BY name"
    )


def test_postgresql_url_defaults_and_what_is_shown() -> None:
    from gatehouse.broker import pg

    params, shown = pg.parse_url(
        "postgresql://broker@db1:5433,db2/gh?sslmode=verify-full&sslrootcert=/certs/ca.pem"
    )
    assert shown == "postgresql://broker@db1:5433,db2:5432/gh?target_session_attrs=read-write"
    assert params["target_session_attrs"] == "read-write" and params["connect_timeout"] == "5"
    assert params["sslmode"] == "verify-full" and "password" not in params
    _params, shown = pg.parse_url("postgresql://broker@db1:5432,db2:5432/gh?target_session_attrs=primary")
    assert shown.endswith("?target_session_attrs=primary")
    _params, shown = pg.parse_url("postgresql://broker@db1,db2:6000/gh")
    assert shown == "postgresql://broker@db1:5432,db2:6000/gh?target_session_attrs=read-write"
