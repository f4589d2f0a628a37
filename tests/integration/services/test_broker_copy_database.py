"""``python -m gatehouse.broker.migrate``: the broker's database from SQLite to PostgreSQL and back.

Against the session's real PostgreSQL server (gatehouse/postgres, the ``postgres`` fixture), a
new database per test. The source is filled through the store and with values that the two
engines hold differently (names in mixed case on NOCASE/citext columns, fractional REAL
times, a BLOB with zero bytes, NULLs, non-ASCII text); every table of the schema holds rows. The
copy keeps ids and counts and content, PostgreSQL's identity sequences continue after the copied
ids, a second run writes nothing, a target with other rows or another schema version is refused
with nothing written, ``--check`` writes nothing, and the password never reaches the output.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from postgres_server import PostgresServer

from gatehouse.broker import migrate, passwords
from gatehouse.broker.db import SCHEMA_VERSION, Database
from gatehouse.broker.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.images]

PASSWORD = "Correct-Horse-7731"


def seed(path: Path) -> None:
    """An SQLite broker database with rows in every table."""
    db = Database.open(str(path))
    store = Store(db)
    try:
        store.sync_domains(["CORP", "Lab"])
        with db.transaction() as conn:
            store.put_group("CORP", "Staff", {"description": "Équipe: everyone"})
            store.put_user(
                "CORP",
                "Alice",
                {"display_name": "Alice Ä.", "groups": ["staff"]},
                passwords.hash_password(PASSWORD),
            )
            store.put_user("Lab", "bob", {"display_name": "", "groups": []}, None)
            store.put_pool("Pool1", {"persistent": True, "members": [], "description": "persistent"})
            store.put_desktop("D1", {"address": "Desk1.corp.example", "pool": "pool1"})
            store.put_desktop("d2", {"address": "10.0.0.2", "site": "east"})
            store.put_entitlement(("group", "CORP", "staff", "pool", "pool1"))
            store.put_entitlement(("user", "Lab", "bob", "desktop", "d2"))
            store.put_entitlement(("directory-group", "CORP", "CN=Lab,DC=corp", "desktop", "D1"))
            alice = conn.execute("SELECT id FROM users WHERE name = 'Alice'").fetchone()[0]
            d1 = conn.execute("SELECT id FROM desktops WHERE name = 'D1'").fetchone()[0]
            pool = conn.execute("SELECT id FROM pools").fetchone()[0]
            conn.execute(
                "INSERT INTO totp (user_id, secret, last_step, enrolled_at) VALUES (?, ?, ?, ?)",
                (alice, b"\x00\x01secret\xff\x00", 58_000_123, 1_764_200_000.123456),
            )
            conn.execute(
                "INSERT INTO assignments (user_id, pool_id, desktop_id, assigned_at) VALUES (?, ?, ?, ?)",
                (alice, pool, d1, 1_764_200_001.5),
            )
            conn.execute(
                "INSERT INTO agent_reports (desktop_id, address, agent_port, hostname, session_port, "
                "active_sessions, capacity, reported_at) VALUES (?, 'Desk1.CORP.example', 60443, 'desk1', 4172, 1, 2, ?)",
                (d1, 1_764_200_002.25),
            )
            conn.execute(
                "INSERT INTO desktop_load (desktop_id, placed_since_report, placed_total) VALUES (?, 1, 7)",
                (d1,),
            )
            conn.execute(
                "INSERT INTO login_failures (scope, account, source, failures, first_at, blocked_until) "
                "VALUES ('account_source', 'corp\\alice', '192.0.2.7', 3, 1764200003.75, 0)"
            )
            conn.execute(
                "INSERT INTO login_known_sources (account, source, seen_at) VALUES ('corp\\alice', '192.0.2.8', 1.0e9)"
            )
            # A gap in the ids: the copy keeps them as they are.
            conn.execute("DELETE FROM users WHERE name = 'bob'")
            store.put_user("Lab", "Carol", {"display_name": "Carol", "groups": []}, None)
    finally:
        db.close()


def password_file(tmp_path: Path, server: PostgresServer) -> Path:
    path = tmp_path / "pg.password"
    path.write_text(server.password + "\n")
    path.chmod(0o600)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = migrate.main([*args, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out)


def counts(database: str, password: str = "") -> dict[str, int]:
    reader = migrate.Reader(database, password)
    try:
        return {t.name: len(reader.rows(t)) for t in migrate.schema(reader.version())}
    finally:
        reader.close()


def test_schema_lists_every_table_parents_first() -> None:
    tables = migrate.schema(SCHEMA_VERSION)
    names = [t.name for t in tables]
    assert "schema_version" not in names and len(names) == len(set(names))
    assert names.index("domains") < names.index("users") < names.index("group_members")
    assert names.index("pools") < names.index("desktops") < names.index("entitlements")
    assert names.index("users") < names.index("totp") and names.index("desktops") < names.index(
        "agent_reports"
    )
    kinds = dict(next(t for t in tables if t.name == "totp").columns)
    assert kinds == {"user_id": "integer", "secret": "blob", "last_step": "integer", "enrolled_at": "real"}
    assert [t.name for t in tables if t.identity] == sorted(
        ["directory_entitlements", "domains", "entitlements", "groups", "desktops", "pools", "users"],
        key=names.index,
    )


def test_sqlite_to_postgresql_and_back(
    postgres: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "broker.db"
    seed(source)
    url = postgres.url(postgres.create_database())
    secret = password_file(tmp_path, postgres)
    expected = counts(str(source))
    assert all(expected.values()), expected  # every table holds rows

    # --check: reports the rows, writes nothing (not even the schema).
    code, report = run(
        capsys, "--source", str(source), "--target", url, "--target-password-file", str(secret), "--check"
    )
    assert code == 0 and report["status"] == "would-copy" and report["changed"], report
    assert {n: t["source"] for n, t in report["tables"].items()} == expected
    assert (
        postgres.psql("SELECT to_regclass('users') IS NULL", dbname=url.split("/")[-1].split("?")[0]) == "t"
    )

    code, report = run(
        capsys, "--source", str(source), "--target", url, "--target-password-file", str(secret)
    )
    assert code == 0 and report["status"] == "copied" and report["changed"], report
    assert report["schema_version"] == SCHEMA_VERSION
    assert all(t["same"] and t["source"] == t["target"] for t in report["tables"].values()), report
    assert postgres.password not in json.dumps(report)
    assert counts(url, postgres.password) == expected

    # The ids are kept, the identities continue after them, the broker's store reads the copy.
    db = Database.open(url, password=postgres.password)
    try:
        store = Store(db)
        original = Database.open(str(source))
        try:
            ids = "SELECT id, name FROM users ORDER BY id"
            assert [tuple(r) for r in db.query(ids)] == [tuple(r) for r in original.query(ids)]
        finally:
            original.close()
        record = store.user_record("corp", "ALICE")
        assert record is not None and passwords.verify_password(PASSWORD, record.password_hash or "")
        assert store.totp(record.id) == (b"\x00\x01secret\xff\x00", 58_000_123)
        highest = db.one("SELECT MAX(id) FROM users")[0]
        with db.transaction():
            store.put_user("Lab", "dave", {"display_name": "Dave", "groups": []}, None)
        assert db.one("SELECT id FROM users WHERE name = 'dave'")[0] == highest + 1
        with db.transaction() as conn:
            conn.execute("DELETE FROM users WHERE name = 'dave'")
    finally:
        db.close()

    # A second run: the target holds the same rows, nothing is written.
    code, report = run(
        capsys, "--source", str(source), "--target", url, "--target-password-file", str(secret)
    )
    assert code == 0 and report["status"] == "same" and not report["changed"], report

    # And back, to a new SQLite file: the same rows as the original.
    back = tmp_path / "back" / "broker.db"
    back.parent.mkdir()
    code, report = run(capsys, "--source", url, "--source-password-file", str(secret), "--target", str(back))
    assert code == 0 and report["status"] == "copied", report
    assert oct(back.stat().st_mode & 0o777) == "0o600"
    one, two = migrate.Reader(str(source)), migrate.Reader(str(back))
    try:
        for table in migrate.schema(SCHEMA_VERSION):
            assert sorted(map(tuple, one.rows(table)), key=repr) == sorted(
                map(tuple, two.rows(table)), key=repr
            ), table.name
    finally:
        one.close()
        two.close()
    with sqlite3.connect(back) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_target_with_other_rows_is_refused_unless_replaced(
    postgres: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "broker.db"
    seed(source)
    url = postgres.url(postgres.create_database())
    secret = password_file(tmp_path, postgres)
    db = Database.open(url, password=postgres.password)
    try:
        Store(db).sync_domains(["OTHER"])
    finally:
        db.close()
    args = ["--source", str(source), "--target", url, "--target-password-file", str(secret)]
    code, report = run(capsys, *args)
    assert code == migrate.EXIT_REFUSED and report["status"] == "refused", report
    assert "already holds other rows" in report["message"] and not report["changed"]
    assert report["tables"]["domains"]["target"] == 1 and not report["tables"]["domains"]["same"]
    assert counts(url, postgres.password)["users"] == 0  # nothing was written

    code, report = run(capsys, *args, "--replace")
    assert code == 0 and report["status"] == "copied", report
    assert counts(url, postgres.password) == counts(str(source))


def test_other_schema_version_and_unusable_databases(
    postgres: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "broker.db"
    seed(source)
    url = postgres.url(postgres.create_database())
    secret = password_file(tmp_path, postgres)
    Database.open(url, upto=SCHEMA_VERSION - 1, password=postgres.password).close()
    code, report = run(
        capsys, "--source", str(source), "--target", url, "--target-password-file", str(secret)
    )
    assert code == migrate.EXIT_REFUSED and f"schema version {SCHEMA_VERSION - 1}" in report["message"], (
        report
    )
    assert counts(url, postgres.password)["domains"] == 0

    # A wrong password: unusable, and neither password is printed.
    wrong = tmp_path / "wrong.password"
    wrong.write_text("Wrong-Secret-Value-42\n")
    code = migrate.main(["--source", str(source), "--target", url, "--target-password-file", str(wrong)])
    out = capsys.readouterr()
    assert code == migrate.EXIT_UNUSABLE and "unusable" in out.out, out.out
    assert "Wrong-Secret-Value-42" not in out.out + out.err and postgres.password not in out.out + out.err

    # A source without the broker's schema, and a missing one.
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    code, report = run(capsys, "--source", str(empty), "--target", str(tmp_path / "t.db"))
    assert code == migrate.EXIT_UNUSABLE and "holds no broker database" in report["message"], report
    code, report = run(capsys, "--source", str(tmp_path / "missing.db"), "--target", str(tmp_path / "t.db"))
    assert code == migrate.EXIT_UNUSABLE and "does not exist" in report["message"], report
    assert not (tmp_path / "t.db").exists()
