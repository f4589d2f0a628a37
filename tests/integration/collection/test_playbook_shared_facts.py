"""The facts the first play of site.yml, upgrade.yml and broker-migrate.yml works out for the later plays.

The secrets (playbooks/tasks/secrets.yml): the admin token and the database cluster's passwords
come from the inventory where it gives them (a value on the cluster's first node), else from a
password generated once into gatehouse_secrets_dir on the controller (mode 0600) and read from
there on every later run. A password the inventory gives leaves no file behind: its lookup is
never run. Every host of the play gets the same values, and none of them reaches ansible's output.

The database cluster's URL (gatehouse__database_url, a loop over the hosts of the group databases)
is worked out by one task of the first play, on one host, for every host: site.yml in check mode
with the tag firewall (and no firewall managed) runs that play alone.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, PlaybookRun, no_secret, run_playbook

HOSTS = ("b1", "db1", "db2")
FACTS = ("gatehouse_admin_token", "database_superuser_password", "database_replication_password",
         "database_broker_password")  # fmt: skip


def write_inventory(tmp_path: Path, children: dict, **variables: object) -> str:
    """An inventory of local hosts (``children``: the groups) with the controller's secrets
    directory in ``tmp_path``; its path."""
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "gatehouse_secrets_dir": str(tmp_path / "secrets"),
                **variables,
            },
            "children": children,
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return str(path)


def secrets(tmp_path: Path, given: dict[str, str]) -> tuple[dict[str, dict[str, str]], PlaybookRun]:
    """The tasks on brokers b1 and databases db1, db2 with ``given`` as variables of the databases
    group (the admin token of all): each host's facts, and the run."""
    admin = (
        {"gatehouse_admin_token": given["gatehouse_admin_token"]} if "gatehouse_admin_token" in given else {}
    )
    hosts = write_inventory(
        tmp_path,
        {
            "brokers": {"hosts": {"b1": {}}},
            "databases": {
                "hosts": {"db1": {}, "db2": {}},
                "vars": {k: v for k, v in given.items() if k != "gatehouse_admin_token"},
            },
        },
        **admin,
    )
    facts = "{{ {" + ", ".join(f"'{name}': {name}" for name in FACTS) + "} | to_json }}"
    play = [
        {
            "hosts": "all",
            "gather_facts": False,
            "vars_files": [str(REPO_ROOT / "playbooks" / "vars" / "gatehouse.yml")],
            "tasks": [
                {"ansible.builtin.import_tasks": str(REPO_ROOT / "playbooks" / "tasks" / "secrets.yml")},
                {
                    "name": "Keep the facts of the host",
                    "ansible.builtin.copy": {
                        "content": facts,
                        "dest": str(tmp_path / "facts-{{ inventory_hostname }}.json"),
                        "mode": "0600",
                    },
                    "no_log": True,
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    run = run_playbook("-i", hosts, str(tmp_path / "play.yml"))
    assert run.returncode == 0, run.stdout[-4000:]
    return {h: json.loads((tmp_path / f"facts-{h}.json").read_text()) for h in HOSTS}, run


def generated(tmp_path: Path) -> dict[str, str]:
    """The files of gatehouse_secrets_dir (each of mode 0600) and their passwords."""
    found = {}
    for path in (tmp_path / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        found[path.name] = path.read_text().strip()
    return found


def test_the_inventory_wins_and_the_rest_is_generated_once(tmp_path: Path) -> None:
    given = {
        "gatehouse_admin_token": "Admin-token-from-the-vault-0123456789",
        "database_superuser_password": "Super-from-the-vault-0123456789",
        "database_replication_password": "",  # empty: generated like an absent one
    }
    facts, run = secrets(tmp_path, given)
    files = generated(tmp_path)
    # No file for what the inventory gives: its lookup never ran.
    assert sorted(files) == ["database_broker", "database_replication"]
    expected = {
        "gatehouse_admin_token": given["gatehouse_admin_token"],
        "database_superuser_password": given["database_superuser_password"],
        "database_replication_password": files["database_replication"],
        "database_broker_password": files["database_broker"],
    }
    assert all(facts[h] == expected for h in HOSTS), facts
    assert len(expected["database_broker_password"]) == 32 and expected["database_broker_password"].isalnum()
    no_secret(run, expected.values())

    # Without the inventory's values: the files made before are read again, the others made now.
    facts, run = secrets(tmp_path, {})
    again = generated(tmp_path)
    assert sorted(again) == ["admin_token", "database_broker", "database_replication", "database_superuser"]
    assert {k: again[k] for k in files} == files
    assert all(
        facts[h]
        == {
            "gatehouse_admin_token": again["admin_token"],
            "database_superuser_password": again["database_superuser"],
            "database_replication_password": files["database_replication"],
            "database_broker_password": files["database_broker"],
        }
        for h in HOSTS
    ), facts
    no_secret(run, again.values())


def test_the_database_url_is_worked_out_once(tmp_path: Path) -> None:
    """Addresses of each kind, a node that is no Patroni node, the first node's role and database."""
    hosts = write_inventory(
        tmp_path,
        {
            "brokers": {"hosts": {"b1": {"gatehouse_address": "10.0.0.10"}}},
            "databases": {
                "hosts": {
                    "db1": {
                        "gatehouse_address": "fd00::61",
                        "database_broker_role": "brk",
                        "database_broker_database": "gh",
                    },
                    "db2": {"ansible_host": "10.0.0.62"},
                    "db3": {},
                    "db4": {"gatehouse_address": "10.0.0.64", "database_patroni": False},
                }
            },
        },
    )
    site = str(REPO_ROOT / "playbooks" / "site.yml")
    run = run_playbook("-i", hosts, site, "--check", "--tags", "firewall")
    assert run.returncode == 0, run.stdout[-4000:]
    [task] = [
        t
        for t in run.report["plays"][0]["tasks"]
        if t["task"]["name"].startswith("Work out the database cluster's URL")
    ]
    [result] = task["hosts"].values()  # run once, a fact of every host of the play
    assert result["ansible_facts"] == {
        "gatehouse__database_url": "postgresql://brk@[fd00::61]:5432,10.0.0.62:5432,db3:5432/gh?target_session_attrs=read-write"
    }
