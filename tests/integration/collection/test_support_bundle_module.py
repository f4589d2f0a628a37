"""gatehouse.access.support_bundle through ansible: a data directory and (when Docker and a static busybox
are available) a real labelled container with secrets in its environment and logs; the archive must hold
none of them."""

from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from tls_material import certificate, key_pem, pem, rsa_key

GRANT_SECRET = "TXlHcmFudFNlY3JldEZvclN1cHBvcnRCdW5kbGVUZXN0"
ADMIN_TOKEN = "admintoken-4b7e1f0c9d2a"
AGENT_TOKEN = "agenttoken-8c3d2e1f0a9b"
PASSWORD = "Tr0ub4dor-and-3"
JSESSIONID = "0123456789ABCDEF0123456789ABCDEF"
CONNECT_TAG = "Y29ubmVjdC10YWctZm9yLXRoZS1idW5kbGUtdGVzdA"
SECRETS = (GRANT_SECRET, ADMIN_TOKEN, AGENT_TOKEN, PASSWORD, JSESSIONID, CONNECT_TAG)
BUSYBOX = Path("/bin/busybox")


def make_data_dir(root: Path) -> str:
    """A CM/SG data directory like the cmsg module writes, with known secrets; returns a key line."""
    (root / "data").mkdir(parents=True)
    (root / "certs").mkdir()
    key = rsa_key(2048)
    (root / "certs" / "cert.pem").write_bytes(pem(certificate(key, "cmsg.example.test")))
    key_bytes = key_pem(key)
    (root / "certs" / "key.pem").write_bytes(key_bytes)
    (root / "certs" / "key.pem").chmod(0o600)
    (root / "data" / "cmsg.env").write_text(
        f"GATEHOUSE_GRANTSECRET={GRANT_SECRET}\nGATEHOUSE_LOGLEVEL=info\n"
    )
    (root / "data" / "config.properties").write_text(
        "SslCert=/certs/cert.pem\nSslKey=/certs/key.pem\nBrokerUrl=https://broker.example:8443\n"
        "SecurityGatewayEnabled=true\nExternalPcoipIp=192.0.2.10\n"
    )
    (root / "data" / "SecurityGateway.conf").write_text("Port=4172\nMaxConnections=5000\nLogLevel=info\n")
    (root / "docker-compose.yaml").write_text(
        "services:\n  cm:\n    image: gatehouse/cm:0.1.0\n    environment:\n"
        f"      GATEHOUSE_GRANTSECRET: {GRANT_SECRET}\n      GATEHOUSE_ADMINTOKEN: '{ADMIN_TOKEN}'\n"
    )
    broker = root.parent / "broker"
    broker.mkdir()
    (broker / "broker.properties").write_text(
        f"ListenPort=8443\nAdminToken={ADMIN_TOKEN}\nAgentToken={AGENT_TOKEN}\nDomains=CORP\n"
        f"Database=postgresql://broker:{PASSWORD}@db.example:5432/broker\n"
    )
    (broker / "access.log").write_text(
        f"POST /pcoip-broker/xml Cookie: JSESSIONID={JSESSIONID}\n"
        f"<target><connect-tag>{CONNECT_TAG}</connect-tag><port>4172</port></target>\n"
    )
    (broker / "broker.db").write_bytes(b"SQLite format 3\x00" + PASSWORD.encode())
    return key_bytes.decode().splitlines()[1]


def archive_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture
def labelled_container() -> Iterator[tuple[str, str]]:
    """A running container with secrets in its environment and its logs; yields (label, container name)."""
    docker = pytest.importorskip("docker")
    if not BUSYBOX.exists() or b"statically linked" not in _file_kind(BUSYBOX):
        pytest.skip("a static /bin/busybox is needed to build a throwaway image without a registry")
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException:
        pytest.skip("Docker engine not reachable")
    suffix = uuid.uuid4().hex[:10]
    label = f"gatehouse.test-sb-{suffix}"
    image_tag = f"gatehouse-test-sb-{suffix}:latest"
    name = f"gatehouse-test-sb-{suffix}"
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.add(str(BUSYBOX), arcname="bin/busybox")
    image = None
    try:
        client.api.import_image_from_data(
            layer.getvalue(), repository=image_tag.split(":", maxsplit=1)[0], tag="latest"
        )
        image = client.images.get(image_tag)
        script = (
            'echo "cm starting, grant secret loaded: $GATEHOUSE_GRANTSECRET"; '
            'echo "> Authorization: Bearer $GATEHOUSE_ADMINTOKEN"; '
            f'echo "relay CONNECT {CONNECT_TAG}"; '
            f'echo "user login password={PASSWORD}"; '
            "exec /bin/busybox sleep 600"
        )
        client.containers.run(
            image.id,
            ["/bin/busybox", "sh", "-c", script],
            name=name,
            detach=True,
            labels={label: "cm", "gatehouse.role": "cm", "gatehouse.host": "test"},
            environment={"GATEHOUSE_GRANTSECRET": GRANT_SECRET, "GATEHOUSE_ADMINTOKEN": ADMIN_TOKEN},
            network_mode="none",
        )
        container = client.containers.get(name)
        for _attempt in range(
            100
        ):  # wait until the script has printed its lines (bounded, not a timing assertion)
            if b"password=" in container.logs():
                break
            time.sleep(0.1)
        yield label, name
    finally:
        try:
            client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        if image is not None:
            client.images.remove(image.id, force=True)
        client.close()


def _file_kind(path: Path) -> bytes:
    if shutil.which("file") is None:
        return b"statically linked"  # cannot tell; busybox-static is the usual provider of /bin/busybox
    return subprocess.run(["file", "-L", str(path)], capture_output=True, check=False).stdout


def test_bundle_cycle_without_secrets(tmp_path: Path) -> None:
    key_line = make_data_dir(tmp_path / "cmsg")
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "gatehouse-support.tar.gz"
    args = {
        "dest": str(dest),
        "data_dir": str(tmp_path / "cmsg"),
        "extra_paths": [str(tmp_path / "broker")],
        "collect_containers": False,
    }
    check = run_module("support_bundle", args, check=True, diff=True)
    assert check.changed and not check.failed, check.result
    assert check.result["diff"]["before"]["exists"] is False
    assert list(out.iterdir()) == []

    real = run_module("support_bundle", args)
    assert real.changed and not real.failed, real.result
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    members = archive_members(dest)
    blob = b"\n".join(members.values())
    for secret in (*SECRETS, key_line):
        assert secret.encode() not in blob, secret
        assert secret not in real.stdout
    top = "gatehouse-support/files"
    config = members[f"{top}{tmp_path}/cmsg/data/config.properties"].decode()
    assert "SslKey=/certs/key.pem" in config and "ExternalPcoipIp=192.0.2.10" in config
    assert members[f"{top}{tmp_path}/cmsg/data/cmsg.env"].decode() == (
        "GATEHOUSE_GRANTSECRET=[REDACTED]\nGATEHOUSE_LOGLEVEL=info\n"
    )
    assert not any(name.endswith("key.pem") or name.endswith("broker.db") for name in members)
    manifest = json.loads(members["gatehouse-support/manifest.json"])
    assert str(tmp_path / "broker" / "broker.db") in [s["path"] for s in manifest["skipped"]]
    assert manifest["redaction_rule"][0].startswith("1. PEM private key blocks")

    archive_bytes = dest.read_bytes()
    again_check = run_module("support_bundle", args, check=True)
    assert not again_check.changed, again_check.result
    again = run_module("support_bundle", args)
    assert not again.changed, again.result
    assert dest.read_bytes() == archive_bytes

    forced = run_module("support_bundle", dict(args, force=True))
    assert forced.changed
    assert sorted(p.name for p in out.iterdir()) == ["gatehouse-support.tar.gz"]


@pytest.mark.docker
def test_container_state_and_logs_redacted(tmp_path: Path, labelled_container: tuple[str, str]) -> None:
    label, name = labelled_container
    make_data_dir(tmp_path / "cmsg")
    dest = tmp_path / "bundle.tar.gz"
    args = {"dest": str(dest), "data_dir": str(tmp_path / "cmsg"), "container_label": label}
    check = run_module("support_bundle", args, check=True)
    assert check.changed and not dest.exists()
    assert f"bundle/containers/{name}/logs.txt" in check.result["members"]

    real = run_module("support_bundle", args)
    assert real.changed and not real.failed, real.result
    assert [c["name"] for c in real.result["containers"]] == [name]
    assert real.result["containers"][0]["role"] == "cm"
    members = archive_members(dest)
    blob = b"\n".join(members.values())
    for secret in SECRETS:
        assert secret.encode() not in blob, secret
    logs = members[f"bundle/containers/{name}/logs.txt"].decode()
    assert "cm starting, grant secret loaded: [REDACTED]" in logs
    assert "Authorization: [REDACTED]" in logs
    assert "CONNECT [REDACTED]" in logs
    inspect = json.loads(members[f"bundle/containers/{name}/inspect.json"])
    assert "GATEHOUSE_GRANTSECRET=[REDACTED]" in inspect["Config"]["Env"]
    versions = json.loads(members["bundle/versions.json"])
    assert versions["docker"]["Version"]
    assert not run_module("support_bundle", args, check=True).changed
    assert not run_module("support_bundle", args).changed
