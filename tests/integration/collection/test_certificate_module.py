"""gatehouse.access.certificate through ansible: check -> real -> idempotent check -> idempotent real."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from tls_material import Chain, certificate, der, key_pem, pem, rsa_key, write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_selfsigned_cycle(tmp_path: Path) -> None:
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    args = {
        "state": "selfsigned",
        "privatekey_path": str(key_path),
        "certificate_path": str(cert_path),
        "common_name": "cmsg.demo.test",
        "subject_alt_names": ["IP:127.0.0.1", "IP:::1", "*.demo.test"],
        "valid_days": 90,
    }
    check = run_module("certificate", args, check=True, diff=True)
    assert not check.failed, check.result
    assert check.changed
    assert check.result["diff"]["before"]["privatekey"]["exists"] is False
    assert list(tmp_path.iterdir()) == [], "check mode wrote files"

    real = run_module("certificate", args, diff=True)
    assert real.changed and not real.failed, real.result
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert key.key_size == 3072
    assert cert.signature_hash_algorithm.name == "sha384"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert real.result["certificate"]["is_wildcard"] is True
    fingerprint = real.result["certificate"]["fingerprint_sha256"]
    assert fingerprint.replace(":", "").lower() == cert.fingerprint(hashes.SHA256()).hex()
    # The private key never leaves the host through the task result.
    key_body = key_path.read_text().splitlines()[1]
    assert key_body not in real.stdout

    key_bytes, cert_bytes = key_path.read_bytes(), cert_path.read_bytes()
    again_check = run_module("certificate", args, check=True, diff=True)
    assert not again_check.changed, again_check.result
    again = run_module("certificate", args)
    assert not again.changed, again.result
    assert key_path.read_bytes() == key_bytes and cert_path.read_bytes() == cert_bytes

    # The generated material passes the check state.
    checked = run_module(
        "certificate", {"certificate_path": str(cert_path), "privatekey_path": str(key_path)}
    )
    assert not checked.failed and not checked.changed, checked.result


def test_csr_cycle(tmp_path: Path) -> None:
    args = {
        "state": "csr",
        "privatekey_path": str(tmp_path / "private.key"),
        "csr_path": str(tmp_path / "server.csr"),
        "common_name": "cmsg.example.test",
        "organization_name": "Example Corporation",
        "country_name": "CA",
    }
    assert run_module("certificate", args, check=True).changed
    assert not (tmp_path / "private.key").exists()
    assert run_module("certificate", args).changed
    csr = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes())
    assert csr.is_signature_valid and csr.public_key().key_size == 3072
    assert csr.signature_hash_algorithm.name == "sha384"
    assert mode(tmp_path / "private.key") == 0o600
    assert not run_module("certificate", args, check=True).changed
    assert not run_module("certificate", args).changed


def test_check_refuses_1024_bit_key(tmp_path: Path) -> None:
    key = rsa_key(1024)
    cert_path = write(tmp_path / "cert.pem", pem(certificate(key)))
    key_path = write(tmp_path / "key.pem", key_pem(key), 0o600)
    run = run_module("certificate", {"certificate_path": str(cert_path), "privatekey_path": str(key_path)})
    assert run.failed
    assert "2048" in run.result["msg"]
    assert run.returncode != 0


def test_check_der_conversion_cycle(tmp_path: Path) -> None:
    chain = Chain()
    cert_path = write(tmp_path / "certificate.crt", der(chain.leaf))
    chain_path = write(tmp_path / "CAcertificate.pem", pem(chain.intermediate, chain.root))
    key_path = write(tmp_path / "private.key", key_pem(chain.leaf_key), 0o600)
    base = {
        "certificate_path": str(cert_path),
        "chain_path": str(chain_path),
        "privatekey_path": str(key_path),
    }

    refused = run_module("certificate", base)
    assert refused.failed and "convert_der" in refused.result["msg"]
    assert cert_path.read_bytes() == der(chain.leaf)

    args = dict(base, convert_der=True)
    check = run_module("certificate", args, check=True, diff=True)
    assert check.changed and check.result["diff"]["after"] == {str(cert_path): "PEM"}
    assert cert_path.read_bytes() == der(chain.leaf)
    real = run_module("certificate", args)
    assert real.changed and real.result["converted"] == [str(cert_path)]
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == chain.leaf
    assert not run_module("certificate", args, check=True).changed
    final = run_module("certificate", args)
    assert not final.changed
    assert [c["common_name"] for c in final.result["chain"]] == ["Test Intermediate CA", "Test Root CA"]


def test_options_of_another_state_refused(tmp_path: Path) -> None:
    run = run_module(
        "certificate",
        {"state": "check", "certificate_path": str(tmp_path / "c.pem"), "csr_path": str(tmp_path / "x.csr")},
    )
    assert run.failed and "csr_path" in run.result["msg"] and "state=check" in run.result["msg"]
