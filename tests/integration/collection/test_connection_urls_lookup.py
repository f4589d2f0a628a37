"""gatehouse.access.connection_urls through ansible: its EXAMPLES as a playbook, inventory
variables, lookup's comma-joined form and a clear error."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collection_helpers
from collection_helpers import REPO_ROOT, run_adhoc


def example_tasks(root: Path) -> list[dict]:
    tree = ast.parse((REPO_ROOT / "plugins/lookup/connection_urls.py").read_text())
    text = next(
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "EXAMPLES"
    )
    return json.loads(json.dumps(yaml.safe_load(text)).replace("/var/tmp", str(root / "var" / "tmp")))


def test_examples_run_and_give_the_seeds_lists(tmp_path: Path) -> None:
    (tmp_path / "var" / "tmp").mkdir(parents=True)
    playbook = tmp_path / "examples.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "examples",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": example_tasks(tmp_path),
                }
            ]
        )
    )
    run = collection_helpers.run_playbook(str(playbook))
    assert run.returncode == 0, run.stdout + run.stderr
    tasks = run.report["plays"][0]["tasks"]
    messages = [r["msg"] for r in tasks[0]["hosts"]["localhost"]["results"]]
    assert messages[0] == (
        "lan-site1: ['https://cm1.site1.example.com', 'https://cm2.site1.example.com', 'https://vip.site2.example.com']"
    )
    assert messages[2] == "wan: ['https://vip.site1.example.com', 'https://vip.site2.example.com']"
    facts = tasks[1]["hosts"]["localhost"]["ansible_facts"]
    assert facts["wan_client_args"] == "--url https://203.0.113.10,https://198.51.100.10:8443"
    written = (tmp_path / "var" / "tmp" / "gatehouse-connections-wan.txt").read_text()
    assert written == "https://203.0.113.10\nhttps://198.51.100.10\n"


def test_a_missing_site_fails_with_its_name() -> None:
    expression = (
        "{{ query('gatehouse.access.connection_urls', 'wan', sites={}, populations={'wan': ['site1']}) }}"
    )
    run = run_adhoc("ansible.builtin.debug", {"msg": expression})
    assert run.failed
    assert "connection_urls: population wan: 'site1' names no site" in run.result["msg"]
