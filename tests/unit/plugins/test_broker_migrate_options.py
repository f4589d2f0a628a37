"""broker_migrate's options, checked before the Docker engine is asked anything.

validate() of the backend on the options as Ansible gives them, and one run through real Ansible:
a URL with a password fails with every problem listed and the password masked in the output.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
helpers = importlib.import_module("collection_helpers")
helpers.ensure_importable()
migrate = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker_migrate"
)
result = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.result")

PASSWORD = "db-Pa55word-5e1f0a"
URL = "postgresql://broker@db1.example.com:5432,10.0.0.12/broker?target_session_attrs=read-write"


def params(**given: object) -> dict:
    base = {
        "to": "postgresql",
        "database_url": URL,
        "database_password": PASSWORD,
        "database_ca_cert": None,
        "sqlite_file": "broker.db",
        "replace": False,
        "stop_broker": True,
        "name_prefix": "gatehouse",
        "docker_host": None,
        "stop_timeout": 30,
        "timeout": 900,
    }
    base.update(given)
    return base


def errors(**given: object) -> list[str]:
    try:
        migrate.validate(params(**given))
    except result.Failure as exc:
        return exc.result["errors"]
    return []


def test_valid_options_pass() -> None:
    assert errors() == []
    assert errors(to="sqlite", database_url=None, database_password=None) == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"database_url": None, "database_password": None}, "to=postgresql needs database_url"),
        ({"database_url": "mysql://broker@db/broker"}, "must be a libpq URL"),
        ({"database_url": URL.replace("broker@", "broker:x@")}, "holds a password"),
        ({"database_url": None, "to": "sqlite"}, "database_password is only used with database_url"),
        ({"sqlite_file": "../broker.db"}, "must be a file name in the broker's data directory"),
        ({"sqlite_file": ".."}, "must be a file name"),
        ({"database_ca_cert": "/nonexistent/ca.pem"}, "database_ca_cert /nonexistent/ca.pem is not a file"),
        ({"timeout": 0}, "timeout must be 1 or more seconds"),
    ],
)
def test_wrong_options_are_refused(given: dict, expected: str) -> None:
    found = errors(**given)
    assert any(expected in e for e in found), found
    assert not any(PASSWORD in e for e in found)


def test_a_password_in_the_url_is_masked_and_nothing_runs() -> None:
    run = helpers.run_module(
        "broker_migrate",
        {
            "database_url": URL.replace("broker@", f"broker:{PASSWORD}@"),
            "sqlite_file": "a/b",
            "name_prefix": "none",
        },
    )
    assert run.failed and not run.changed
    assert any("holds a password" in e for e in run.result["errors"]), run.result
    assert any("sqlite_file" in e for e in run.result["errors"])
    assert PASSWORD not in run.stdout and PASSWORD not in run.stderr
