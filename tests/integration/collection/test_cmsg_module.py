"""gatehouse.access.cmsg through ansible against the local Docker engine.

check -> real -> idempotent check -> idempotent real, then the real state (files, modes,
containers, labels, network), a reconfiguration, LAN mode, and state=absent leaving nothing.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from deploy_helpers import (
    cleanup,
    docker_client,
    free_cidr,
    objects_named,
    require_service_images,
    unique_prefix,
)
from services import free_port
from tls_material import Chain, certificate, key_pem, pem, rsa_key, write

pytestmark = [pytest.mark.docker, pytest.mark.images]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read_props(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _sep, value = line.partition("=")
            result[key] = value
    return result


@pytest.fixture
def env(tmp_path: Path):
    cli = docker_client()
    prefix = unique_prefix("cmsg")
    try:
        yield cli, prefix, tmp_path
    finally:
        cleanup(cli, prefix)


def base_args(cli, prefix: str, tmp_path: Path) -> dict:
    ca = tmp_path / "deployment-ca.pem"
    if not ca.exists():
        write(ca, pem(Chain().root))
    return {
        "agent_ca_cert": str(ca),
        "accept_policies": True,
        "broker_url": "https://broker.gatehouse.test:8443",
        "external_pcoip_ip": ["192.0.2.10"],
        "host_address": ["cmsg1.gatehouse.test"],
        "self_signed": True,
        "data_dir": str(tmp_path / "cmsg"),
        "name_prefix": prefix,
        "docker_network_cidr": free_cidr(cli),
        "https_port": free_port(),
        "http_port": free_port(),
        "pcoip_port": free_port(),
        "host_label": "node1",
        "max_connections": 2500,
        "wait_timeout": 90,
    }


def test_bad_options_change_nothing(env) -> None:
    cli, prefix, tmp_path = env
    cert = certificate(rsa_key(3072, slot=0), "cmsg1.gatehouse.test")
    cert_path = write(tmp_path / "cert.pem", pem(cert))
    other_key = write(tmp_path / "key.pem", key_pem(rsa_key(3072, slot=1)), 0o600)
    args = base_args(cli, prefix, tmp_path)
    args.update(self_signed=False, ssl_cert=str(cert_path), ssl_key=str(other_key))
    run = run_module("cmsg", args)
    assert run.failed and "does not match certificate" in run.result["msg"]
    assert not (tmp_path / "cmsg").exists()
    assert objects_named(cli, prefix) == []

    args = base_args(cli, prefix, tmp_path)
    args.update(external_pcoip_ip=[], accept_policies=False)
    run = run_module("cmsg", args)
    assert run.failed
    assert any("accept_policies must be true" in e for e in run.result["errors"])
    assert any("external_pcoip_ip needs" in e for e in run.result["errors"])
    assert not (tmp_path / "cmsg").exists()

    # A CIDR that overlaps a network of this host (the default bridge's, or a host interface).
    bridge = cli.networks.get("bridge").attrs["IPAM"]["Config"][0]["Subnet"]
    args = base_args(cli, prefix, tmp_path)
    args["docker_network_cidr"] = bridge
    run = run_module("cmsg", args)
    assert run.failed and "overlaps networks of this host" in run.result["msg"]
    assert not (tmp_path / "cmsg").exists()


def test_cycle(env) -> None:
    cli, prefix, tmp_path = env
    require_service_images(cli, "cm", "sg")
    args = base_args(cli, prefix, tmp_path)
    data_dir = tmp_path / "cmsg"

    check = run_module("cmsg", args, check=True, diff=True)
    assert not check.failed, check.result
    assert check.changed
    assert {c["name"]: c["action"] for c in check.result["containers"]} == {
        f"{prefix}-cm": "create",
        f"{prefix}-sg": "create",
    }
    assert not data_dir.exists(), "check mode wrote files"
    assert objects_named(cli, prefix) == [], "check mode created Docker objects"

    real = run_module("cmsg", args, diff=True)
    assert not real.failed, real.result
    assert real.changed
    assert not any("tls_verify" in w for w in real.warnings), real.warnings
    secret = (data_dir / "data" / "cmsg.env").read_text().split("GATEHOUSE_GRANTSECRET=")[1].split("\n")[0]
    assert len(secret) >= 40

    again_check = run_module("cmsg", args, check=True, diff=True)
    assert not again_check.failed, again_check.result
    assert not again_check.changed, again_check.result
    again = run_module("cmsg", args, diff=True)
    assert not again.changed, again.result
    for run in (check, real, again_check, again):
        assert secret not in run.stdout and secret not in run.stderr

    # Files and modes.
    for name in ("docker-compose.yaml", "data/config.properties", "data/SecurityGateway.conf"):
        assert (data_dir / name).is_file()
    assert mode(data_dir / "data" / "cmsg.env") == 0o600
    assert mode(data_dir / "certs" / "key.pem") == 0o600
    assert (data_dir / "data" / "cmsg.env").stat().st_uid == 10001
    props = read_props(data_dir / "data" / "config.properties")
    assert props["ExternalPcoipIp"] == "192.0.2.10"
    assert props["BrokerUrl"] == args["broker_url"]
    assert props["AgentCaCert"] == "/certs/agent-ca.pem" and props["AgentTlsVerify"] == "true"
    assert props["SecurityGatewayHealthUrl"] == f"http://{prefix}-sg:9172/health"
    assert (data_dir / "certs" / "agent-ca.pem").read_bytes() == Path(args["agent_ca_cert"]).read_bytes()
    sg_conf = read_props(data_dir / "data" / "SecurityGateway.conf")
    assert sg_conf["AgentCaCert"] == "/certs/agent-ca.pem" and sg_conf["AgentTlsVerify"] == "true"
    assert read_props(data_dir / "data" / "SecurityGateway.conf")["MaxConnections"] == "2500"
    assert real.result["config"]["security_gateway_conf"]["MaxConnections"] == "2500"

    # Containers, labels, network.
    cm = cli.containers.get(f"{prefix}-cm")
    sg = cli.containers.get(f"{prefix}-sg")
    for container, role in ((cm, "cm"), (sg, "sg")):
        assert container.status == "running"
        assert container.labels["gatehouse.role"] == role
        assert container.labels["gatehouse.host"] == "node1"
        assert len(container.labels["gatehouse.spec-hash"]) == 64
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts["/data"]["Source"] == str(data_dir / "data") and mounts["/data"]["RW"] is False
        assert mounts["/certs"]["RW"] is False
        assert not any(secret in e for e in container.attrs["Config"]["Env"] or [])
    network = cli.networks.get(f"{prefix}-cmsg")
    assert network.attrs["IPAM"]["Config"][0]["Subnet"] == args["docker_network_cidr"]
    assert cm.attrs["HostConfig"]["PortBindings"]["8443/tcp"][0]["HostPort"] == str(args["https_port"])
    assert sg.attrs["HostConfig"]["PortBindings"]["4172/udp"][0]["HostPort"] == str(args["pcoip_port"])

    # configure: a gateway limit touches only the gateway; the grant secret is kept.
    args["max_connections"] = 100
    predicted = run_module("cmsg", args, check=True, diff=True)
    reconf = run_module("cmsg", args, diff=True)
    assert reconf.changed and not reconf.failed, reconf.result
    # Check mode predicts the change exactly: the same diff, files and containers as the real run.
    for key in ("diff", "changed_files", "containers", "network"):
        assert predicted.result[key] == reconf.result[key], key
    assert reconf.result["changed_files"] == [str(data_dir / "data" / "SecurityGateway.conf")]
    assert [c["name"] for c in reconf.result["containers"]] == [f"{prefix}-sg"]
    assert cli.containers.get(f"{prefix}-cm").id == cm.id
    assert cli.containers.get(f"{prefix}-sg").id != sg.id
    assert secret in (data_dir / "data" / "cmsg.env").read_text()
    diff_text = repr(reconf.result["diff"])
    assert "MaxConnections=2500" in diff_text and "MaxConnections=100" in diff_text

    # The CM's internal identity: only the CM is recreated; the key is 0600 and never shown.
    key = rsa_key(3072, slot=3)
    ident = dict(
        args,
        identity_cert=str(write(tmp_path / "cm.pem", pem(certificate(key, "cmsg1.gatehouse.test")))),
        identity_key=str(write(tmp_path / "cm.key", key_pem(key), 0o600)),
    )
    cm = cli.containers.get(f"{prefix}-cm")
    sg = cli.containers.get(f"{prefix}-sg")
    with_identity = run_module("cmsg", ident, diff=True)
    assert with_identity.changed and not with_identity.failed, with_identity.result
    assert [c["name"] for c in with_identity.result["containers"]] == [f"{prefix}-cm"]
    assert cli.containers.get(f"{prefix}-sg").id == sg.id
    assert mode(data_dir / "certs" / "identity-key.pem") == 0o600
    assert "PRIVATE KEY" not in with_identity.stdout
    props = read_props(data_dir / "data" / "config.properties")
    assert (
        props["IdentityCert"] == "/certs/identity.pem" and props["IdentityKey"] == "/certs/identity-key.pem"
    )
    assert not run_module("cmsg", ident).changed
    args = ident

    # Turning agent verification off is explicit and warned about.
    unverified = dict(args, agent_tls_verify=False)
    unverified.pop("agent_ca_cert")
    off = run_module("cmsg", unverified, check=True)
    assert off.changed and not off.failed, off.result
    assert any("agent_tls_verify=false" in w for w in off.warnings)
    missing = run_module("cmsg", dict(unverified, agent_tls_verify=True), check=True)
    assert missing.failed and "agent_ca_cert is required" in missing.result["msg"]

    # LAN mode: the gateway container goes away.
    lan = dict(args, enable_security_gateway=False, external_pcoip_ip=[])
    lan_run = run_module("cmsg", lan)
    assert lan_run.changed and not lan_run.failed, lan_run.result
    assert f"{prefix}-sg" not in objects_named(cli, prefix)
    assert read_props(data_dir / "data" / "config.properties")["SecurityGatewayEnabled"] == "false"
    assert not run_module("cmsg", lan).changed

    # Uninstall: check mode first, then for real; nothing is left.
    absent = {"state": "absent", "data_dir": str(data_dir), "name_prefix": prefix}
    absent_check = run_module("cmsg", absent, check=True)
    assert absent_check.changed and data_dir.exists()
    gone = run_module("cmsg", absent)
    assert gone.changed and not gone.failed, gone.result
    assert not data_dir.exists()
    assert objects_named(cli, prefix) == []
    assert not run_module("cmsg", absent).changed


def test_container_network_mode(env) -> None:
    """network_mode container:<name>: the services share the network namespace of a host container."""
    cli, prefix, tmp_path = env
    require_service_images(cli, "cm", "sg")
    host = cli.containers.run(
        "gatehouse/base:0.1.0", ["sleep", "3600"], name=f"{prefix}-host1", detach=True, network_mode="none"
    )
    args = base_args(cli, prefix, tmp_path)
    args.update(network_mode=f"container:{host.name}", host_label="host1")
    run = run_module("cmsg", args)
    assert run.changed and not run.failed, run.result
    assert run.result["config"]["network"] is None
    for role in ("cm", "sg"):
        container = cli.containers.get(f"{prefix}-{role}")
        assert container.attrs["HostConfig"]["NetworkMode"] in (
            f"container:{host.name}",
            f"container:{host.id}",
        )
        assert container.labels["gatehouse.host"] == "host1"
    assert f"{prefix}-cmsg" not in objects_named(cli, prefix), "no network is created outside bridge mode"
    assert not run_module("cmsg", args).changed

    # A missing host container is an option error, not a Docker error half-way through.
    bad = dict(args, network_mode=f"container:{prefix}-nope", data_dir=str(tmp_path / "other"))
    failed = run_module("cmsg", bad)
    assert failed.failed and "there is no container" in failed.result["msg"]
    assert not (tmp_path / "other").exists()

    gone = run_module("cmsg", {"state": "absent", "data_dir": args["data_dir"], "name_prefix": prefix})
    assert gone.changed and not gone.failed, gone.result
    assert objects_named(cli, prefix) == [f"{prefix}-host1"]


def test_bundle_path_refuses_unverified_image_archives(env, tmp_path: Path) -> None:
    """``docker save`` archives without the bundle's SHA256SUMS and manifest load nothing (a real
    bundle's checks and loading are in test_bundle_roundtrip.py)."""
    import subprocess
    import tarfile

    from collection_helpers import ensure_importable

    ensure_importable()
    from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as _deploy
    from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import ContainerError

    cli, prefix, _tmp = env
    tag = f"{prefix}-tiny:1"
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    subprocess.run(["docker", "import", str(empty), tag], check=True, capture_output=True)
    (tmp_path / "bundle").mkdir()
    archive = tmp_path / "bundle" / "images.tar"
    subprocess.run(["docker", "save", tag, "-o", str(archive)], check=True)
    with tarfile.open(tmp_path / "bundle.tar.gz", "w:gz") as bundle:
        bundle.add(tmp_path / "bundle", arcname="bundle")
    cli.images.remove(tag)
    try:
        for source in (tmp_path / "bundle.tar.gz", tmp_path / "bundle", archive):
            for check_mode in (True, False):
                with pytest.raises(ContainerError, match=f"bundle_path {source}: "):
                    _deploy.load_bundle(cli, str(source), check_mode=check_mode)
            assert not cli.images.list(name=tag), f"{source.name} loaded an image"
    finally:
        for image in cli.images.list(name=tag):
            cli.images.remove(image.id, force=True)


def served_certificate(port: int, server_name: str) -> bytes:
    """The DER certificate the service on 127.0.0.1:``port`` presents for ``server_name`` (SNI)."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as conn:
            return conn.getpeercert(binary_form=True)


def test_tenant_files_are_reloaded_not_recreated(env) -> None:
    """A tenant's own certificate, key and broker CA (docs/tenants.md): copied into certs/ and named
    in tenants.json; renewing the certificate or removing the tenant rewrites the files and signals
    both services (SIGHUP) - the containers stay, and the CM presents the renewed certificate."""
    cli, prefix, tmp_path = env
    require_service_images(cli, "cm", "sg")
    data_dir = tmp_path / "cmsg"
    b_name = "desktops.tenant-b.gatehouse.test"

    def own_pair(slot: int) -> tuple[str, str, bytes]:
        key = rsa_key(3072, slot=slot)
        cert = certificate(key, b_name)
        cert_path = write(tmp_path / f"b-{slot}.pem", pem(cert))
        key_path = write(tmp_path / f"b-{slot}.key", key_pem(key), 0o600)
        return str(cert_path), str(key_path), cert.public_bytes(serialization.Encoding.DER)

    b_cert, b_key, b_der = own_pair(20)
    broker_ca = write(tmp_path / "b-broker-ca.pem", pem(Chain().root))
    a = {
        "name": "tenant-a",
        "host_names": ["desktops.tenant-a.gatehouse.test"],
        "broker_url": "https://10.31.0.10:8443",
    }
    b = {
        "name": "tenant-b",
        "host_names": [b_name],
        "broker_url": "https://10.32.0.10:8443",
        "ssl_cert": b_cert,
        "ssl_key": b_key,
        "broker_ca_cert": str(broker_ca),
    }
    args = base_args(cli, prefix, tmp_path)
    args.update(broker_url=None, tenants=[a, b])
    first = run_module("cmsg", args)
    assert first.changed and not first.failed, first.result
    certs = data_dir / "certs"
    assert (certs / "tenant.tenant-b.cert.pem").read_bytes() == Path(b_cert).read_bytes()
    assert mode(certs / "tenant.tenant-b.key.pem") == 0o600
    assert (certs / "tenant.tenant-b.broker-ca.pem").read_bytes() == broker_ca.read_bytes()
    entry = {t["name"]: t for t in json.loads((data_dir / "data" / "tenants.json").read_text())}["tenant-b"]
    assert (entry["ssl_cert"], entry["ssl_key"], entry["broker_ca_cert"]) == (
        "/certs/tenant.tenant-b.cert.pem",
        "/certs/tenant.tenant-b.key.pem",
        "/certs/tenant.tenant-b.broker-ca.pem",
    )
    assert not run_module("cmsg", args).changed
    ids = {role: cli.containers.get(f"{prefix}-{role}").id for role in ("cm", "sg")}
    assert wait_until(lambda: served_certificate(args["https_port"], b_name) == b_der)
    assert served_certificate(args["https_port"], a["host_names"][0]) != b_der

    # Renewed: check mode predicts the two files and no container; the real run reloads.
    renewed_cert, renewed_key, renewed_der = own_pair(21)
    renewed = dict(args, tenants=[a, dict(b, ssl_cert=renewed_cert, ssl_key=renewed_key)])
    predicted = run_module("cmsg", renewed, check=True, diff=True)
    real = run_module("cmsg", renewed, diff=True)
    assert real.changed and not real.failed, real.result
    for key in ("changed_files", "containers", "diff"):
        assert predicted.result[key] == real.result[key], key
    assert sorted(real.result["changed_files"]) == [
        str(certs / "tenant.tenant-b.cert.pem"),
        str(certs / "tenant.tenant-b.key.pem"),
    ]
    assert real.result["containers"] == []
    assert "PRIVATE KEY" not in real.stdout
    assert {role: cli.containers.get(f"{prefix}-{role}").id for role in ids} == ids
    assert wait_until(lambda: served_certificate(args["https_port"], b_name) == renewed_der)
    assert not run_module("cmsg", renewed).changed

    # Tenant B removed: its files go, the containers stay.
    only_a = dict(args, tenants=[a])
    removed = run_module("cmsg", only_a)
    assert removed.changed and not removed.failed, removed.result
    assert removed.result["containers"] == []
    assert sorted(p.name for p in certs.glob("tenant.*")) == []
    assert {role: cli.containers.get(f"{prefix}-{role}").id for role in ids} == ids
    assert wait_until(lambda: served_certificate(args["https_port"], b_name) != renewed_der)
    assert not run_module("cmsg", only_a).changed
    for role in ("cm", "sg"):
        assert "tenants reloaded" in cli.containers.get(f"{prefix}-{role}").logs().decode()


def wait_until(predicate, attempts: int = 40, interval: float = 0.25) -> bool:
    """Poll a state the services reach after a signal or a start (a bounded wait, not a timing check)."""
    for _attempt in range(attempts):
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(interval)
    return False
