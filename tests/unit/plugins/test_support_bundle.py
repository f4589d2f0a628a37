"""Support bundle redaction (module_utils._ops.redact) and collection without Docker (module_utils._ops.support_bundle)."""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
redact = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._ops.redact")
sb = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._ops.support_bundle")
tls = importlib.import_module("tls_material")

GRANT_SECRET = "q1Jv0dZ3mJ1cZCk4cGv0Yk9wYm5xWkRtN2s9PQ=="
ADMIN_TOKEN = "adm-6f1d2c0e9b8a7f6e5d4c"
AGENT_TOKEN = "agt-0a1b2c3d4e5f6a7b8c9d"
PASSWORD = "Correct-Horse-Battery"
JSESSIONID = "8F14E45FCEEA167A5A36DEDD4BEA2543"
CONNECT_TAG = "Z3JhbnQ6c2Vzc2lvbi0xMjM0OmFnZW50LTEwLjAuMC41"
LICENSE_KEY = "LIC-9F8E-7D6C-5B4A"


def redactor(**kwargs):
    return redact.Redactor(**kwargs)


# ------------------------------------------------------------------ the rule on text


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f"GrantSecret={GRANT_SECRET}", GRANT_SECRET),
        (f"GATEHOUSE_GRANTSECRET={GRANT_SECRET}", GRANT_SECRET),
        (f"export GATEHOUSE_ADMINTOKEN={ADMIN_TOKEN}", ADMIN_TOKEN),
        (f"AdminToken = {ADMIN_TOKEN}", ADMIN_TOKEN),
        (f"AgentToken: {AGENT_TOKEN}", AGENT_TOKEN),
        (f"      - GATEHOUSE_AGENTTOKEN={AGENT_TOKEN}", AGENT_TOKEN),
        (f'      GATEHOUSE_ADMINTOKEN: "{ADMIN_TOKEN}"', ADMIN_TOKEN),
        (f"db.password = {PASSWORD} with spaces", PASSWORD),
        (f'{{"user": "bob", "password": "{PASSWORD}", "ok": true}}', PASSWORD),
        (f"Cookie: JSESSIONID={JSESSIONID}; Path=/", JSESSIONID),
        (f"Set-Cookie: JSESSIONID={JSESSIONID}; Secure; HttpOnly", JSESSIONID),
        (f"> Authorization: Bearer {ADMIN_TOKEN}", ADMIN_TOKEN),
        (f"2026-01-01T00:00:00Z > Authorization: Basic {ADMIN_TOKEN}", ADMIN_TOKEN),
        (f"curl -H 'Authorization: Bearer {ADMIN_TOKEN}' https://broker", ADMIN_TOKEN),
        (f"request ok jsessionid={JSESSIONID} client=10.0.0.9", JSESSIONID),
        (f"<target><connect-tag>{CONNECT_TAG}</connect-tag><port>4172</port></target>", CONNECT_TAG),
        (f"CONNECT {CONNECT_TAG}", CONNECT_TAG),
        (f"connect_tag={CONNECT_TAG}", CONNECT_TAG),
        (f"GET /api?token={ADMIN_TOKEN}&x=1", ADMIN_TOKEN),
        (f"Database=postgresql://gatehouse:{PASSWORD}@db:5432/broker", PASSWORD),
        (f"LicenseKey={LICENSE_KEY}", LICENSE_KEY),
    ],
)
def test_secret_removed(line: str, secret: str) -> None:
    r = redactor()
    out = r.literals(r.text(line))
    assert secret not in out
    assert redact.REDACTED in out


@pytest.mark.parametrize(
    "line",
    [
        "SslKey=/certs/key.pem",
        "SslCert=/certs/cert.pem",
        "BrokerUrl=https://broker.example:8443/pcoip-broker/xml",
        "MaxConnections=5000",
        "LogLevel=info",
        "ExternalPcoipIp=192.0.2.10,2001:db8::10",
        '{"session_id": "0e5a7d4c-2a35-4b0e-9b1f-2f6f9f5c7a11", "msg": "allocate-resource"}',
        "    image: gatehouse/cm:0.1.0",
        "<resource-id>42</resource-id>",
    ],
)
def test_harmless_lines_kept(line: str) -> None:
    r = redactor()
    assert r.literals(r.text(line)) == line
    assert r.count == 0


def test_header_behind_log_prefix_is_one_redaction() -> None:
    r = redactor()
    out = r.text(f"2026-01-01T00:00:00.1Z > Authorization: Bearer {ADMIN_TOKEN}")
    assert out == "2026-01-01T00:00:00.1Z > Authorization: [REDACTED]"
    assert r.literals(f"token {ADMIN_TOKEN} echoed") == "token [REDACTED] echoed"


def test_pem_private_key_blocks_removed_certificates_kept() -> None:
    key = tls.key_pem(tls.rsa_key(2048)).decode()
    cert = tls.pem(tls.certificate(tls.rsa_key(2048))).decode()
    r = redactor()
    out = r.text("before\n" + key + cert + "after\n")
    assert "PRIVATE KEY" not in out.replace(redact.REDACTED_KEY_BLOCK, "")
    assert key.splitlines()[1] not in out
    assert cert in out
    # A truncated block (a log cut in the middle) goes to the end of the text.
    partial = key[: len(key) // 2]
    assert key.splitlines()[2] not in r.text("x\n" + partial)


def test_yaml_block_under_sensitive_key_removed() -> None:
    text = "grants:\n  - first-grant-value-123\n  - second-grant-value-456\nimage: gatehouse/cm\n"
    r = redactor()
    out = r.text(text)
    assert "first-grant-value-123" not in out and "second-grant-value-456" not in out
    assert out.splitlines() == ["grants:", "  - [REDACTED]", "  - [REDACTED]", "image: gatehouse/cm"]


def test_secret_echoed_elsewhere_removed_by_literal_pass() -> None:
    r = redactor()
    config = r.text(f"GATEHOUSE_GRANTSECRET={GRANT_SECRET}\n")
    log = f"2026-01-01 service started with {GRANT_SECRET} loaded\n"
    assert GRANT_SECRET in r.text(log), "no key name: only the literal pass can catch it"
    assert GRANT_SECRET not in r.literals(log)
    assert GRANT_SECRET not in config


def test_extra_secret_keys_and_literals() -> None:
    r = redactor(extra_secret_keys=["ldap_bind"], extra_secrets=["plain-literal-value"])
    out = r.literals(r.text("LdapBindDn=cn=admin,dc=example\nnote: plain-literal-value here\n"))
    assert "cn=admin" not in out
    assert "plain-literal-value" not in out


def test_structure_redaction_of_docker_inspect() -> None:
    inspect = {
        "Name": "/gatehouse-cm",
        "Config": {
            "Env": [
                f"GATEHOUSE_GRANTSECRET={GRANT_SECRET}",
                "GATEHOUSE_SSLKEY=/certs/key.pem",
                "PATH=/usr/local/bin:/usr/bin",
            ],
            "Cmd": ["--config", "/data/config.properties", f"--admin-token={ADMIN_TOKEN}"],
            "Args": ["--agent-token", AGENT_TOKEN, "--log-level", "info"],
            "Labels": {"gatehouse.role": "cm"},
        },
        "Secrets": {"nested": {"value": PASSWORD}},
    }
    r = redactor()
    out = r.structure(inspect)
    text = json.dumps(out)
    for secret in (GRANT_SECRET, ADMIN_TOKEN, AGENT_TOKEN, PASSWORD):
        assert secret not in text
    assert out["Config"]["Args"] == ["--agent-token", "[REDACTED]", "--log-level", "info"]
    assert out["Config"]["Env"][0] == "GATEHOUSE_GRANTSECRET=[REDACTED]"
    assert out["Config"]["Env"][1] == "GATEHOUSE_SSLKEY=/certs/key.pem"
    assert out["Config"]["Env"][2] == "PATH=/usr/local/bin:/usr/bin"
    assert out["Config"]["Labels"] == {"gatehouse.role": "cm"}


# ------------------------------------------------------------------ collection and archive


def params(tmp_path: Path, **overrides) -> dict:
    base = {
        "dest": str(tmp_path / "out" / "gatehouse-support.tar.gz"),
        "force": False,
        "mode": "0600",
        "data_dir": str(tmp_path / "cmsg"),
        "extra_paths": [],
        "collect_containers": False,
        "collect_logs": True,
        "container_label": "gatehouse.role",
        "log_lines": 100,
        "max_log_bytes": 4096,
        "max_file_bytes": 64 * 1024,
        "max_files": 100,
        "docker_host": None,
        "extra_secret_keys": [],
        "extra_secrets": [],
    }
    base.update(overrides)
    return base


def make_data_dir(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    (root / "certs").mkdir()
    key = tls.rsa_key(2048)
    (root / "certs" / "cert.pem").write_bytes(tls.pem(tls.certificate(key, "cmsg.example.test")))
    (root / "certs" / "key.pem").write_bytes(tls.key_pem(key))
    (root / "data" / "cmsg.env").write_text(
        f"GATEHOUSE_GRANTSECRET={GRANT_SECRET}\nGATEHOUSE_LOGLEVEL=info\n"
    )
    (root / "data" / "config.properties").write_text(
        "SslCert=/certs/cert.pem\nSslKey=/certs/key.pem\nBrokerUrl=https://broker.example:8443\n"
    )
    (root / "data" / "SecurityGateway.conf").write_text("Port=4172\nMaxConnections=5000\n")
    (root / "docker-compose.yaml").write_text(
        "services:\n  cm:\n    image: gatehouse/cm:0.1.0\n    environment:\n"
        f"      - GATEHOUSE_GRANTSECRET={GRANT_SECRET}\n      - GATEHOUSE_ADMINTOKEN={ADMIN_TOKEN}\n"
    )
    (root / "data" / "broker.db").write_bytes(b"SQLite format 3\x00" + PASSWORD.encode())
    (root / "data" / "notes.txt").write_text(f"the admin token is {ADMIN_TOKEN} (was pasted here)\n")


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_bundle_has_files_and_no_secrets(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "cmsg")
    (tmp_path / "out").mkdir()
    key_body = (tmp_path / "cmsg" / "certs" / "key.pem").read_text().splitlines()[1]
    result = sb.run(params(tmp_path), check_mode=False)
    assert result["changed"] is True, result
    dest = Path(result["dest"])
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    members = read_archive(dest)
    assert set(members) == {
        "gatehouse-support/" + n
        for n in (
            "manifest.json",
            "versions.json",
            "containers.json",
            "certificates.json",
            "files" + str(tmp_path / "cmsg" / "docker-compose.yaml"),
            "files" + str(tmp_path / "cmsg" / "data" / "cmsg.env"),
            "files" + str(tmp_path / "cmsg" / "data" / "config.properties"),
            "files" + str(tmp_path / "cmsg" / "data" / "SecurityGateway.conf"),
            "files" + str(tmp_path / "cmsg" / "data" / "notes.txt"),
        )
    }
    blob = b"\n".join(members.values())
    for secret in (GRANT_SECRET, ADMIN_TOKEN, PASSWORD, key_body):
        assert secret.encode() not in blob, secret
    config = members["gatehouse-support/files" + str(tmp_path / "cmsg" / "data" / "config.properties")]
    assert b"SslKey=/certs/key.pem" in config
    manifest = json.loads(members["gatehouse-support/manifest.json"])
    assert {
        "path": str(tmp_path / "cmsg" / "data" / "broker.db"),
        "reason": "binary file (databases and archives are not copied)",
    } in manifest["skipped"]
    assert manifest["redactions"] >= 4
    certs = json.loads(members["gatehouse-support/certificates.json"])
    kinds = {Path(c["path"]).name: c["kind"] for c in certs}
    assert kinds == {"cert.pem": "certificate", "key.pem": "private key (not copied)"}
    key_entry = next(c for c in certs if c["path"].endswith("key.pem"))
    cert_entry = next(c for c in certs if c["path"].endswith("cert.pem"))
    assert (
        key_entry["public_key_fingerprint_sha256"]
        == cert_entry["certificates"][0]["public_key_fingerprint_sha256"]
    )


def test_existing_dest_kept_unless_force(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "cmsg")
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "gatehouse-support.tar.gz"
    dest.write_bytes(b"old bundle")
    kept = sb.run(params(tmp_path), check_mode=False)
    assert kept["changed"] is False and dest.read_bytes() == b"old bundle"
    replaced = sb.run(params(tmp_path, force=True), check_mode=True)
    assert replaced["changed"] is True and dest.read_bytes() == b"old bundle"
    replaced = sb.run(params(tmp_path, force=True), check_mode=False)
    assert replaced["changed"] is True and dest.read_bytes() != b"old bundle"
    assert [n for n in os.listdir(tmp_path / "out") if n != dest.name] == [], "temporary file left behind"


def test_check_mode_writes_nothing(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "cmsg")
    (tmp_path / "out").mkdir()
    result = sb.run(params(tmp_path), check_mode=True)
    assert result["changed"] is True
    assert "gatehouse-support/manifest.json" in result["members"]
    assert os.listdir(tmp_path / "out") == []


def test_missing_data_dir_is_a_note_and_bad_input_fails(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = sb.run(params(tmp_path), check_mode=True)
    assert any("does not exist" in n for n in result["notes"])
    assert sb.run(params(tmp_path, dest=str(tmp_path / "nope" / "b.tar.gz")), False)["failed"] is True
    assert "octal" in sb.run(params(tmp_path, mode="rw-r"), False)["msg"]
    assert "at least 1" in sb.run(params(tmp_path, max_log_bytes=0), False)["msg"]


def test_large_and_linked_files_skipped(tmp_path: Path) -> None:
    root = tmp_path / "cmsg"
    root.mkdir()
    (root / "big.log").write_text("x" * 5000)
    (root / "link.conf").symlink_to("/etc/hostname")
    (tmp_path / "out").mkdir()
    result = sb.run(params(tmp_path, max_file_bytes=1000), check_mode=True)
    reasons = {Path(s["path"]).name: s["reason"] for s in result["skipped"]}
    assert "max_file_bytes" in reasons["big.log"]
    assert "symbolic link" in reasons["link.conf"]


def test_overlapping_paths_collected_once(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "cmsg")
    (tmp_path / "out").mkdir()
    result = sb.run(params(tmp_path, extra_paths=[str(tmp_path / "cmsg" / "data")]), check_mode=True)
    assert len(result["collected_files"]) == len(set(result["collected_files"])) == 5


def test_broker_secret_files_are_not_read(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "cmsg")
    (tmp_path / "out").mkdir()
    secrets_dir = tmp_path / "cmsg" / "secrets"
    secrets_dir.mkdir()
    files = {
        "ldap-CORP.password": "bind-pass-6d1e",
        "radius.secret": "radius-shared-9f2a",
        "totp.key": "a2V5",
        # What a restore of broker_backup keeps, and a backup's copy of the key: named *.key, never read.
        "totp.before-restore.key": "b2xkLWtleQ",
        "broker-20260101T000000Z.totp.key": "YmFja2VkLXVw",
    }
    for name, value in files.items():
        (secrets_dir / name).write_text(value + "\n")
    result = sb.run(params(tmp_path), check_mode=False)
    blob = b"\n".join(read_archive(Path(result["dest"])).values())
    for value in files.values():
        assert value.encode() not in blob, value
    skipped = {Path(s["path"]).name: s["reason"] for s in result["skipped"]}
    assert skipped["ldap-CORP.password"] == skipped["radius.secret"] == "a secret file (not read)"
