"""playbooks/tasks/halb-certificate.yml (gatehouse_halb_self_signed) through ansible-playbook on
localhost (controller and node at once).

The VIP key and self-signed certificate are made by gatehouse.access.certificate: key mode 0600 on
the controller and the node, the VIPs as IP names, kept on later runs, renewed close to expiry
with the same key, and a key and certificate made by the earlier community.crypto tasks are kept
as they are.
"""

from __future__ import annotations

import datetime
import importlib
import stat
import sys
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, run_playbook

tls = importlib.import_module("tls_material")

TASKS = REPO_ROOT / "playbooks" / "tasks" / "halb-certificate.yml"
VIPS = ["192.0.2.10/24", "2001:db8::10/64"]

# The tasks of the earlier releases, to show that their key and certificate carry over.
COMMUNITY_CRYPTO_TASKS = [
    {
        "community.crypto.openssl_privatekey": {
            "path": "{{ gatehouse__secrets_dir }}/halb-vip.key",
            "type": "RSA",
            "size": 3072,
            "mode": "0600",
        }
    },
    {
        "community.crypto.openssl_csr_pipe": {
            "privatekey_path": "{{ gatehouse__secrets_dir }}/halb-vip.key",
            "common_name": "{{ halb_vips[0] | regex_replace('/.*$', '') }}",
            "subject_alt_name": "{{ halb_vips | map('regex_replace', '/.*$', '') "
            "| map('regex_replace', '^', 'IP:') | list }}",
        },
        "register": "earlier_csr",
    },
    {
        "community.crypto.x509_certificate": {
            "path": "{{ gatehouse__secrets_dir }}/halb-vip.pem",
            "privatekey_path": "{{ gatehouse__secrets_dir }}/halb-vip.key",
            "csr_content": "{{ earlier_csr.csr }}",
            "provider": "selfsigned",
            "selfsigned_not_after": "+825d",
            "mode": "0644",
        }
    },
]


def play(tmp_path: Path, tasks: list[dict] | None = None) -> dict:
    secrets = tmp_path / "controller" / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    playbook = tmp_path / "halb-certificate.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "halb certificate",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {
                        "gatehouse__secrets_dir": str(secrets),
                        "gatehouse__data_root": str(tmp_path / "node"),
                        "halb_vips": VIPS,
                    },
                    "tasks": tasks or [{"ansible.builtin.import_tasks": str(TASKS)}],
                }
            ]
        )
    )
    run = run_playbook(str(playbook))
    assert run.returncode == 0, run.stdout[-4000:]
    assert "PRIVATE KEY" not in run.stdout
    return run.report["stats"]["localhost"]


def files(tmp_path: Path) -> dict[str, Path]:
    secrets = tmp_path / "controller" / "secrets"
    node = tmp_path / "node" / "halb-tls"
    return {
        "key": secrets / "halb-vip.key",
        "cert": secrets / "halb-vip.pem",
        "node_key": node / "vip.key",
        "node_cert": node / "vip.pem",
    }


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ip_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_made_once_copied_and_kept(tmp_path: Path) -> None:
    play(tmp_path)
    paths = files(tmp_path)
    for name in ("key", "node_key"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths["cert"].stat().st_mode) == 0o644
    assert paths["node_key"].read_bytes() == paths["key"].read_bytes()
    assert paths["node_cert"].read_bytes() == paths["cert"].read_bytes()
    cert = load(paths["cert"])
    assert cert.subject.rfc4514_string() == "CN=192.0.2.10"
    assert cert.issuer == cert.subject
    assert ip_names(cert) == ["192.0.2.10", "2001:db8::10"]
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key().key_size == 3072
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 825

    assert play(tmp_path)["changed"] == 0
    assert load(paths["cert"]).serial_number == cert.serial_number


def test_renewed_close_to_expiry_with_the_same_key(tmp_path: Path) -> None:
    play(tmp_path)
    paths = files(tmp_path)
    key_pem = paths["key"].read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    now = tls.now()
    expiring = tls.certificate(
        key, "192.0.2.10", sans=["192.0.2.10", "2001:db8::10"], not_after=now + datetime.timedelta(days=10)
    )
    tls.write(paths["cert"], tls.pem(expiring))
    play(tmp_path)
    renewed = load(paths["cert"])
    assert renewed.not_valid_after_utc > now + datetime.timedelta(days=800)
    assert paths["key"].read_bytes() == key_pem
    assert paths["node_cert"].read_bytes() == paths["cert"].read_bytes()


def test_material_of_the_community_crypto_tasks_is_kept(tmp_path: Path) -> None:
    play(tmp_path, COMMUNITY_CRYPTO_TASKS)
    paths = files(tmp_path)
    key_before, cert_before = paths["key"].read_bytes(), paths["cert"].read_bytes()
    play(tmp_path)
    assert paths["key"].read_bytes() == key_before
    assert paths["cert"].read_bytes() == cert_before
    assert paths["node_cert"].read_bytes() == cert_before
