"""gatehouse.access.broker through ansible against the local Docker engine.

check -> real -> idempotent check -> idempotent real; the admin API answers with the token given;
the database survives state=absent and goes with purge=true.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collection_helpers import run_module
from deploy_helpers import (
    cleanup,
    docker_client,
    free_port,
    objects_named,
    require_service_images,
    unique_prefix,
)

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "admin-" + "x" * 30
AGENT = "agent-" + "y" * 30


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


def test_bad_tokens_change_nothing(env) -> None:
    _cli, prefix, tmp_path = env
    args = {"admin_token": "short", "agent_token": "short", "self_signed": True}
    args.update(data_dir=str(tmp_path / "broker"), name_prefix=prefix)
    run = run_module("broker", args)
    assert run.failed
    assert any("admin_token must be at least 16" in e for e in run.result["errors"])
    assert any("must differ" in e for e in run.result["errors"])
    assert "short" not in json.dumps(run.result.get("invocation", {}))
    assert not (tmp_path / "broker").exists()


def test_cycle(env) -> None:
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    data_dir = tmp_path / "broker"
    port = free_port()
    args = {
        "admin_token": ADMIN,
        "agent_token": AGENT,
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
        assert ADMIN not in run.stdout and AGENT not in run.stdout

    assert stat.S_IMODE((data_dir / "data" / "broker.env").stat().st_mode) == 0o600
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
    assert admin_get(port, "/api/v1/domains", AGENT)[0] == 401
    assert (data_dir / "data" / "broker.db").exists()

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
