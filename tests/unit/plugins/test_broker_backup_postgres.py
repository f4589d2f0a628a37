"""The PostgreSQL side of broker_backup without Docker: file names, the content digest of a dump's
SQL, the password file line, the broker's settings and the engine chosen by its Database key."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
backup = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker_backup"
)
result = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.result")

SQL = b"""--
-- PostgreSQL database dump
--

\\restrict %s

SET client_encoding = 'UTF8';
COPY public.schema_version (version) FROM stdin;
%d
\\.

COPY public.users (id, name) FROM stdin;
1\talice
\\.

\\unrestrict %s
"""


def sql(key: bytes, version: int = 7) -> bytes:
    return SQL % (key, version, key)


def test_content_digest_ignores_the_per_dump_key_and_reads_the_schema(tmp_path: Path) -> None:
    one, two = tmp_path / "one.sql", tmp_path / "two.sql"
    one.write_bytes(sql(b"AbC123"))
    two.write_bytes(sql(b"xYz789"))
    first, version = backup.content_digest(str(one))
    assert version == 7
    assert backup.content_digest(str(two)) == (first, 7)
    two.write_bytes(sql(b"xYz789").replace(b"alice", b"bob"))
    assert backup.content_digest(str(two))[0] != first
    two.write_bytes(sql(b"k", version=9))
    assert backup.content_digest(str(two))[1] == 9
    none = tmp_path / "none.sql"
    none.write_bytes(b"SET client_encoding = 'UTF8';\n")
    assert backup.content_digest(str(none))[1] is None


def test_pgpass_line_escapes() -> None:
    assert backup.pgpass_line("pa:ss\\word") == b"*:*:*:*:pa\\:ss\\\\word\n"


def test_dump_backups_are_listed_named_and_verified(tmp_path: Path) -> None:
    names = ["broker-20260101T000000Z.db", "broker-20260102T000000Z.dump", "broker-20260103T000000Z.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"PGDMP")
        (tmp_path / (name + ".sha256")).write_text(f"{hashlib.sha256(b'PGDMP').hexdigest()}  {name}\n")
    assert [Path(p).name for p in backup.list_backups(str(tmp_path))] == names[:2]
    dump = str(tmp_path / names[1])
    assert backup.metadata_path(dump).endswith("broker-20260102T000000Z.json")
    assert backup.key_path(dump).endswith("broker-20260102T000000Z.totp.key")
    now = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    # The time of a .dump backup is taken for a .db one as well, and the other way round.
    assert backup.new_backup_path(str(tmp_path), now, ".db").endswith("broker-20260102T000000Z-1.db")
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert backup.new_backup_path(str(tmp_path), now, ".dump").endswith("broker-20260101T000000Z-1.dump")
    with pytest.raises(result.Failure, match="no readable metadata"):
        backup.verify_backup(dump)
    with pytest.raises(result.Failure, match=r"broker-<time>\.dump"):
        backup.verify_backup(str(tmp_path / names[2]))


def test_engine_follows_the_database_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    container = SimpleNamespace(
        name="gh-broker",
        attrs={
            "Mounts": [
                {"Destination": "/data", "Source": str(data)},
                {"Destination": "/secrets", "Source": "/s"},
            ]
        },
    )
    assert isinstance(backup.engine_for(None, container), backup.SqliteEngine)
    assert backup.engine_for(None, container).name == "sqlite"
    (data / "broker.properties").write_text(
        "# comment\nDatabase=postgresql://broker@db1:5432/broker?sslmode=verify-full\n"
        "DatabasePasswordFile=/secrets/database.password\n"
    )
    engine = backup.engine_for(None, container)
    assert engine.name == "postgresql" and engine.suffix == ".dump"
    assert engine.describe(str(data)) == "postgresql://broker@db1:5432/broker"
    assert backup.host_path(container, "/secrets/database.password") == "/s/database.password"
    assert backup.host_path(container, "/certs/x.pem") is None
    assert backup.broker_settings(str(data))["DatabasePasswordFile"] == "/secrets/database.password"
    with pytest.raises(result.Failure, match="uses SQLite"):
        backup.PostgresEngine(None, None, "/data/broker.db")
