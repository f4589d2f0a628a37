"""gatehouse.access.monitoring through ansible against the local Docker engine.

A real security gateway runs from source on the host's loopback; the module deploys a real
Prometheus (gatehouse/prometheus, host network mode) that scrapes it with the collection's alert
rules. check -> real -> idempotent check and real; Prometheus' HTTP API shows the target up, the
SG's certificate expiry gauge and the rules loaded; when the SG stops, GatehouseSecurityGatewayDown
becomes pending; a change is predicted exactly by check mode; state=absent keeps the time series
unless purge=true.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, run_module
from deploy_helpers import IMAGE_TAG, cleanup, docker_client, objects_named, unique_prefix
from services import free_port, start_sg

pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(600)]

RULES = (REPO_ROOT / "roles" / "monitoring" / "files" / "gatehouse-alerts.yml").read_text()
# Ansible templates ad-hoc arguments; the rules' own {{ $labels }} templates must reach the module
# as they are (the role passes a lookup result, which Ansible does not template again).
RULES_ARG = "{% raw %}" + RULES + "{% endraw %}"


@pytest.fixture
def env(tmp_path: Path):
    cli = docker_client()
    try:
        cli.images.get(f"gatehouse/prometheus:{IMAGE_TAG}")
    except Exception:
        pytest.skip(f"gatehouse/prometheus:{IMAGE_TAG} is not built yet (make images)")
    prefix = unique_prefix("monitoring")
    try:
        yield cli, prefix, tmp_path
    finally:
        cleanup(cli, prefix)


def api(port: int, path: str, timeout: float = 5, **query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, probe, timeout: float = 60):
    """probe() until it returns something true; its last answer is in the failure message."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s (last answer {last!r})")


def test_bad_options_change_nothing(env) -> None:
    _cli, prefix, tmp_path = env
    args = {
        "targets": {"sg": ["10.0.0.1"], "cm": ["[fd00::1]:9180", "10.0.0.1:99999"]},
        "scrape_interval": "fast",
        "alert_rules": "not: rules",
        "data_dir": str(tmp_path / "monitoring"),
        "name_prefix": prefix,
    }
    run = run_module("monitoring", args)
    assert run.failed
    errors = run.result["errors"]
    assert any("targets.sg: '10.0.0.1' needs a port" in e for e in errors), errors
    assert any("targets.cm: '10.0.0.1:99999' has an invalid port" in e for e in errors), errors
    assert not any("fd00::1" in e for e in errors), errors
    assert any("scrape_interval 'fast'" in e for e in errors), errors
    assert any("alert_rules is not a Prometheus rules file" in e for e in errors), errors
    assert not (tmp_path / "monitoring").exists()
    run = run_module("monitoring", {"data_dir": str(tmp_path / "monitoring"), "name_prefix": prefix})
    assert run.failed and any("targets names no target" in e for e in run.result["errors"])


def test_cycle(env, pki, processes) -> None:
    cli, prefix, tmp_path = env
    sg = start_sg(pki, tmp_path / "sg", "sg-monitoring", base64.b64encode(os.urandom(32)).decode())
    processes.append(sg)
    sg_target = f"127.0.0.1:{sg.config['AdminPort']}"
    data_dir = tmp_path / "monitoring"
    port = free_port()
    args = {
        "targets": {"sg": [sg_target]},
        "alert_rules": RULES_ARG,
        "scrape_interval": "1s",
        "evaluation_interval": "1s",
        "port": port,
        "listen_address": "127.0.0.1",
        "data_dir": str(data_dir),
        "name_prefix": prefix,
        "host_label": "mon1",
        # Small, so the slow-client attack below needs few connections and little time.
        "max_connections": 8,
        "read_timeout": "2s",
    }
    check = run_module("monitoring", args, check=True, diff=True)
    assert check.changed and not check.failed, check.result
    assert not data_dir.exists() and objects_named(cli, prefix) == []
    assert any(d["after_header"].endswith("prometheus.yml") for d in check.result["diff"])

    real = run_module("monitoring", args, diff=True)
    assert real.changed and not real.failed, real.result
    assert real.result["containers"] == [{"name": f"{prefix}-prometheus", "action": "create"}]
    for key in ("diff", "changed_files"):
        assert check.result[key] == real.result[key], key
    assert not run_module("monitoring", args, check=True).changed
    assert not run_module("monitoring", args).changed
    assert real.result["config"]["jobs"] == {"gatehouse-sg": [sg_target]}
    assert real.result["config"]["url"] == f"http://127.0.0.1:{port}"
    assert (data_dir / "data" / "alerts.yml").read_text() == RULES
    container = cli.containers.get(f"{prefix}-prometheus")
    assert container.labels["gatehouse.role"] == "prometheus" and container.labels["gatehouse.host"] == "mon1"
    assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]

    # The real Prometheus scrapes the real SG and has loaded every rule.
    up = wait_for(
        "the SG target up",
        lambda: [
            r for r in api(port, "query", query='up{job="gatehouse-sg"}')["result"] if r["value"][1] == "1"
        ],
    )
    assert up[0]["metric"]["instance"] == sg_target
    expiry = wait_for(
        "the SG's certificate expiry",
        lambda: api(port, "query", query="gatehouse_tls_certificate_expiry_timestamp_seconds")["result"],
    )
    not_after = x509.load_pem_x509_certificate(sg.identity.cert.read_bytes()).not_valid_after_utc
    assert float(expiry[0]["value"][1]) == not_after.timestamp()
    loaded = {rule["name"] for group in api(port, "rules")["groups"] for rule in group["rules"]}
    assert {
        "GatehouseSecurityGatewayDown",
        "GatehouseCertificateExpiresSoon",
        "GatehouseVipOnNoNode",
    } <= loaded
    # The test CA's leaves are valid for days, not months: the expiry alert fires, and nothing else.
    firing = wait_for("the certificate alert", lambda: api(port, "alerts")["alerts"])
    assert [(a["labels"]["alertname"], a["state"]) for a in firing] == [
        ("GatehouseCertificateExpiresSoon", "firing")
    ]
    assert firing[0]["labels"]["instance"] == sg_target

    # Attack: 24 clients (3x max_connections) open the API and trickle a request they never finish.
    # Each is disconnected within read_timeout; the API answers a real query meanwhile, and the
    # scraping (outgoing connections) never stops.
    slow = []
    for _i in range(24):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /api/v1/query?query=up HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        started = time.monotonic()
        assert api(port, "query", query='up{job="gatehouse-sg"}', timeout=20)["result"][0]["value"][1] == "1"
        answered = time.monotonic() - started
        for sock in slow:
            sock.settimeout(20)
            while sock.recv(4096):
                pass
        print(f"API answered after {answered:.1f} s with 24 slow clients held")
    finally:
        for sock in slow:
            sock.close()

    # The SG stops: its alert is pending within seconds (for: 30s keeps it from firing at once).
    sg.stop()
    alert = wait_for(
        "GatehouseSecurityGatewayDown pending",
        lambda: [
            a
            for a in api(port, "alerts")["alerts"]
            if a["labels"]["alertname"] == "GatehouseSecurityGatewayDown"
        ],
        timeout=30,
    )
    assert alert[0]["state"] in ("pending", "firing")
    assert alert[0]["labels"]["instance"] == sg_target

    # Rules Prometheus would refuse: promtool of the image says so, nothing is replaced.
    running = cli.containers.get(f"{prefix}-prometheus").id
    broken = RULES_ARG.replace('expr: up{job="gatehouse-sg"} == 0', 'expr: up{job="gatehouse-sg"} ==', 1)
    assert broken != RULES_ARG
    refused = run_module("monitoring", dict(args, alert_rules=broken))
    assert refused.failed and not refused.changed, refused.result
    assert "promtool refused the new configuration" in refused.result["msg"], refused.result["msg"]
    assert cli.containers.get(f"{prefix}-prometheus").id == running
    assert (data_dir / "data" / "alerts.yml").read_text() == RULES
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".promtool-check-")]
    assert objects_named(cli, prefix) == [f"{prefix}-prometheus"]

    # A change: check mode predicts exactly what the real run then does.
    changed_args = dict(args, retention="2d", alertmanagers=["127.0.0.1:9093"])
    predicted = run_module("monitoring", changed_args, check=True, diff=True)
    applied = run_module("monitoring", changed_args, diff=True)
    assert predicted.changed and applied.changed and not applied.failed, applied.result
    for key in ("diff", "changed_files", "containers"):
        assert predicted.result[key] == applied.result[key], key
    assert applied.result["containers"] == [{"name": f"{prefix}-prometheus", "action": "recreate"}]
    assert "--storage.tsdb.retention.time=2d" in cli.containers.get(f"{prefix}-prometheus").attrs["Args"]

    absent = {"state": "absent", "data_dir": str(data_dir), "name_prefix": prefix}
    assert run_module("monitoring", absent, check=True).changed
    assert objects_named(cli, prefix) == [f"{prefix}-prometheus"]
    gone = run_module("monitoring", absent)
    assert gone.changed and not gone.failed, gone.result
    assert objects_named(cli, prefix) == []
    assert (data_dir / "tsdb").is_dir() and not (data_dir / "data" / "prometheus.yml").exists()
    assert any("purge=true" in w for w in gone.warnings)
    purged = run_module("monitoring", dict(absent, purge=True))
    assert purged.changed and not purged.failed, purged.result
    assert not data_dir.exists()
    assert not run_module("monitoring", dict(absent, purge=True)).changed
