"""The broker module's PostgreSQL options (database_url, database_password, database_ca_cert) without Docker.

Parameters go through Ansible's argument spec validation, then the module's validate() and
rendering; broker.properties is read back with the services' parser and its Database checked
with the broker's own check (gatehouse.broker.db.check_url). Without database_url the rendered
file is exactly the SQLite broker's. The password is never in an error, the properties or a diff.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from gatehouse.broker.db import POSTGRESQL, check_url, engine_of
from gatehouse.config import parse_kv

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
broker = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
files = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.files")
tls = importlib.import_module("tls_material")

PASSWORD = "db-Pa55word-41c7e9"
URL = "postgresql://broker@db1.example.com:5432,10.0.0.12/broker?target_session_attrs=read-write"

# The SQLite broker's broker.properties as the module wrote it before the PostgreSQL options.
SQLITE_PROPERTIES = b"""# Connection broker configuration; AdminToken comes from broker.env
# Written by the gatehouse.access collection; changes here are overwritten.

ListenAddress=0.0.0.0
ListenPort=8443
SslCert=/certs/cert.pem
SslKey=/certs/key.pem
ClientCaCert=
ClientTlsVerify=false
Database=/data/broker.db
Domains=CORP,LAB
LogLevel=info
"""


spec_check = importlib.import_module("collection_helpers").broker_spec_check
params = importlib.import_module("collection_helpers").broker_params


def errors_of(p: dict, *secrets: str) -> list[str]:
    with pytest.raises(dep.ValidationError) as info:
        broker.validate(p)
    for error in info.value.errors:
        for secret in (PASSWORD, *secrets):
            assert secret not in error
    return info.value.errors


def properties(p: dict) -> dict[str, str]:
    return parse_kv(broker.broker_properties(p).decode("utf-8"))


def planned(p: dict, data_dir: Path) -> tuple[list, list[str]]:
    errors: list[str] = []
    found = broker.database_files(p, str(data_dir / "certs"), str(data_dir / "secrets"), None, None, errors)
    return found, errors


def test_password_is_no_log_in_the_spec() -> None:
    assert broker.ARGUMENT_SPEC["database_password"]["no_log"] is True
    assert PASSWORD in spec_check(database_url=URL, database_password=PASSWORD)._no_log_values


def test_sqlite_default_is_byte_identical_to_earlier_versions() -> None:
    """No container recreate on upgrade: the file, the mounts and the config are the SQLite broker's."""
    p = params()
    broker.validate(p)
    assert broker.broker_properties(p) == SQLITE_PROPERTIES
    assert broker.uses_secrets(p) is False
    mounts = broker.container_spec(p, "gatehouse/broker:0.1.0", "b1")["mounts"]
    assert [m["target"] for m in mounts] == ["/data", "/certs"]
    assert broker.database_files(p, "/nonexistent/certs", "/nonexistent/secrets", None, None, []) == []


def test_postgresql_renders_url_and_password_file(tmp_path: Path) -> None:
    p = params(database_url=URL, database_password=PASSWORD)
    assert not any("database" in w for w in broker.validate(p))
    props = properties(p)
    assert props["Database"] == URL
    assert props["DatabasePasswordFile"] == "/secrets/database.password"
    assert engine_of(props["Database"]) == POSTGRESQL
    assert check_url(props["Database"]).startswith("postgresql://broker@db1.example.com:5432,10.0.0.12:5432/")
    assert PASSWORD.encode() not in broker.broker_properties(p)
    mounts = {m["target"]: m for m in broker.container_spec(p, "gatehouse/broker:0.1.0", "b1")["mounts"]}
    assert mounts["/secrets"]["read_only"] is True
    assert mounts["/secrets"]["source"] == os.path.join(p["data_dir"], "secrets")

    data_dir = tmp_path / "broker"
    found, errors = planned(p, data_dir)
    assert errors == []
    (secret,) = found
    assert secret.path == str(data_dir / "secrets" / "database.password")
    assert secret.data == (PASSWORD + "\n").encode() and secret.mode == 0o600 and secret.secret
    diff = json.dumps(secret.diff())
    assert PASSWORD not in diff and files.sha256(secret.data) not in diff
    os.makedirs(os.path.dirname(secret.path))
    secret.apply()
    assert stat.S_IMODE(os.stat(secret.path).st_mode) == 0o600
    assert not planned(p, data_dir)[0][0].changed
    changed = planned(params(database_url=URL, database_password=PASSWORD + "-new"), data_dir)[0][0]
    assert changed.changed and changed.diff()["after"] == files.SECRET_CHANGED_TEXT
    assert PASSWORD in broker.secret_values(p)


def test_without_password_no_password_file() -> None:
    p = params(database_url=URL)
    broker.validate(p)
    assert "DatabasePasswordFile" not in properties(p)
    assert broker.uses_secrets(p) is False


def test_ca_cert_is_copied_and_named_by_the_url(tmp_path: Path) -> None:
    ca = tls.write(tmp_path / "db-ca.pem", tls.pem(tls.Chain().root))
    p = params(database_url=URL, database_password=PASSWORD, database_ca_cert=str(ca))
    broker.validate(p)
    database = properties(p)["Database"]
    assert database == URL + "&sslmode=verify-full&sslrootcert=/certs/database-ca.pem"
    check_url(database)
    bare = params(database_url="postgresql://broker@db1/broker", database_ca_cert=str(ca))
    assert broker.database_value(bare) == (
        "postgresql://broker@db1/broker?sslmode=verify-full&sslrootcert=/certs/database-ca.pem"
    )
    verify_ca = params(
        database_url="postgresql://broker@db1/broker?sslmode=verify-ca", database_ca_cert=str(ca)
    )
    broker.validate(verify_ca)
    assert broker.database_value(verify_ca).endswith("?sslmode=verify-ca&sslrootcert=/certs/database-ca.pem")
    found, errors = planned(p, tmp_path / "broker")
    assert errors == []
    by_name = {os.path.basename(f.path): f for f in found}
    assert by_name["database-ca.pem"].data == ca.read_bytes() and by_name["database-ca.pem"].mode == 0o644
    _found, errors = planned(params(database_url=URL, database_ca_cert=str(tmp_path / "no.pem")), tmp_path)
    assert any("database_ca_cert" in e and "does not exist" in e for e in errors)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://broker@db1/broker", "must be a libpq URL postgresql://"),
        ("db1:5432/broker", "must be a libpq URL postgresql://"),
        ("postgresql:///broker", "names no host"),
        ("postgresql://broker@/broker", "names no host"),
        ("postgresql://broker@db1:5432", "names no database"),
        ("postgresql://broker@db1:5432/", "names no database"),
        ("postgresql://broker@db1:70000/broker", "has an invalid port"),
        ("postgresql://broker@db1:/broker", "has an invalid port"),
        ("postgresql://broker@db_1/broker", "is not a host name or address"),
        ("postgresql://broker@db1,,db2/broker", "is not a host name or address"),
        ("postgresql://broker@[db1]/broker", "is not [IPv6 address]"),
        ("postgresql://broker:" + PASSWORD + "@db1/broker", "holds a password"),
        ("postgresql://broker@db1/broker?password=" + PASSWORD, "holds a password parameter"),
        ("postgresql://broker@db1/broker?host=db2", "gives host as a parameter"),
        ("postgresql://broker@db1/broker#x", "must not have a fragment"),
        ("postgresql://broker@db1/broker?sslmode=require&sslmode=disable", "parameter sslmode twice"),
        (" postgresql://broker@db1/broker", "must not contain spaces"),
        ("postgresql://broker@db1/broker\nListenPort=1", "must not contain spaces"),
    ],
)
def test_bad_url_is_refused(url: str, needle: str) -> None:
    errors = errors_of(params(database_url=url, database_password=PASSWORD))
    assert any(e.startswith("database_url ") and needle in e for e in errors), errors


def test_good_url_forms_pass_the_broker_check() -> None:
    for url in (
        "postgres://db1/broker",
        "postgresql://broker@db1.example.com/broker",
        "postgresql://broker@[2001:db8::5]:5433,db2:5432/broker?connect_timeout=3&application_name=b1",
        "postgresql://broker@10.0.0.11,10.0.0.12/broker?target_session_attrs=read-write&sslmode=require",
    ):
        p = params(database_url=url)
        broker.validate(p)
        check_url(properties(p)["Database"])


def test_password_in_the_url_is_masked() -> None:
    assert broker.url_passwords("postgresql://broker:s%40cret@db1/broker") == ["s%40cret", "s@cret"]
    assert broker.url_passwords("postgresql://broker@db1/broker?sslmode=require&password=x1") == ["x1"]
    assert broker.url_passwords(URL) == [] and broker.url_passwords(None) == []
    p = params(database_url="postgresql://broker:s%40cret@db1/broker")
    assert {"s%40cret", "s@cret"} <= set(broker.secret_values(p))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"database_password": PASSWORD}, "database_password is only used with database_url"),
        ({"database_ca_cert": "/etc/ca.pem"}, "database_ca_cert is only used with database_url"),
        (
            {"database_url": URL + "&sslmode=require", "database_ca_cert": "/etc/ca.pem"},
            "sslmode=require, which does not verify",
        ),
        (
            {"database_url": URL + "&sslrootcert=/x.pem", "database_ca_cert": "/etc/ca.pem"},
            "database_url sets sslrootcert",
        ),
        ({"database_url": URL, "database_password": "two\nlines"}, "database_password must not contain"),
    ],
)
def test_inconsistent_database_options_are_refused(options: dict, needle: str) -> None:
    errors = errors_of(params(**options))
    assert any(needle in e for e in errors), errors


def test_stale_database_files_are_removed(tmp_path: Path) -> None:
    certs, secrets = tmp_path / "certs", tmp_path / "secrets"
    certs.mkdir()
    secrets.mkdir()
    for path in (certs / "database-ca.pem", secrets / "database.password"):
        path.write_text("x")
    stale = broker.stale_identity_files(str(certs), str(secrets), [], False)
    assert stale == [str(certs / "database-ca.pem"), str(secrets / "database.password")]
    keep = files.PlannedFile(str(secrets / "database.password"), b"x", 0o600)
    assert broker.stale_identity_files(str(certs), str(secrets), [keep], False) == [
        str(certs / "database-ca.pem")
    ]
