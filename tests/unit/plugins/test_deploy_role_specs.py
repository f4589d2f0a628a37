"""meta/argument_specs.yml of the deployment roles documents exactly defaults/main.yml (names and defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[3] / "roles"


@pytest.mark.parametrize(
    "role", ["docker", "firewall", "cmsg", "broker", "agent", "pki", "monitoring", "database"]
)
def test_argument_specs_match_defaults(role: str) -> None:
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(options) == set(defaults)
    for name, spec in options.items():
        assert name.startswith(role + "_"), name
        assert spec.get("default") == defaults[name], name
        assert spec.get("description"), name


@pytest.mark.parametrize("role", ["pki"])
def test_other_entry_points_document_defaults(role: str) -> None:
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert set(specs) == {"main", "ca"}
    for name, spec in specs["ca"]["options"].items():
        assert spec.get("default") == defaults[name], name


def test_no_agent_token_left() -> None:
    """Agents authenticate with certificates: no token variable survives in roles, playbooks, inventories."""
    root = ROLES.parent
    for folder in ("roles", "playbooks", "inventories"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in (".yml", ".j2"):
                text = path.read_text()
                for needle in ("agent_token", "AGENTTOKEN", "AgentToken"):
                    assert needle not in text, f"{path}: {needle}"
