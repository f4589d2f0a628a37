# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the monitoring module: deploy, configure and remove the Prometheus server of Gatehouse.

Prometheus (gatehouse/prometheus, Debian's package) scrapes the management listeners of the
brokers, CMs and SGs (``/metrics`` on AdminAddress:AdminPort), the HALB nodes' metrics frontend
and, once there is one, the database cluster; it evaluates the alert rules given as
``alert_rules``. Everything goes through the deploy engine: ``data/prometheus.yml`` and
``data/alerts.yml`` are written atomically and mounted read-only at /etc/prometheus, the time
series live in ``tsdb/`` (mounted at /prometheus), and the container is recreated when either
file, its spec or its image changes.

Invariants: one job per kind of target, named ``gatehouse-<kind>`` (the alert rules select on
these names); the rendered files depend only on the options (same options, same bytes); the time
series database survives ``state=absent`` unless ``purge`` is set. Before the container is
created or replaced, ``promtool check config`` of the new image checks the new files (staged, so a
refused configuration leaves the running Prometheus and its files as they were).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    PlannedDir,
    PlannedFile,
    read_bytes,
    write_atomic,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

MANAGED_BY = "gatehouse.access.monitoring"
SERVICE = "prometheus"
PORT = 9090
# The kinds of targets, in the order of the scrape configuration; the job of a kind is "gatehouse-<kind>".
TARGET_KINDS = ("broker", "cm", "sg", "halb", "postgresql")
CONFIG, RULES = "prometheus.yml", "alerts.yml"
# The CA of the HTTPS targets (ca_cert), beside the configuration; the kinds scraped over HTTPS with it.
CA = "ca.pem"
HTTPS_KINDS = ("postgresql",)
TSDB = "tsdb"
# Inside the container (gatehouse/prometheus).
CONFIG_DIR, TSDB_DIR = "/etc/prometheus", "/prometheus"
_DURATION_RE = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9.-]{1,253}$")

ARGUMENT_SPEC: dict = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "targets": {
        "type": "dict",
        "default": {},
        "options": {kind: {"type": "list", "elements": "str", "default": []} for kind in TARGET_KINDS},
    },
    "alert_rules": {"type": "str"},
    "ca_cert": {"type": "path"},
    "alertmanagers": {"type": "list", "elements": "str", "default": []},
    "scrape_interval": {"type": "str", "default": "15s"},
    "evaluation_interval": {"type": "str", "default": "15s"},
    "retention": {"type": "str", "default": "15d"},
    "max_connections": {"type": "int", "default": 64},
    "read_timeout": {"type": "str", "default": "10s"},
    "listen_address": {"type": "str", "default": "0.0.0.0"},
    "port": {"type": "int", "default": PORT},
    "data_dir": {"type": "path", "default": "/opt/gatehouse/monitoring"},
    "purge": {"type": "bool", "default": False},
    "image_tag": dep.COMMON_ARGUMENT_SPEC["image_tag"],
    "image_source": dep.COMMON_ARGUMENT_SPEC["image_source"],
    "registry": dep.COMMON_ARGUMENT_SPEC["registry"],
    "network_mode": {"type": "str", "default": "host"},
    "host_label": dep.COMMON_ARGUMENT_SPEC["host_label"],
    "name_prefix": dep.COMMON_ARGUMENT_SPEC["name_prefix"],
    "docker_host": dep.COMMON_ARGUMENT_SPEC["docker_host"],
    "wait_timeout": dep.COMMON_ARGUMENT_SPEC["wait_timeout"],
    "container_limits": dep.COMMON_ARGUMENT_SPEC["container_limits"],
}
REQUIRED_IF = [("image_source", "registry", ["registry"])]


def container_name(prefix: str) -> str:
    return "%s-prometheus" % prefix


# ------------------------------------------------------------------ validation


def parse_target(value: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[IPv6]:port``; ValueError says what is wrong."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        address = dep.parse_ip(host)
        if not sep or address is None or address.version != 6 or not rest.startswith(":"):
            raise ValueError("write an IPv6 target as [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("needs a port (host:port, or [IPv6]:port)")
        if not _HOST_RE.match(host):
            raise ValueError("has no valid host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("has an invalid port %r" % port_text)
    return host, int(port_text)


def validate(params: dict) -> None:
    """Check every option; raises dep.ValidationError listing all problems."""
    errors: list[str] = []
    dep.check_place(params, "monitoring", errors)
    if params["state"] == "absent":
        if errors:
            raise dep.ValidationError(errors)
        return
    if params["purge"]:
        errors.append("purge is only used with state=absent (it deletes the time series database)")
    targets = params["targets"] or {}
    if not any(targets.get(kind) for kind in TARGET_KINDS):
        errors.append("targets names no target; give the management endpoints (host:port) to scrape")
    for kind in TARGET_KINDS:
        seen = set()
        for value in targets.get(kind) or []:
            try:
                parse_target(value)
            except ValueError as exc:
                errors.append("targets.%s: %r %s" % (kind, value, exc))
            if value.strip() in seen:
                errors.append("targets.%s lists %s twice" % (kind, value))
            seen.add(value.strip())
    for value in params["alertmanagers"]:
        try:
            parse_target(value)
        except ValueError as exc:
            errors.append("alertmanagers: %r %s" % (value, exc))
    if not 1 <= params["max_connections"] <= 4096:
        errors.append("max_connections must be between 1 and 4096, got %d" % params["max_connections"])
    for name in ("scrape_interval", "evaluation_interval", "retention", "read_timeout"):
        if not _DURATION_RE.match(params[name]):
            errors.append("%s %r is not a Prometheus duration (like 15s, 1m or 15d)" % (name, params[name]))
    if dep.parse_ip(params["listen_address"].strip()) is None:
        errors.append(
            "listen_address %r must be an IP address (0.0.0.0 = every address)" % params["listen_address"]
        )
    dep.port_option(params["port"], "port", errors)
    if params["alert_rules"] is not None and "groups:" not in params["alert_rules"]:
        errors.append("alert_rules is not a Prometheus rules file (it has no groups:)")
    dep.check_container_options(params, SERVICE, errors)
    dep.check_image(params, errors)
    if errors:
        raise dep.ValidationError(errors)


# ------------------------------------------------------------------ rendering


# A HALB node serves two documents on its metrics frontend: HAProxy's exporter and its VRRP state.
EXTRA_JOBS = {"halb": [("gatehouse-halb-vrrp", "/vrrp")]}


def scrape_jobs(params: dict) -> list[tuple[str, str, list[str], bool]]:
    """(job name, metrics path, targets, over HTTPS) of the kinds that have targets, in TARGET_KINDS
    order. With ca_cert the HTTPS_KINDS are scraped over HTTPS, verified against it."""
    targets = params["targets"] or {}
    out = []
    for kind in TARGET_KINDS:
        found = [t.strip() for t in targets.get(kind) or []]
        https = bool(params.get("ca_cert")) and kind in HTTPS_KINDS
        if found:
            out.append(("gatehouse-%s" % kind, "/metrics", found, https))
            out.extend((job, path, found, https) for job, path in EXTRA_JOBS.get(kind, []))
    return out


def jobs(params: dict) -> dict:
    """{job name: [targets]} as the module returns them."""
    return {job: targets for job, _path, targets, _https in scrape_jobs(params)}


def scrape_config(job: str, path: str, targets: list[str], https: bool) -> dict:
    config: dict = {"job_name": job, "metrics_path": path, "static_configs": [{"targets": targets}]}
    if https:
        config["scheme"] = "https"
        config["tls_config"] = {"ca_file": "%s/%s" % (CONFIG_DIR, CA)}
    return config


def prometheus_yml(params: dict) -> bytes:
    """prometheus.yml: the intervals, the rules file, the Alertmanagers and one job per kind of target."""
    document: dict = {
        "global": {
            "scrape_interval": params["scrape_interval"],
            "evaluation_interval": params["evaluation_interval"],
        },
        "rule_files": ["%s/%s" % (CONFIG_DIR, RULES)] if params["alert_rules"] is not None else [],
    }
    if params["alertmanagers"]:
        document["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [a.strip() for a in params["alertmanagers"]]}]}]
        }
    document["scrape_configs"] = [scrape_config(*job) for job in scrape_jobs(params)]
    header = (
        "# Prometheus configuration of Gatehouse (docs/monitoring.md).\n"
        "# Written by the gatehouse.access.monitoring module; changes here are overwritten.\n"
    )
    return (header + dep.to_yaml(document) + "\n").encode("utf-8")


def listen(params: dict) -> str:
    address = params["listen_address"].strip()
    host = "[%s]" % address if ":" in address else address
    return "%s:%d" % (host, PORT if params["network_mode"] == "bridge" else params["port"])


def container_spec(params: dict, image: str, host_label: str) -> dict:
    data_dir = params["data_dir"]
    mode = params["network_mode"]
    return {
        "service": SERVICE,
        "name": container_name(params["name_prefix"]),
        "image": image,
        "command": [
            "--config.file=%s/%s" % (CONFIG_DIR, CONFIG),
            "--storage.tsdb.path=%s" % TSDB_DIR,
            "--storage.tsdb.retention.time=%s" % params["retention"],
            "--web.listen-address=%s" % listen(params),
            # Prometheus' own defaults (512 connections, 5 minutes to send a request) let a few
            # slow clients hold the API for minutes; these bound what one client can hold.
            "--web.max-connections=%d" % params["max_connections"],
            "--web.read-timeout=%s" % params["read_timeout"],
        ],
        "labels": {ctr.LABEL_ROLE: SERVICE, ctr.LABEL_HOST: host_label, ctr.LABEL_MANAGED: MANAGED_BY},
        "mounts": [
            {"source": os.path.join(data_dir, engine.DATA), "target": CONFIG_DIR, "read_only": True},
            {"source": os.path.join(data_dir, TSDB), "target": TSDB_DIR, "read_only": False},
        ],
        "network_mode": mode,
        "network": None,
        "ports": [{"host": params["port"], "container": PORT, "protocol": "tcp"}] if mode == "bridge" else [],
        "restart_policy": "unless-stopped",
        "container_limits": params.get("container_limits"),
        # Prometheus writes its head block on SIGTERM; without it the next start replays the WAL.
        "stop_timeout": 30,
    }


# ------------------------------------------------------------------ driver


CHECK_PREFIX = ".promtool-check-"
CHECK_TIMEOUT = 60


def promtool_check(cli, spec: dict, files: list[PlannedFile], data_dir: str) -> None:
    """``promtool check config`` (which also checks the rule files) on the planned files; raises Failure.

    The files are staged in a fresh directory of data_dir (bind mounts are resolved on the Docker
    host, where data_dir is) and mounted where Prometheus reads them; the stage is removed afterwards.
    """
    for leftover in os.listdir(data_dir) if os.path.isdir(data_dir) else []:
        if leftover.startswith(CHECK_PREFIX):
            shutil.rmtree(os.path.join(data_dir, leftover), ignore_errors=True)
    created = not os.path.isdir(data_dir)
    if created:
        os.makedirs(data_dir, 0o755)
    stage = tempfile.mkdtemp(prefix=CHECK_PREFIX, dir=data_dir)
    passed = False
    try:
        os.chmod(stage, 0o755)  # noqa: S103 - read by the check container's user (no secrets here)
        for planned in files:
            if os.path.dirname(planned.path) == os.path.join(data_dir, engine.DATA):
                write_atomic(
                    os.path.join(stage, os.path.basename(planned.path)), planned.data, 0o644, None, None
                )
        check_spec = dict(
            spec,
            entrypoint=["/usr/bin/promtool"],
            mounts=[{"source": stage, "target": CONFIG_DIR, "read_only": True}],
        )
        status, output = ctr.run_once(
            cli,
            check_spec,
            spec["name"] + "-check",
            ["check", "config", "%s/%s" % (CONFIG_DIR, CONFIG)],
            CHECK_TIMEOUT,
        )
        passed = status == 0
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not passed:
            shutil.rmtree(data_dir, ignore_errors=True)
    if not passed:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        raise Failure(
            "promtool refused the new configuration (%s); the running Prometheus and its files were left "
            "unchanged: %s"
            % (
                "no answer within %d s" % CHECK_TIMEOUT if status is None else "exit code %d" % status,
                "; ".join(lines),
            ),
            promtool=lines,
            changed=False,
        )


def run(module) -> dict:
    return engine.run_by_state(module, validate, install, uninstall)


def uninstall(cli, params: dict, check_mode: bool) -> dict:
    """Remove the container and the files; the time series database only with ``purge``."""
    data_dir = params["data_dir"]
    tsdb = os.path.join(data_dir, TSDB)
    return engine.uninstall(
        cli,
        check_mode,
        data_dir,
        [container_name(params["name_prefix"])],
        data_files=(CONFIG, RULES, CA),
        cert_files=(),
        managed_by=MANAGED_BY,
        kept=([tsdb], "time series database in %s" % tsdb, params["purge"]),
    )


def install(module, cli, params: dict) -> dict:
    check_mode = module.check_mode
    data_dir = params["data_dir"]
    data = os.path.join(data_dir, engine.DATA)
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings: list[str] = []
    engine.check_network_target(cli, params, errors)
    # gatehouse/prometheus is not part of the dark-site bundle: local or registry only.
    refs, ids, loaded = engine.resolve_images(
        cli, dict(params, bundle_path=None), [SERVICE], check_mode, errors
    )
    if errors:
        raise dep.ValidationError(errors)
    uid, gid = engine.service_owner()
    if uid is None:
        warnings.append(engine.NOT_ROOT % "Prometheus runs")
    files = [PlannedFile(os.path.join(data, CONFIG), prometheus_yml(params), 0o644, uid, gid)]
    if params["alert_rules"] is not None:
        files.append(
            PlannedFile(os.path.join(data, RULES), params["alert_rules"].encode("utf-8"), 0o644, uid, gid)
        )
    ca = os.path.join(data, CA)
    if params["ca_cert"]:
        pem = read_bytes(params["ca_cert"])
        if not pem or b"-----BEGIN CERTIFICATE-----" not in pem:
            raise dep.ValidationError(["ca_cert %s is not a readable PEM certificate" % params["ca_cert"]])
        files.append(PlannedFile(ca, pem, 0o644, uid, gid))
    stale = os.path.join(data, RULES)
    dirs = [
        *engine.data_dirs(data_dir, uid, gid),
        # Prometheus (uid 10001) writes its time series here.
        PlannedDir(os.path.join(data_dir, TSDB), 0o750, uid, gid),
    ]
    deployment = engine.Deployment(
        data_dir,
        files,
        dirs,
        [engine.Container(container_spec(params, refs[SERVICE], host_label))],
        ids,
        loaded,
        stale_files=[
            (path, None)
            for path, unused in ((stale, params["alert_rules"] is None), (ca, not params["ca_cert"]))
            if unused and os.path.exists(path)
        ],
    )
    deployment.plan(cli)
    container = deployment.containers[0]
    if not check_mode and container.action in ("create", "recreate"):
        promtool_check(cli, container.spec, files, data_dir)
    deployment.apply(cli, check_mode, params["wait_timeout"])
    address = params["listen_address"].strip()
    url_host = "127.0.0.1" if dep.parse_ip(address).is_unspecified else address
    config = {
        "data_dir": data_dir,
        "image": refs[SERVICE],
        "network_mode": params["network_mode"],
        "jobs": jobs(params),
        "rules": os.path.join(data, RULES) if params["alert_rules"] is not None else None,
        "url": "http://%s:%d" % ("[%s]" % url_host if ":" in url_host else url_host, params["port"]),
        "host_label": host_label,
    }
    return deployment.result(config, warnings)
