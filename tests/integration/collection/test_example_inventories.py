"""Every example inventory under inventories/ is valid input for the roles and playbooks it feeds.

No test deploys the wan, lan, ha, mixed, dmz or multisite inventories (their addresses are
documentation ranges), so a typo in one would reach a user first. Each inventory is read by ``ansible-inventory`` as
Ansible reads it (group_vars merged per host); then every role-prefixed variable must be an option
of that role and pass the role's own argument spec (types, choices, element types), exactly as
``meta/argument_specs.yml`` checks it when the role starts, and every ``gatehouse_*`` variable must
be one that a playbook or role reads.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from collection_helpers import ansible_env

REPO = Path(__file__).resolve().parents[3]
INVENTORIES = sorted(p.name for p in (REPO / "inventories").iterdir() if (p / "hosts.yml").is_file())
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "meta" / "argument_specs.yml").is_file())
TEMPLATE = re.compile(r"{{|{%")


def _listing(inventory: str) -> dict[str, Any]:
    """``ansible-inventory --list`` of an example inventory (groups, and host variables in ``_meta``)."""
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-inventory"),
            "-i",
            str(REPO / "inventories" / inventory),
            "--list",
        ],
        capture_output=True,
        text=True,
        env=ansible_env(),
        check=True,
        timeout=120,
    )
    assert "WARNING" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def _hostvars(inventory: str) -> dict[str, dict[str, Any]]:
    return _listing(inventory)["_meta"]["hostvars"]


@pytest.fixture(scope="module", params=INVENTORIES)
def inventory(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    """(name, host variables) of one example inventory, read once for every test of this module."""
    return request.param, _hostvars(request.param)


def _role_options(role: str) -> dict[str, Any]:
    specs = yaml.safe_load(
        (REPO / "roles" / role / "meta" / "argument_specs.yml").read_text(encoding="utf-8")
    )
    options: dict[str, Any] = {}
    for entry in specs["argument_specs"].values():
        options.update(entry.get("options", {}))
    return options


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return bool(TEMPLATE.search(value))
    if isinstance(value, dict):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_template(v) for v in value)
    return False


def _read_names(inventory: str) -> str:
    """Text of everything that reads inventory variables: playbooks, roles, the inventory's own templates."""
    parts = []
    for folder in ("playbooks", "roles"):
        parts.extend(
            p.read_text(encoding="utf-8") for p in (REPO / folder).rglob("*") if p.suffix in (".yml", ".j2")
        )
    for path in (REPO / "inventories" / inventory).rglob("*.yml"):
        parts.extend(re.findall(r"{{.*?}}", path.read_text(encoding="utf-8")))
    return "\n".join(parts)


def test_every_example_inventory_is_found() -> None:
    expected = {
        "demo",
        "wan",
        "lan",
        "ha",
        "broker-ha",
        "mixed",
        "dmz",
        "multisite",
        "tenants",
        "identity-ad",
        "identity-openldap",
    }
    assert expected <= set(INVENTORIES)


def test_role_variables_pass_the_role_argument_specs(
    inventory: tuple[str, dict[str, dict[str, Any]]],
) -> None:
    inventory, hostvars = inventory
    assert hostvars, inventory
    options = {role: _role_options(role) for role in ROLES}
    checked = 0
    for host, variables in hostvars.items():
        for role in ROLES:
            given = {k: v for k, v in variables.items() if k.startswith(role + "_")}
            unknown = sorted(set(given) - set(options[role]))
            assert not unknown, f"{inventory}/{host}: not options of role {role}: {unknown}"
            concrete = {k: v for k, v in given.items() if not _has_template(v)}
            if not concrete:
                continue
            spec = {k: options[role][k] for k in concrete}
            for option in spec.values():  # only what the inventory sets: no required/default effects
                option.pop("required", None)
            result = ArgumentSpecValidator(spec).validate(concrete)
            assert not result.error_messages, f"{inventory}/{host} role {role}: {result.error_messages}"
            checked += len(concrete)
    assert checked, f"{inventory}: no role variable to check"


def test_gatehouse_variables_are_read_by_a_playbook_or_role(
    inventory: tuple[str, dict[str, dict[str, Any]]],
) -> None:
    inventory, hostvars = inventory
    text = _read_names(inventory)
    names = {k for variables in hostvars.values() for k in variables if k.startswith("gatehouse_")}
    unread = sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b", text))
    assert not unread, f"{inventory}: set but never read: {unread}"


def test_the_check_finds_a_typo(tmp_path: Path) -> None:
    """A misspelt option or a wrong type is reported (the check above cannot pass vacuously)."""
    options = _role_options("cmsg")
    assert "cmsg_external_pcoip_ip" in options
    spec = {"cmsg_enable_security_gateway": dict(options["cmsg_enable_security_gateway"])}
    spec["cmsg_enable_security_gateway"].pop("required", None)
    result = ArgumentSpecValidator(spec).validate({"cmsg_enable_security_gateway": "maybe"})
    assert result.error_messages


def test_the_dmz_inventory_passes_the_dmz_settings_filter() -> None:
    """inventories/dmz as site.yml reads it (the dmz_settings filter): each inner SG behind a pair of
    forwarders with a VIP of their own, the CM handing out that VIP."""
    importlib.import_module("collection_helpers").ensure_importable()
    flt = importlib.import_module("ansible_collections.gatehouse.access.plugins.filter.dmz_settings")
    listing = _listing("dmz")
    hostvars = listing["_meta"]["hostvars"]
    groups = {name: entry.get("hosts", []) for name, entry in listing.items() if name != "_meta"}
    settings = {host: flt.dmz_settings(groups, hostvars, host) for host in hostvars}
    assert settings["cmsg1"]["external_pcoip_ip"] == ["203.0.113.20"]
    assert settings["cmsg2"]["external_pcoip_ip"] == ["203.0.113.30"]
    assert settings["dmz-sg1"]["forwarder_vip_pairs"] == {
        "gatehouse_forwarder_vip_203_0_113_20": ["dmz-sg1", "dmz-sg2"],
        "gatehouse_forwarder_vip_203_0_113_30": ["dmz-sg3", "dmz-sg4"],
    }
    for host, vip in (("dmz-sg1", "203.0.113.20"), ("dmz-sg4", "203.0.113.30")):
        assert settings[host]["listen_address"] == [vip]
