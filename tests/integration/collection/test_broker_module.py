"""gatehouse.access.broker through ansible against the local Docker engine.

check -> real -> idempotent check -> idempotent real; the admin API answers with the token given;
the client CA is rendered (verification on by default; off only explicitly, with a warning); the
database survives state=absent and goes with purge=true.
"""

from __future__ import annotations

import json
import ssl
import stat
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from deploy_helpers import (
    cleanup,
    docker_client,
    objects_named,
    require_service_images,
    unique_prefix,
)
from services import free_port
from tls_material import Chain, pem, write

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "admin-" + "x" * 30
OTHER = "other-" + "y" * 30


@pytest.fixture
def env(tmp_path: Path):
    cli = docker_client()
    prefix = unique_prefix("broker")
    try:
        yield cli, prefix, tmp_path
    finally:
        cleanup(cli, prefix)


def admin_get(port: int, path: str, token: str) -> tuple[int, object]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the broker's certificate is self-signed in this test
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_bad_options_change_nothing(env) -> None:
    _cli, prefix, tmp_path = env
    args = {"admin_token": "short", "self_signed": True}
    args.update(data_dir=str(tmp_path / "broker"), name_prefix=prefix)
    run = run_module("broker", args)
    assert run.failed
    assert any("admin_token must be at least 16" in e for e in run.result["errors"])
    # Client verification is on by default and needs the deployment CA.
    assert any("client_ca_cert is required with client_tls_verify=true" in e for e in run.result["errors"])
    assert "short" not in json.dumps(run.result.get("invocation", {}))
    assert not (tmp_path / "broker").exists()
    run = run_module("broker", dict(args, admin_token=ADMIN, client_ca_cert=str(tmp_path / "none.pem")))
    assert run.failed and any("client_ca_cert" in e and "does not exist" in e for e in run.result["errors"])
    assert not (tmp_path / "broker").exists()


def test_verification_off_is_explicit_and_warned(env) -> None:
    _cli, prefix, tmp_path = env
    args = {"admin_token": ADMIN, "self_signed": True, "client_tls_verify": False}
    args.update(data_dir=str(tmp_path / "broker"), name_prefix=prefix)
    run = run_module("broker", args, check=True)
    assert not run.failed, run.result
    assert any("client_tls_verify=false" in w for w in run.warnings)
    assert run.result["config"]["broker_properties"]["ClientTlsVerify"] == "false"
    assert run.result["config"]["broker_properties"]["ClientCaCert"] == ""


def test_cycle(env) -> None:
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    data_dir = tmp_path / "broker"
    port = free_port()
    ca = write(tmp_path / "deployment-ca.pem", pem(Chain().root))
    args = {
        "admin_token": ADMIN,
        "client_ca_cert": str(ca),
        "domains": ["CORP", "LAB"],
        "self_signed": True,
        "data_dir": str(data_dir),
        "name_prefix": prefix,
        "https_port": port,
        "host_label": "broker1",
    }
    check = run_module("broker", args, check=True, diff=True)
    assert check.changed and not check.failed, check.result
    assert not data_dir.exists() and objects_named(cli, prefix) == []

    real = run_module("broker", args, diff=True)
    assert real.changed and not real.failed, real.result
    assert not run_module("broker", args, check=True).changed
    again = run_module("broker", args, diff=True)
    assert not again.changed, again.result
    for run in (check, real, again):
        assert ADMIN not in run.stdout
        assert not any("client_tls_verify" in w for w in run.warnings)

    assert stat.S_IMODE((data_dir / "data" / "broker.env").stat().st_mode) == 0o600
    assert "AGENTTOKEN" not in (data_dir / "data" / "broker.env").read_text()
    props = real.result["config"]["broker_properties"]
    assert props["ClientCaCert"] == "/certs/client-ca.pem" and props["ClientTlsVerify"] == "true"
    assert (data_dir / "certs" / "client-ca.pem").read_bytes() == ca.read_bytes()
    container = cli.containers.get(f"{prefix}-broker")
    assert container.labels["gatehouse.role"] == "broker" and container.labels["gatehouse.host"] == "broker1"
    assert not any(ADMIN in e for e in container.attrs["Config"]["Env"] or [])

    status, body = None, None
    for _attempt in range(40):
        try:
            status, body = admin_get(port, "/api/v1/domains", ADMIN)
            break
        except OSError:
            time.sleep(0.5)
    assert status == 200, body
    assert "LAB" in json.dumps(body)
    assert admin_get(port, "/api/v1/domains", OTHER)[0] == 401
    assert (data_dir / "data" / "broker.db").exists()

    # A change: check mode predicts exactly what the real run then does (diff, files, containers).
    # The management listener published on the host's loopback (bridge mode): /metrics answers there.
    metrics_port = free_port()
    changed_args = dict(args, log_level="debug", admin_host_port=metrics_port)
    predicted = run_module("broker", changed_args, check=True, diff=True)
    applied = run_module("broker", changed_args, diff=True)
    assert predicted.changed and applied.changed and not applied.failed, applied.result
    assert predicted.result["diff"], predicted.result
    for key in ("diff", "changed_files", "containers"):
        assert predicted.result[key] == applied.result[key], key
    assert applied.result["config"]["broker_properties"]["AdminAddress"] == "0.0.0.0"
    bindings = cli.containers.get(f"{prefix}-broker").attrs["HostConfig"]["PortBindings"]["9181/tcp"]
    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(metrics_port)}]
    metrics = ""
    for _attempt in range(40):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                metrics = response.read().decode()
            break
        except OSError:
            time.sleep(0.5)
    assert "gatehouse_tls_certificate_expiry_timestamp_seconds" in metrics

    absent = {"state": "absent", "data_dir": str(data_dir), "name_prefix": prefix}
    gone = run_module("broker", absent)
    assert gone.changed and not gone.failed, gone.result
    assert objects_named(cli, prefix) == []
    assert (data_dir / "data" / "broker.db").exists(), "the database must survive state=absent"
    assert not (data_dir / "data" / "broker.env").exists()
    assert any("purge=true" in w for w in gone.warnings)

    purged = run_module("broker", dict(absent, purge=True))
    assert purged.changed and not purged.failed, purged.result
    assert not data_dir.exists()


def test_admin_address_is_rendered_only_when_set(env) -> None:
    """Unset keeps the broker's default (127.0.0.1) and the file of earlier versions; set, it is AdminAddress."""
    _cli, prefix, tmp_path = env
    args = {"admin_token": ADMIN, "self_signed": True, "client_tls_verify": False}
    args.update(data_dir=str(tmp_path / "broker"), name_prefix=prefix)
    unset = run_module("broker", args, check=True)
    assert not unset.failed, unset.result
    assert "AdminAddress" not in unset.result["config"]["broker_properties"]
    opened = run_module("broker", dict(args, admin_address="0.0.0.0"), check=True)
    assert opened.result["config"]["broker_properties"]["AdminAddress"] == "0.0.0.0"
    bad = run_module("broker", dict(args, admin_address="everywhere"), check=True)
    assert bad.failed and any("admin_address 'everywhere'" in e for e in bad.result["errors"])
    published = run_module("broker", dict(args, admin_host_port=19181), check=True)
    assert published.result["config"]["broker_properties"]["AdminAddress"] == "0.0.0.0"
    for wrong, message in (
        (
            {"admin_host_port": 19181, "network_mode": "host"},
            "admin_host_port is only used with network_mode=bridge",
        ),
        ({"admin_host_port": 443}, "admin_host_port 443 is https_port as well"),
        ({"admin_host_port": 70000}, "admin_host_port must be between 1 and 65535"),
    ):
        refused = run_module("broker", dict(args, **wrong), check=True)
        assert refused.failed and any(message in e for e in refused.result["errors"]), refused.result
