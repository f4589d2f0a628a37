"""broker.properties checks and the broker's opaque resource ids."""

from __future__ import annotations

import pytest

from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.xmlapi import parse_resource_id
from gatehouse.config import Config, ConfigError

ADMIN = "admin-token-0123456789"
AGENT = "agent-token-0123456789"


def settings(values: dict[str, str], environ: dict[str, str] | None = None) -> BrokerSettings:
    return BrokerSettings.from_config(Config(values, environ=environ or {}))


def test_defaults_and_env_override() -> None:
    s = settings({"AdminToken": ADMIN}, {"GATEHOUSE_AGENTTOKEN": AGENT, "GATEHOUSE_DOMAINS": "LAB, CORP"})
    assert s.listen_port == 8443 and s.database == "/data/broker.db"
    assert s.domains == ("LAB", "CORP") and s.agent_stale_after == 30.0
    assert ADMIN not in repr(s) and AGENT not in repr(s)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"AgentToken": AGENT}, "AdminToken is required"),
        ({"AdminToken": ADMIN}, "AgentToken is required"),
        ({"AdminToken": "short", "AgentToken": AGENT}, "AdminToken must be at least 16"),
        ({"AdminToken": ADMIN, "AgentToken": ADMIN}, "must differ"),
        ({"AdminToken": ADMIN, "AgentToken": AGENT, "Domains": "CORP,corp"}, "Domains lists a domain twice"),
        ({"AdminToken": ADMIN, "AgentToken": AGENT, "Domains": "a/b"}, "not a valid domain"),
        (
            {"AdminToken": ADMIN, "AgentToken": AGENT, "Database": "postgresql://u:p@h/db"},
            "not supported in this version",
        ),
        ({"AdminToken": ADMIN, "AgentToken": AGENT, "Database": "mysql://h/db"}, "only a SQLite file path"),
        (
            {"AdminToken": ADMIN, "AgentToken": AGENT, "ListenPort": "99999"},
            "ListenPort must be at most 65535",
        ),
        (
            {"AdminToken": ADMIN, "AgentToken": AGENT, "AgentStaleAfter": "0"},
            "AgentStaleAfter must be at least 1",
        ),
        ({"AdminToken": ADMIN, "AgentToken": AGENT, "LogLevel": "loud"}, "LogLevel"),
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
