"""Certificate rules of the CM/SG (module_utils._crypto.certificate) and the certificate module's
work (modules/certificate.run) on real keys and certificates."""

from __future__ import annotations

import datetime
import importlib
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
cu = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._crypto.certificate")
module = importlib.import_module("ansible_collections.gatehouse.access.plugins.modules.certificate")
tls = importlib.import_module("tls_material")


def check_params(**overrides) -> dict:
    params = {
        "state": "check",
        "certificate_path": None,
        "privatekey_path": None,
        "chain_path": None,
        "convert_der": False,
        "expiry_warn_days": 30,
    }
    params.update(overrides)
    return params


def gen_params(state: str, tmp_path: Path, **overrides) -> dict:
    params = {
        "state": state,
        "certificate_path": str(tmp_path / "cert.pem") if state == "selfsigned" else None,
        "privatekey_path": str(tmp_path / "key.pem"),
        "csr_path": str(tmp_path / "server.csr") if state == "csr" else None,
        "common_name": "cmsg.example.test",
        "subject_alt_names": [],
        "country_name": None,
        "state_or_province_name": None,
        "locality_name": None,
        "organization_name": None,
        "organizational_unit_name": None,
        "key_size": 2048,
        "digest": "sha384",
        "valid_days": 365,
        "expiry_warn_days": 30,
        "force": False,
    }
    params.update(overrides)
    return params


@pytest.fixture
def good(tmp_path: Path) -> dict:
    key = tls.rsa_key(3072)
    cert = tls.certificate(key, "cmsg.example.test")
    return {
        "cert": tls.write(tmp_path / "cert.pem", tls.pem(cert)),
        "key": tls.write(tmp_path / "key.pem", tls.key_pem(key), 0o600),
        "key_obj": key,
        "cert_obj": cert,
    }


# ------------------------------------------------------------------ key rules


def test_good_rsa3072_passes_without_warnings(good: dict) -> None:
    material = cu.inspect_material(str(good["cert"]), str(good["key"]))
    assert material.findings.errors == []
    assert material.findings.warnings == []
    facts = material.facts(cu.utcnow(), str(good["key"]))
    assert facts["certificate"]["key_size"] == 3072
    assert facts["certificate"]["key_type"] == "RSA"
    assert facts["certificate"]["signature_hash"] == "sha256"
    assert facts["privatekey"]["mode"] == "0600"
    assert (
        facts["privatekey"]["public_key_fingerprint_sha256"]
        == (facts["certificate"]["public_key_fingerprint_sha256"])
    )


def test_rsa1024_refused_with_2048_in_message(tmp_path: Path) -> None:
    key = tls.rsa_key(1024)
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(tls.certificate(key)))
    material = cu.inspect_material(str(cert_path))
    assert len(material.findings.errors) == 1
    message = material.findings.errors[0]
    assert "1024-bit RSA key" in message
    assert "2048" in message


def test_rsa2048_accepted_with_recommendation_warning(tmp_path: Path) -> None:
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(tls.certificate(tls.rsa_key(2048))))
    material = cu.inspect_material(str(cert_path))
    assert material.findings.errors == []
    assert any("3072" in w for w in material.findings.warnings)


def test_dsa_refused(tmp_path: Path) -> None:
    key = tls.dsa_key()
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(tls.certificate(key)))
    material = cu.inspect_material(str(cert_path))
    assert any("DSA keys are not supported" in e for e in material.findings.errors)


def test_ec_leaf_refused_as_non_rsa(tmp_path: Path) -> None:
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(tls.certificate(tls.ec_key())))
    material = cu.inspect_material(str(cert_path))
    assert any("only RSA keys are supported" in e for e in material.findings.errors)


# ------------------------------------------------------------------ signatures


@pytest.mark.parametrize(("algorithm", "label"), [("md5", "MD5"), ("sha1", "SHA-1")])
def test_legacy_signature_refused(tmp_path: Path, algorithm: str, label: str) -> None:
    key = tls.rsa_key(3072)
    legacy = tls.resign_legacy(tls.certificate(key), key, algorithm)
    assert legacy.signature_hash_algorithm.name == algorithm
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(legacy))
    material = cu.inspect_material(str(cert_path))
    assert [e for e in material.findings.errors if label in e and "not supported" in e]


def test_md5_self_signature_of_root_is_ignored(tmp_path: Path) -> None:
    chain = tls.Chain()
    old_root = tls.resign_legacy(chain.root, chain.root_key, "md5")
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(chain.leaf, chain.intermediate, old_root))
    material = cu.inspect_material(str(cert_path))
    assert material.findings.errors == []


def test_md5_signed_intermediate_refused(tmp_path: Path) -> None:
    chain = tls.Chain()
    old_intermediate = tls.resign_legacy(chain.intermediate, chain.root_key, "md5")
    cert_path = tls.write(tmp_path / "c.pem", tls.pem(chain.leaf, old_intermediate, chain.root))
    material = cu.inspect_material(str(cert_path))
    assert any("MD5" in e and "Intermediate" in e for e in material.findings.errors)


# ------------------------------------------------------------------ formats


def test_der_refused_without_convert(tmp_path: Path, good: dict) -> None:
    der_path = tls.write(tmp_path / "certificate.crt", tls.der(good["cert_obj"]))
    material = cu.inspect_material(str(der_path))
    assert any("DER" in e and "PEM" in e and "convert_der" in e for e in material.findings.errors)
    assert material.conversions == []


def test_der_converted_on_request(tmp_path: Path, good: dict) -> None:
    der_path = tls.write(tmp_path / "certificate.crt", tls.der(good["cert_obj"]), 0o640)
    params = check_params(certificate_path=str(der_path), convert_der=True)
    result = module.run(params, check_mode=True)
    assert result["changed"] is True
    assert der_path.read_bytes() == tls.der(good["cert_obj"]), "check mode must not write"

    result = module.run(params, check_mode=False)
    assert result["changed"] is True
    assert result["converted"] == [str(der_path)]
    converted = x509.load_pem_x509_certificate(der_path.read_bytes())
    assert converted == good["cert_obj"]
    assert stat.S_IMODE(der_path.stat().st_mode) == 0o640

    again = module.run(params, check_mode=False)
    assert again["changed"] is False


def test_der_key_converted_to_pem_with_mode_0600(tmp_path: Path, good: dict) -> None:
    key_path = tls.write(tmp_path / "private.der", tls.key_der(good["key_obj"]), 0o644)
    result = module.run(
        check_params(certificate_path=str(good["cert"]), privatekey_path=str(key_path), convert_der=True),
        False,
    )
    assert result["converted"] == [str(key_path)]
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_garbage_is_not_a_certificate(tmp_path: Path) -> None:
    path = tls.write(tmp_path / "c.pem", b"hello, this is not a certificate\n")
    with pytest.raises(cu.CertificateError, match="neither a PEM nor a DER"):
        cu.inspect_material(str(path))


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = module.run(check_params(certificate_path=str(tmp_path / "nope.pem")), False)
    assert result["failed"] is True
    assert "does not exist" in result["msg"]


def test_crlf_pem_accepted(tmp_path: Path, good: dict) -> None:
    crlf = good["cert"].read_bytes().replace(b"\n", b"\r\n")
    path = tls.write(tmp_path / "crlf.pem", crlf)
    assert cu.inspect_material(str(path), str(good["key"])).findings.errors == []


# ------------------------------------------------------------------ key match, chain, validity


def test_key_mismatch_detected(tmp_path: Path, good: dict) -> None:
    other = tls.write(tmp_path / "other.pem", tls.key_pem(tls.rsa_key(3072, slot=1)), 0o600)
    material = cu.inspect_material(str(good["cert"]), str(other))
    assert any("does not match" in e for e in material.findings.errors)


def test_encrypted_key_refused(tmp_path: Path, good: dict) -> None:
    enc = tls.write(tmp_path / "enc.pem", tls.key_pem(good["key_obj"], b"pass-phrase"), 0o600)
    with pytest.raises(cu.CertificateError, match="encrypted"):
        cu.inspect_material(str(good["cert"]), str(enc))


def test_world_readable_key_warned(tmp_path: Path, good: dict) -> None:
    os.chmod(good["key"], 0o644)
    material = cu.inspect_material(str(good["cert"]), str(good["key"]))
    assert material.findings.errors == []
    assert any("0644" in w for w in material.findings.warnings)


def test_correct_chain_in_separate_file(tmp_path: Path) -> None:
    chain = tls.Chain()
    cert_path = tls.write(tmp_path / "certificate.pem", tls.pem(chain.leaf))
    # A CA's "with chain" file that repeats the leaf first is accepted.
    chain_path = tls.write(
        tmp_path / "CAcertificate.pem", tls.pem(chain.leaf, chain.intermediate, chain.root)
    )
    material = cu.inspect_material(str(cert_path), chain_path=str(chain_path))
    assert material.findings.errors == []
    facts = material.facts(cu.utcnow(), None)
    assert [c["common_name"] for c in facts["chain"]] == ["Test Intermediate CA", "Test Root CA"]
    assert facts["chain"][1]["self_signed"] is True


def test_wrong_chain_order_detected(tmp_path: Path) -> None:
    chain = tls.Chain()
    cert_path = tls.write(tmp_path / "fullchain.pem", tls.pem(chain.leaf, chain.root, chain.intermediate))
    material = cu.inspect_material(str(cert_path))
    assert len(material.findings.errors) == 1
    assert "chain order is wrong" in material.findings.errors[0]
    assert "certificate #3" in material.findings.errors[0]


def test_foreign_chain_detected(tmp_path: Path) -> None:
    chain = tls.Chain()
    stranger = tls.certificate(tls.rsa_key(2048, slot=20), "Unrelated CA", ca=True)
    cert_path = tls.write(tmp_path / "fullchain.pem", tls.pem(chain.leaf, stranger))
    material = cu.inspect_material(str(cert_path))
    assert any("chain is broken" in e and "Test Intermediate CA" in e for e in material.findings.errors)


def test_expired_refused_and_near_expiry_warned(tmp_path: Path) -> None:
    key = tls.rsa_key(3072)
    now = tls.now()
    expired = tls.certificate(
        key, not_before=now - datetime.timedelta(days=400), not_after=now - datetime.timedelta(days=1)
    )
    soon = tls.certificate(key, not_after=now + datetime.timedelta(days=10))
    expired_path = tls.write(tmp_path / "expired.pem", tls.pem(expired))
    soon_path = tls.write(tmp_path / "soon.pem", tls.pem(soon))
    assert any("expired on" in e for e in cu.inspect_material(str(expired_path)).findings.errors)
    near = cu.inspect_material(str(soon_path), expiry_warn_days=30)
    assert near.findings.errors == []
    assert any("expires on" in w for w in near.findings.warnings)
    assert cu.inspect_material(str(soon_path), expiry_warn_days=5).findings.warnings == []


def test_not_yet_valid_refused(tmp_path: Path) -> None:
    key = tls.rsa_key(3072)
    later = tls.now() + datetime.timedelta(days=2)
    path = tls.write(tmp_path / "later.pem", tls.pem(tls.certificate(key, not_before=later)))
    assert any("not valid before" in e for e in cu.inspect_material(str(path)).findings.errors)


def test_wildcard_reported(tmp_path: Path) -> None:
    key = tls.rsa_key(3072)
    cert = tls.certificate(key, "*.example.test", sans=["*.example.test", "example.test"])
    path = tls.write(tmp_path / "wild.pem", tls.pem(cert))
    facts = cu.inspect_material(str(path)).facts(cu.utcnow(), None)["certificate"]
    assert facts["is_wildcard"] is True
    assert facts["wildcard_names"] == ["*.example.test"]
    assert facts["subject_alt_names"] == ["DNS:*.example.test", "DNS:example.test"]


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    key = tls.rsa_key(1024)
    now = tls.now()
    cert = tls.resign_legacy(
        tls.certificate(
            key, not_before=now - datetime.timedelta(days=9), not_after=now - datetime.timedelta(days=2)
        ),
        key,
        "md5",
    )
    path = tls.write(tmp_path / "bad.pem", tls.pem(cert))
    result = module.run(check_params(certificate_path=str(path)), False)
    assert result["failed"] is True
    assert len(result["errors"]) == 3
    assert "2048" in result["msg"] and "MD5" in result["msg"] and "expired" in result["msg"]


# ------------------------------------------------------------------ generation


def test_csr_generation_and_idempotence(tmp_path: Path) -> None:
    params = gen_params(
        "csr",
        tmp_path,
        key_size=3072,
        subject_alt_names=["DNS:cm1.example.test", "192.0.2.7"],
        country_name="ca",
        organization_name="Example Corporation",
    )
    first = module.run(params, check_mode=False)
    assert first["changed"] is True and first["privatekey_generated"] is True
    csr = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes())
    assert csr.signature_hash_algorithm.name == "sha384"
    assert csr.public_key().key_size == 3072
    assert csr.subject.rfc4514_string() == "CN=cmsg.example.test,O=Example Corporation,C=CA"
    assert first["csr"]["subject_alt_names"] == [
        "DNS:cmsg.example.test",
        "DNS:cm1.example.test",
        "IP:192.0.2.7",
    ]
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    key_before = (tmp_path / "key.pem").read_bytes()
    csr_before = (tmp_path / "server.csr").read_bytes()

    second = module.run(params, check_mode=False)
    assert second["changed"] is False
    assert (tmp_path / "key.pem").read_bytes() == key_before
    assert (tmp_path / "server.csr").read_bytes() == csr_before

    # A new SAN regenerates the request but keeps the key.
    params["subject_alt_names"].append("cm2.example.test")
    third = module.run(params, check_mode=False)
    assert third["changed"] is True and third["privatekey_generated"] is False
    assert (tmp_path / "key.pem").read_bytes() == key_before
    assert (tmp_path / "server.csr").read_bytes() != csr_before


def test_existing_key_of_other_size_not_replaced_without_force(tmp_path: Path) -> None:
    tls.write(tmp_path / "key.pem", tls.key_pem(tls.rsa_key(2048)), 0o600)
    before = (tmp_path / "key.pem").read_bytes()
    result = module.run(gen_params("selfsigned", tmp_path, key_size=3072), False)
    assert result["failed"] is True
    assert "force" in result["msg"] and "2048-bit" in result["msg"]
    assert (tmp_path / "key.pem").read_bytes() == before
    assert not (tmp_path / "cert.pem").exists()


def test_selfsigned_with_ip_sans_and_mode_repair(tmp_path: Path) -> None:
    params = gen_params(
        "selfsigned", tmp_path, subject_alt_names=["IP:127.0.0.1", "IP:::1", "Demo.Example.Test."]
    )
    first = module.run(params, False)
    assert first["changed"] is True
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["cmsg.example.test", "demo.example.test"]
    assert any("3072" in w for w in first["warnings_list"]), "2048-bit key gets the recommendation warning"

    os.chmod(tmp_path / "key.pem", 0o644)
    repaired = module.run(params, False)
    assert repaired["changed"] is True and repaired["privatekey_generated"] is False
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes()) == cert
    assert module.run(params, False)["changed"] is False


def test_selfsigned_renewed_when_close_to_expiry(tmp_path: Path) -> None:
    params = gen_params("selfsigned", tmp_path)
    module.run(params, False)
    original = (tmp_path / "cert.pem").read_bytes()
    later = cu.utcnow() + datetime.timedelta(days=340)
    renewed = module.run(params, False, now=later)
    assert renewed["changed"] is True and renewed["privatekey_generated"] is False
    assert (tmp_path / "cert.pem").read_bytes() != original


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key_size": 1024}, "at least 2048"),
        ({"common_name": "not a name"}, "not a fully qualified"),
        ({"country_name": "Canada"}, "two-letter"),
        ({"organization_name": "Example, Inc."}, "not allowed"),
        ({"subject_alt_names": ["IP:300.1.1.1"]}, "not an IP address"),
        ({"subject_alt_names": ["foo.*.example"]}, "wildcard"),
        ({"valid_days": 20}, "expiry_warn_days"),
    ],
)
def test_bad_generation_input_fails_before_writing(tmp_path: Path, overrides: dict, message: str) -> None:
    result = module.run(gen_params("selfsigned", tmp_path, **overrides), False)
    assert result["failed"] is True
    assert message in result["msg"]
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_reported(tmp_path: Path) -> None:
    params = gen_params("csr", tmp_path, csr_path=str(tmp_path / "missing" / "server.csr"))
    result = module.run(params, False)
    assert result["failed"] is True and "does not exist" in result["msg"]
    assert list(tmp_path.iterdir()) == []
