"""gatehouse.access.pki through ansible-playbook on localhost (controller and node at once).

The CA is created once (second run changes nothing), keys are 0600 and never leave the node,
every certificate carries the node's names and the role URI, and a certificate is issued again
exactly when its names change, it expires within the renewal window, or the CA is replaced.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_playbook

OWNER = str(os.getuid())
ISSUE = "gatehouse.access.pki : Issue this node's certificates from the deployment CA (keys made on the node, signed on the controller)"
GROUP = str(os.getgid())


def play(tmp_path: Path, certificates: list[dict], *options: str, **extra) -> dict:
    """Run the ca and main entry points (``options``: more ansible-playbook options); returns
    {task name: [results]} and the stats."""
    variables = {
        "pki_ca_dir": str(tmp_path / "controller" / "ca"),
        "pki_dir": str(tmp_path / "node" / "pki"),
        "pki_certificates": certificates,
        "pki_owner": OWNER,
        "pki_group": GROUP,
        **extra,
    }
    playbook = tmp_path / "pki.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "pki",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": variables,
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {
                                "name": "gatehouse.access.pki",
                                "tasks_from": "ca",
                            }
                        },
                        {"ansible.builtin.include_role": {"name": "gatehouse.access.pki"}},
                    ],
                }
            ]
        )
    )
    run = run_playbook(*options, str(playbook))
    report = run.report
    assert run.returncode == 0, run.stdout[-4000:]
    tasks = {}
    for task in report["plays"][0]["tasks"]:
        tasks.setdefault(task["task"]["name"], []).append(task["hosts"]["localhost"])
    return {"tasks": tasks, "stats": report["stats"]["localhost"], "stdout": run.stdout}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> dict[str, list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        "dns": ext.get_values_for_type(x509.DNSName),
        "ip": [str(v) for v in ext.get_values_for_type(x509.IPAddress)],
        "uri": ext.get_values_for_type(x509.UniformResourceIdentifier),
    }


BROKER = {
    "name": "broker",
    "role": "broker",
    "dns": ["broker.example.test"],
    "ips": ["192.0.2.10", "127.0.0.1"],
}


def test_ca_once_certificates_only_when_needed(tmp_path: Path) -> None:
    first = play(tmp_path, [BROKER])
    ca_dir = tmp_path / "controller" / "ca"
    node = tmp_path / "node" / "pki"
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((node / "broker.key").stat().st_mode) == 0o600
    assert (node / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert "PRIVATE KEY" not in first["stdout"]
    ca = load(ca_dir / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert = load(node / "broker.pem")
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert sans(cert) == {
        "dns": ["broker.example.test"],
        "ip": ["192.0.2.10", "127.0.0.1"],
        "uri": ["urn:gatehouse:role:broker"],
    }
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages and ExtendedKeyUsageOID.CLIENT_AUTH in usages

    # Idempotent: nothing changes on a second run, the CA included.
    second = play(tmp_path, [BROKER])
    assert second["stats"]["changed"] == 0, second["stdout"][-4000:]
    assert load(node / "broker.pem").serial_number == cert.serial_number

    # A changed address: issued again with the same key.
    key_before = (node / "broker.key").read_bytes()
    moved = dict(BROKER, ips=["192.0.2.11"])
    third = play(tmp_path, [moved])
    assert third["stats"]["changed"] > 0
    assert sans(load(node / "broker.pem"))["ip"] == ["192.0.2.11"]
    assert (node / "broker.key").read_bytes() == key_before

    # Inside the renewal window: a certificate valid for 10 days is issued again.
    short = play(tmp_path, [dict(moved, name="short", role="agent")], pki_cert_days=10)
    assert short["stats"]["changed"] > 0
    serial = load(node / "short.pem").serial_number
    play(tmp_path, [dict(moved, name="short", role="agent")], pki_cert_days=10)
    assert load(node / "short.pem").serial_number != serial, "a certificate expiring within 30 days was kept"
    assert sans(load(node / "short.pem"))["uri"] == ["urn:gatehouse:role:agent"]

    # CA rotation: a new CA in the controller directory reissues the certificates.
    for name in ("ca.pem", "ca.key"):
        (ca_dir / name).rename(ca_dir / (name + ".old"))
    play(tmp_path, [moved])
    new_ca = load(ca_dir / "ca.pem")
    assert new_ca.fingerprint(new_ca.signature_hash_algorithm) != ca.fingerprint(ca.signature_hash_algorithm)
    load(node / "broker.pem").verify_directly_issued_by(new_ca)
    assert (node / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()


def test_bad_entry_refused(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="needs a name, a role"):
        play(tmp_path, [{"name": "x", "role": "admin", "dns": ["x.example.test"]}])


def test_names_are_told_apart_into_dns_names_and_addresses(tmp_path: Path) -> None:
    """The callers (site.yml, the agent role) give one list of names; the role splits it."""
    names = ["192.0.2.21", "cm1.example.test", "fd00::21", "cm1"]
    play(tmp_path, [{"name": "cm", "role": "cm", "names": names}])
    cert = load(tmp_path / "node" / "pki" / "cm.pem")
    assert sans(cert) == {
        "dns": ["cm1.example.test", "cm1"],
        "ip": ["192.0.2.21", "fd00::21"],
        "uri": ["urn:gatehouse:role:cm"],
    }
    common_name = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert common_name == "cm1.example.test"
    with pytest.raises(AssertionError, match="at least one DNS name or IP address"):
        play(tmp_path, [{"name": "empty", "role": "cm", "names": []}])


def test_check_mode_reports_and_writes_nothing_on_the_node(tmp_path: Path) -> None:
    play(tmp_path, [])  # the CA exists, as after the ca entry point
    run = play(tmp_path, [BROKER], "--check", "--diff")
    node = tmp_path / "node" / "pki"
    assert run["stats"]["changed"] > 0
    assert not (node / "broker.key").exists() and not (node / "broker.pem").exists()
    (result,) = run["tasks"][ISSUE]
    assert result["issued"] == ["broker"] and result["keys_created"] == ["broker"]
    assert "PRIVATE KEY" not in run["stdout"]
    # After a real run a check run changes nothing, and a changed address shows in the diff.
    play(tmp_path, [BROKER])
    assert play(tmp_path, [BROKER], "--check")["stats"]["changed"] == 0
    moved = play(tmp_path, [dict(BROKER, ips=["192.0.2.11"])], "--check", "--diff")
    (result,) = moved["tasks"][ISSUE]
    assert result["issued"] == ["broker"] and "IP:192.0.2.11" in result["diff"][0]["after"]
    assert "IP:192.0.2.10" in result["diff"][0]["before"]
    assert sans(load(node / "broker.pem"))["ip"] == ["192.0.2.10", "127.0.0.1"]  # untouched
