"""The backup files of broker_backup (module_utils._deploy.broker_backup): listing order, completeness, verification."""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
backup = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker_backup"
)
result = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.result")


def make(directory: Path, name: str, data: bytes = b"SQLite format 3\x00rest", complete: bool = True) -> Path:
    db = directory / name
    db.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    metadata = {"format": 1, "engine": "sqlite", "sha256": digest, "schema_version": 1}
    (directory / (db.stem + ".json")).write_text(json.dumps(metadata))
    if complete:
        (directory / (name + ".sha256")).write_text(f"{digest}  {name}\n")
    return db


def test_backups_are_listed_in_time_order_and_incomplete_ones_are_not(tmp_path: Path) -> None:
    names = [
        "broker-20260102T000000Z.db",
        "broker-20260101T235959Z-1.db",  # the second backup of that second
        "broker-20260101T235959Z.db",
        "broker-20260101T235959Z-10.db",
        "broker-20260101T235959Z-2.db",
    ]
    for name in names:
        make(tmp_path, name)
    make(tmp_path, "broker-20260103T000000Z.db", complete=False)  # cut short before its checksum
    (tmp_path / "notes.db").write_bytes(b"x")
    listed = [Path(p).name for p in backup.list_backups(str(tmp_path))]
    assert listed == [
        "broker-20260101T235959Z.db",
        "broker-20260101T235959Z-1.db",
        "broker-20260101T235959Z-2.db",
        "broker-20260101T235959Z-10.db",
        "broker-20260102T000000Z.db",
    ]
    assert backup.list_backups(str(tmp_path / "missing")) == []


def test_a_new_name_never_takes_an_existing_backups_place(tmp_path: Path) -> None:
    now = datetime.datetime(2026, 1, 1, 23, 59, 59, tzinfo=datetime.UTC)
    first = backup.new_backup_path(str(tmp_path), now)
    assert Path(first).name == "broker-20260101T235959Z.db"
    make(tmp_path, Path(first).name, complete=False)
    assert Path(backup.new_backup_path(str(tmp_path), now)).name == "broker-20260101T235959Z-1.db"


def test_verification_refuses_a_changed_file_and_a_missing_checksum(tmp_path: Path) -> None:
    db = make(tmp_path, "broker-20260101T000000Z.db")
    metadata, digest, key = backup.verify_backup(str(db))
    assert digest == metadata["sha256"] and key is None  # format 1: the database only
    db.write_bytes(db.read_bytes() + b"!")
    with pytest.raises(result.Failure, match="does not match its checksum"):
        backup.verify_backup(str(db))
    other = make(tmp_path, "broker-20260101T000001Z.db", complete=False)
    with pytest.raises(result.Failure, match="has no checksum file"):
        backup.verify_backup(str(other))
    # A checksum file of another backup does not vouch for this one.
    third = make(tmp_path, "broker-20260101T000002Z.db")
    (tmp_path / (third.name + ".sha256")).write_text(
        f"{hashlib.sha256(third.read_bytes()).hexdigest()}  x.db\n"
    )
    with pytest.raises(result.Failure, match="is not a checksum file"):
        backup.verify_backup(str(third))


def with_key(directory: Path, name: str, key: bytes) -> Path:
    """A format-2 backup ``name`` that holds ``key`` as its TOTP key."""
    db = make(directory, name)
    key_file = directory / (db.stem + ".totp.key")
    key_file.write_bytes(key)
    digest, key_digest = hashlib.sha256(db.read_bytes()).hexdigest(), hashlib.sha256(key).hexdigest()
    metadata = json.loads((directory / (db.stem + ".json")).read_text())
    metadata.update(format=2, totp_key={"file": key_file.name, "sha256": key_digest})
    (directory / (db.stem + ".json")).write_text(json.dumps(metadata))
    (directory / (name + ".sha256")).write_text(f"{digest}  {name}\n{key_digest}  {key_file.name}\n")
    return db


def test_the_totp_key_is_verified_with_the_database_and_never_named_in_a_refusal(tmp_path: Path) -> None:
    key = base64.b64encode(bytes(range(32))) + b"\n"
    db = with_key(tmp_path, "broker-20260101T000000Z.db", key)
    assert backup.read_checksums(str(db))["totp_key"] == hashlib.sha256(key).hexdigest()
    assert backup.verify_backup(str(db))[2] == key
    refusals = []
    # Another key in the file (a valid one): its checksum no longer matches.
    other = base64.b64encode(bytes(range(1, 33))) + b"\n"
    (tmp_path / (db.stem + ".totp.key")).write_bytes(other)
    with pytest.raises(result.Failure, match="does not match its checksum") as raised:
        backup.verify_backup(str(db))
    refusals.append(raised.value.result)
    (tmp_path / (db.stem + ".totp.key")).unlink()
    with pytest.raises(result.Failure, match="lacks its TOTP key"):
        backup.verify_backup(str(db))
    # A checksum file that lists a key the metadata does not describe.
    second = with_key(tmp_path, "broker-20260101T000001Z.db", key)
    meta = tmp_path / (second.stem + ".json")
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), totp_key=None)))
    with pytest.raises(result.Failure, match="do not agree on its TOTP key"):
        backup.verify_backup(str(second))
    # A file that matches its checksums but is no key of the broker's form.
    third = with_key(tmp_path, "broker-20260101T000002Z.db", key[:-10] + b"\n")
    with pytest.raises(result.Failure, match="is not the base64 of 32 bytes") as raised:
        backup.verify_backup(str(third))
    refusals.append(raised.value.result)
    for refused in refusals:
        assert key.strip().decode() not in json.dumps(refused)
        assert other.strip().decode() not in json.dumps(refused)


def test_options_are_checked_before_docker_is_asked() -> None:
    params = {"state": "present", "keep": 0, "restore_from": "/x.db", "stop_timeout": 30, "wait_timeout": 0}
    with pytest.raises(result.Failure) as raised:
        backup.validate(params)
    errors = raised.value.result["errors"]
    assert any("keep must be 1" in e for e in errors)
    assert any("restore_from is only used" in e for e in errors)
    assert any("wait_timeout" in e for e in errors)
