"""broker.properties checks and the broker's opaque resource ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.xmlapi import parse_resource_id
from gatehouse.config import Config, ConfigError

ADMIN = "admin-token-0123456789"
CA = "/certs/ca.pem"


def settings(values: dict[str, str], environ: dict[str, str] | None = None) -> BrokerSettings:
    return BrokerSettings.from_config(Config(values, environ=environ or {}))


def test_defaults_and_env_override() -> None:
    s = settings({"AdminToken": ADMIN}, {"GATEHOUSE_CLIENTCACERT": CA, "GATEHOUSE_DOMAINS": "LAB, CORP"})
    assert s.listen_port == 8443 and s.database == "/data/broker.db"
    assert s.domains == ("LAB", "CORP") and s.agent_stale_after == 30.0
    assert (s.client_ca_cert, s.client_tls_verify) == (CA, True)
    assert ADMIN not in repr(s)
    assert not hasattr(s, "agent_token")


def test_login_throttle_and_hashing_defaults() -> None:
    s = settings({"AdminToken": ADMIN, "ClientCaCert": CA})
    login = s.login
    assert (login.delay_after_failures, login.max_delay, login.lockout_after_failures) == (3, 8.0, 10)
    assert (login.source_lockout_after_failures, login.account_lockout_after_failures) == (50, 100)
    assert (login.lockout_seconds, login.failure_window) == (900.0, 900.0)
    assert 1 <= s.password_hash_workers <= 4 and s.password_hash_queue == 32
    tuned = settings(
        {
            "AdminToken": ADMIN,
            "ClientCaCert": CA,
            "LoginDelayAfterFailures": "2",
            "LoginMaxDelay": "1.5",
            "LoginLockoutAfterFailures": "5",
            "LoginSourceLockoutAfterFailures": "20",
            "LoginAccountLockoutAfterFailures": "40",
            "LoginLockoutSeconds": "60",
            "LoginFailureWindow": "120",
            "PasswordHashWorkers": "2",
            "PasswordHashQueue": "0",
        }
    )
    assert (tuned.login.delay_after_failures, tuned.login.max_delay, tuned.login.lockout_after_failures) == (
        2,
        1.5,
        5,
    )
    assert (tuned.login.source_lockout_after_failures, tuned.login.account_lockout_after_failures) == (20, 40)
    assert (tuned.login.lockout_seconds, tuned.login.failure_window) == (60.0, 120.0)
    assert (tuned.password_hash_workers, tuned.password_hash_queue) == (2, 0)


def test_verification_can_be_turned_off_without_a_ca() -> None:
    s = settings({"AdminToken": ADMIN, "ClientTlsVerify": "false"})
    assert (s.client_ca_cert, s.client_tls_verify) == ("", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ClientCaCert": CA}, "AdminToken is required"),
        ({"AdminToken": "short", "ClientCaCert": CA}, "AdminToken must be at least 16"),
        ({"AdminToken": ADMIN}, "ClientCaCert is required while ClientTlsVerify is true"),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "ClientTlsVerify": "maybe"}, "ClientTlsVerify"),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "LoginAccountLockoutAfterFailures": "5"},
            "LoginAccountLockoutAfterFailures must be at least LoginLockoutAfterFailures",
        ),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "PasswordHashWorkers": "0"}, "PasswordHashWorkers"),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "LoginLockoutSeconds": "0"}, "LoginLockoutSeconds"),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "Domains": "CORP,corp"}, "Domains lists a domain twice"),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "Domains": "a/b"}, "not a valid domain"),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "Database": "postgresql://u:p@h/db"},
            "the URL holds a password; give it in DatabasePasswordFile",
        ),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "Database": "mysql://h/db"},
            "a SQLite file path or a postgresql:// URL",
        ),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "DatabasePasswordFile": "/etc/hostname"},
            "DatabasePasswordFile is only for a postgresql:// Database",
        ),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "ListenPort": "99999"},
            "ListenPort must be at most 65535",
        ),
        (
            {"AdminToken": ADMIN, "ClientCaCert": CA, "AgentStaleAfter": "0"},
            "AgentStaleAfter must be at least 1",
        ),
        ({"AdminToken": ADMIN, "ClientCaCert": CA, "LogLevel": "loud"}, "LogLevel"),
    ],
)
def test_invalid_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(values)


@pytest.mark.parametrize(
    ("resource_id", "expected"),
    [
        ("d-1", ("d", 1)),
        ("p-42", ("p", 42)),
        ("x-1", None),
        ("d-", None),
        ("d--1", None),
        ("d-1a", None),
        ("d-\u00b9", None),
        ("p-" + "9" * 19, None),
        ("", None),
    ],
)
def test_parse_resource_id(resource_id: str, expected: tuple[str, int] | None) -> None:
    assert parse_resource_id(resource_id) == expected


def test_postgresql_url_and_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "db.password"
    secret.write_text("Db-Secret-9\n")
    url = "postgresql://broker@db1:5432,db2:5432/broker?target_session_attrs=read-write"
    s = settings(
        {"AdminToken": ADMIN, "ClientCaCert": CA, "Database": url, "DatabasePasswordFile": str(secret)}
    )
    assert s.database == url and s.database_password == "Db-Secret-9"
    assert "Db-Secret-9" in s.secrets() and "Db-Secret-9" not in repr(s)
    # Without the file, libpq's own PGPASSWORD / PGPASSFILE may hold it.
    assert settings({"AdminToken": ADMIN, "ClientCaCert": CA, "Database": url}).database_password == ""
    with pytest.raises(ConfigError, match=f"DatabasePasswordFile: {tmp_path}/none does not exist"):
        settings(
            {
                "AdminToken": ADMIN,
                "ClientCaCert": CA,
                "Database": url,
                "DatabasePasswordFile": f"{tmp_path}/none",
            }
        )
