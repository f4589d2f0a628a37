"""The EXAMPLES of certificate, preflight, support_bundle and discovery_fqdns run as a playbook.

Absolute paths in the examples are moved below a temporary directory; the inputs the examples
expect (a CA-signed certificate, its key and chain, a DER certificate) are prepared first.
"""

from __future__ import annotations

import ast
import json
import sys
import tarfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import collection_helpers
from collection_helpers import REPO_ROOT
from tls_material import Chain, der, key_pem, pem, write

PATH_PREFIXES = ("/root/certs", "/opt/gatehouse", "/var/tmp")


def examples(relative: str) -> list[dict]:
    tree = ast.parse((REPO_ROOT / relative).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXAMPLES":
            return yaml.safe_load(node.value.value)
    raise AssertionError(f"no EXAMPLES in {relative}")


def relocate(tasks: list[dict], root: Path) -> list[dict]:
    text = json.dumps(tasks)
    for prefix in PATH_PREFIXES:
        text = text.replace(prefix, str(root) + prefix)
    return json.loads(text)


def run_playbook(tasks: list[dict], root: Path, gather_facts: bool = False) -> dict:
    playbook = root / "examples.yml"
    playbook.write_text(
        yaml.safe_dump(
            [{"name": "examples", "hosts": "localhost", "gather_facts": gather_facts, "tasks": tasks}]
        )
    )
    return collection_helpers.run_playbook(str(playbook)).report


def task_results(report: dict) -> list[tuple[str, dict]]:
    return [(t["task"]["name"], t["hosts"]["localhost"]) for t in report["plays"][0]["tasks"]]


def test_certificate_examples(tmp_path: Path) -> None:
    certs = tmp_path / "root" / "certs"
    certs.mkdir(parents=True)
    (tmp_path / "opt" / "gatehouse" / "cmsg" / "certs").mkdir(parents=True)
    chain = Chain(leaf_cn="cmsg.example.com")
    write(certs / "certificate.pem", pem(chain.leaf))
    write(certs / "CAcertificate.pem", pem(chain.intermediate, chain.root))
    write(certs / "private.key", key_pem(chain.leaf_key), 0o600)
    write(certs / "certificate.crt", der(chain.leaf))
    report = run_playbook(relocate(examples("plugins/modules/certificate.py"), tmp_path), tmp_path)
    results = task_results(report)
    assert len(results) == 5
    for name, result in results:
        assert not result.get("failed"), (name, result)
    assert (certs / "certificate.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (certs / "server.csr").exists()
    assert (tmp_path / "opt" / "gatehouse" / "cmsg" / "certs" / "cert.pem").exists()


def test_preflight_examples(tmp_path: Path) -> None:
    (tmp_path / "opt" / "gatehouse").mkdir(parents=True)
    tasks = relocate(examples("plugins/modules/preflight.py"), tmp_path)
    # The plain example fails on a host below the documented minimums (this one may have no swap).
    tasks[0]["ignore_errors"] = True
    results = dict(task_results(run_playbook(tasks, tmp_path)))
    assert len(results) == 5
    documented = results["Check the documented system requirements"]
    assert documented["changed"] is False
    if documented.get("failed"):
        assert documented["failed_checks"], documented
    lab = results["Check a lab host without swap and with a small disk, keep the result"]
    assert not lab.get("failed"), lab
    for name in ("Show what was measured", "List what is missing"):
        assert not results[name].get("failed"), results[name]
    assert "MB RAM, Docker" in results["Show what was measured"]["msg"]


def test_support_bundle_examples(tmp_path: Path) -> None:
    (tmp_path / "var" / "tmp").mkdir(parents=True)
    (tmp_path / "opt" / "gatehouse" / "broker").mkdir(parents=True)
    (tmp_path / "opt" / "gatehouse" / "broker" / "broker.properties").write_text(
        "AdminToken=abcdefgh12345678\n"
    )
    tasks = relocate(examples("plugins/modules/support_bundle.py"), tmp_path)
    # The examples collect every gatehouse container on the host; keep this test to files only.
    for task in tasks:
        module = task.get("gatehouse.access.support_bundle")
        if module is not None:
            module["collect_containers"] = False
        fetch = task.get("ansible.builtin.fetch")
        if fetch is not None:
            fetch["dest"] = str(tmp_path / "support") + "/"
    report = run_playbook(tasks, tmp_path, gather_facts=True)
    results = task_results(report)
    assert len(results) == 5  # fact gathering + 4 examples
    for name, result in results:
        assert not result.get("failed"), (name, result)
    bundles = sorted((tmp_path / "var" / "tmp").glob("gatehouse-support*.tar.gz"))
    assert [b.name for b in bundles if "preview" in b.name] == [], "check_mode example wrote a file"
    assert len(bundles) == 2
    assert list((tmp_path / "support").rglob("*.tar.gz"))
    with tarfile.open(tmp_path / "var" / "tmp" / "gatehouse-support.tar.gz") as tar:
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    assert b"broker.properties" in blob and b"abcdefgh12345678" not in blob


def test_discovery_lookup_examples(tmp_path: Path) -> None:
    report = run_playbook(examples("plugins/lookup/discovery_fqdns.py"), tmp_path)
    results = task_results(report)
    assert results[0][1]["msg"][3] == "pcoip_mc1.hostmachine1.sales.europe.companyname.com"
    assert results[1][1]["ansible_facts"]["first_discovery_name"] == "pcoip_mc1.zc1.branch.example.com"
