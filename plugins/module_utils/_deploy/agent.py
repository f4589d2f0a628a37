# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the agent module: the test desktops (gatehouse/agent, a desktop agent stand-in) of a host.

One container ``<prefix>-agent-<name>`` per entry of ``instances``, each with its own
``agent.properties`` in ``<data_dir>/<name>/data`` (mounted at /data) and its certificate, key and
the deployment CA from ``<data_dir>/pki``, where gatehouse.access.node_certificates writes them
(``<name>.pem``, ``<name>.key``, ``ca.pem``; mounted one by one at /certs, so that an agent sees
no other agent's key). Everything goes through the deploy engine.

Invariants: the rendered files depend only on the options (same options, same bytes); a
container's spec hash covers its properties, certificate, key and CAs, so a reissued certificate or
a new CA recreates exactly the containers that read it; the certificates are read, never written:
a missing one fails the module before anything is changed.
"""

from __future__ import annotations

import os
import re

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    PlannedDir,
    PlannedFile,
    read_bytes,
    remove_paths,
    sha256,
)
from ansible_collections.gatehouse.access.plugins.module_utils._crypto.node_pki import NAME_PATTERN
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

MANAGED_BY = "gatehouse.access.agent"
SERVICE = "agent"
PROPERTIES = "agent.properties"
PKI = "pki"
CA = "ca.pem"
CONTROL_PORT, SESSION_PORT, ADMIN_PORT, CAPACITY = 60443, 4172, 9182, 10
PORT_KEYS = ("control_port", "session_port", "admin_port")
# Inside the container (gatehouse/agent).
DATA_TARGET, CERTS_TARGET = "/data", "/certs"
# Files of the earlier layout (certificates copied into <name>/certs, a load-report token): removed.
_OLD_CERTS = ("cert.pem", "key.pem", "ca.pem", "broker-ca.pem")
_OLD_DATA = ("agent.env",)
_URL_RE = re.compile(r"^https?://[^/\s]+(/\S*)?$")
_PRINTABLE_RE = re.compile(r"^[\x21-\x7e]*$")

INSTANCE_SPEC: dict = {
    "name": {"type": "str", "required": True},
    "hostname": {"type": "str"},
    "advertise_address": {"type": "str"},
    "control_port": {"type": "int", "default": CONTROL_PORT},
    "session_port": {"type": "int", "default": SESSION_PORT},
    "admin_port": {"type": "int", "default": ADMIN_PORT},
    "capacity": {"type": "int", "default": CAPACITY},
}
ARGUMENT_SPEC: dict = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "instances": {"type": "list", "elements": "dict", "required": True, "options": INSTANCE_SPEC},
    "data_dir": {"type": "path", "default": "/opt/gatehouse/agent"},
    "host_address": {"type": "str", "default": ""},
    "broker_url": {"type": "str", "default": ""},
    "broker_ca_cert": {"type": "path"},
    "broker_tls_verify": {"type": "bool", "default": True},
    "client_tls_verify": {"type": "bool", "default": True},
    "report_interval": {"type": "int", "default": 10},
    "session_tag_ttl": {"type": "int", "default": 60},
    "log_level": dep.COMMON_ARGUMENT_SPEC["log_level"],
    "image_tag": dep.COMMON_ARGUMENT_SPEC["image_tag"],
    "image_source": dep.COMMON_ARGUMENT_SPEC["image_source"],
    "registry": dep.COMMON_ARGUMENT_SPEC["registry"],
    "network_mode": dep.COMMON_ARGUMENT_SPEC["network_mode"],
    "host_label": dep.COMMON_ARGUMENT_SPEC["host_label"],
    "name_prefix": dep.COMMON_ARGUMENT_SPEC["name_prefix"],
    "docker_host": dep.COMMON_ARGUMENT_SPEC["docker_host"],
    "wait_timeout": dep.COMMON_ARGUMENT_SPEC["wait_timeout"],
    "container_limits": dep.COMMON_ARGUMENT_SPEC["container_limits"],
}
REQUIRED_IF = [("image_source", "registry", ["registry"])]


def container_name(prefix: str, name: str) -> str:
    return "%s-agent-%s" % (prefix, name)


def pki_paths(data_dir: str, name: str) -> tuple[str, str, str]:
    """(certificate, key, CA) of an agent, as gatehouse.access.node_certificates writes them."""
    pki = os.path.join(data_dir, PKI)
    return os.path.join(pki, name + ".pem"), os.path.join(pki, name + ".key"), os.path.join(pki, CA)


# ------------------------------------------------------------------ validation


def validate(params: dict) -> None:
    """Check every option; raises dep.ValidationError listing all problems."""
    errors: list[str] = []
    dep.check_place(params, "agent", errors)
    names = [entry["name"] for entry in params["instances"]]
    if not names:
        errors.append("instances is empty; name at least one agent")
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append("instances names %s more than once" % name)
    for name in names:
        if not re.match(NAME_PATTERN, name) or name == PKI:
            errors.append(
                "instances: %r is not a valid agent name (letters, digits, '.', '_' or '-'; not %s)"
                % (name, PKI)
            )
    if params["state"] == "absent":
        if errors:
            raise dep.ValidationError(errors)
        return
    # Every agent of a host listens in one network namespace, or publishes its ports on the host's.
    owners: dict = {}
    for entry in params["instances"]:
        name = entry["name"]
        for key in PORT_KEYS:
            dep.port_option(entry[key], "instances %s: %s" % (name, key), errors)
            if entry[key] in owners:
                errors.append(
                    "instances %s: %s %d is taken by %s" % (name, key, entry[key], owners[entry[key]])
                )
            owners.setdefault(entry[key], "%s (%s)" % (name, key))
        if entry["capacity"] < 1:
            errors.append("instances %s: capacity must be at least 1, got %d" % (name, entry["capacity"]))
        for key in ("hostname", "advertise_address"):
            if entry[key] is not None and not (entry[key] and _PRINTABLE_RE.match(entry[key])):
                errors.append("instances %s: %s must be a host name or address without spaces" % (name, key))
    if not _PRINTABLE_RE.match(params["host_address"]):
        errors.append("host_address must be a host name or address without spaces")
    if params["broker_url"] and not _URL_RE.match(params["broker_url"]):
        errors.append("broker_url must look like https://broker:port, got %r" % params["broker_url"])
    for key in ("report_interval", "session_tag_ttl"):
        if params[key] < 1:
            errors.append("%s must be at least 1 second, got %d" % (key, params[key]))
    dep.check_container_options(params, SERVICE, errors)
    dep.check_image(params, errors)
    if errors:
        raise dep.ValidationError(errors)


def read_certificates(params: dict) -> dict:
    """{name: {cert, key, ca, broker_ca}} contents; raises dep.ValidationError naming every missing file."""
    errors: list[str] = []
    found: dict = {}
    broker_ca = None
    if params["broker_ca_cert"]:
        broker_ca = read_bytes(params["broker_ca_cert"])
        if not broker_ca or b"-----BEGIN CERTIFICATE-----" not in broker_ca:
            errors.append("broker_ca_cert %s is not a readable PEM certificate" % params["broker_ca_cert"])
    for entry in params["instances"]:
        cert, key, ca = pki_paths(params["data_dir"], entry["name"])
        paths = {"cert": cert, "key": key, "ca": ca}
        contents = {kind: read_bytes(path) for kind, path in paths.items()}
        missing = [paths[kind] for kind, data in contents.items() if not data]
        if missing:
            errors.append(
                "agent %s: %s missing; issue its certificate first (gatehouse.access.node_certificates with "
                "directory %s and the entry's name)"
                % (entry["name"], " and ".join(missing), os.path.join(params["data_dir"], PKI))
            )
            continue
        found[entry["name"]] = dict(contents, broker_ca=broker_ca)
    if errors:
        raise dep.ValidationError(errors)
    return found


# ------------------------------------------------------------------ rendering


def advertise_address(params: dict, entry: dict) -> str:
    """The address the agent reports to the broker: its own, or in bridge mode the host's."""
    if entry["advertise_address"]:
        return entry["advertise_address"]
    return params["host_address"] if params["network_mode"] == "bridge" else ""


def properties(params: dict, entry: dict) -> bytes:
    """agent.properties of one agent."""
    lines = [
        "# Written by the gatehouse.access.agent module; changes here are overwritten.",
        "ListenAddress=0.0.0.0",
        "ControlPort=%d" % entry["control_port"],
        "SessionPort=%d" % entry["session_port"],
        # /health and /metrics on the agent's loopback (several agents in one namespace need their own).
        "AdminPort=%d" % entry["admin_port"],
        "SslCert=%s/cert.pem" % CERTS_TARGET,
        "SslKey=%s/key.pem" % CERTS_TARGET,
        "ClientCaCert=%s/ca.pem" % CERTS_TARGET,
        "ClientTlsVerify=%s" % str(params["client_tls_verify"]).lower(),
        "Hostname=%s" % (entry["hostname"] or entry["name"]),
        "AdvertiseAddress=%s" % advertise_address(params, entry),
        "BrokerUrl=%s" % params["broker_url"],
        "BrokerCaCert=%s/%s" % (CERTS_TARGET, "broker-ca.pem" if params["broker_ca_cert"] else "ca.pem"),
        "BrokerTlsVerify=%s" % str(params["broker_tls_verify"]).lower(),
        "ReportInterval=%d" % params["report_interval"],
        "SessionTagTtl=%d" % params["session_tag_ttl"],
        "Capacity=%d" % entry["capacity"],
        "LogLevel=%s" % params["log_level"],
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def container_spec(params: dict, entry: dict, image: str, host_label: str) -> dict:
    data_dir, name = params["data_dir"], entry["name"]
    cert, key, ca = pki_paths(data_dir, name)
    mounts = [
        {"source": os.path.join(data_dir, name, engine.DATA), "target": DATA_TARGET, "read_only": True},
        {"source": cert, "target": CERTS_TARGET + "/cert.pem", "read_only": True},
        {"source": key, "target": CERTS_TARGET + "/key.pem", "read_only": True},
        {"source": ca, "target": CERTS_TARGET + "/ca.pem", "read_only": True},
    ]
    if params["broker_ca_cert"]:
        mounts.append(
            {"source": params["broker_ca_cert"], "target": CERTS_TARGET + "/broker-ca.pem", "read_only": True}
        )
    mode = params["network_mode"]
    ports = []
    if mode == "bridge":
        ports = [
            {"host": entry["control_port"], "container": entry["control_port"], "protocol": "tcp"},
            {"host": entry["session_port"], "container": entry["session_port"], "protocol": "tcp"},
            {"host": entry["session_port"], "container": entry["session_port"], "protocol": "udp"},
        ]
    return {
        "service": SERVICE,
        "name": container_name(params["name_prefix"], name),
        "image": image,
        "command": ["--config", "%s/%s" % (DATA_TARGET, PROPERTIES)],
        "labels": {ctr.LABEL_ROLE: SERVICE, ctr.LABEL_HOST: host_label, ctr.LABEL_MANAGED: MANAGED_BY},
        "mounts": mounts,
        "network_mode": mode,
        "network": None,
        "ports": ports,
        "restart_policy": "unless-stopped",
        "container_limits": params.get("container_limits"),
        "stop_timeout": 10,
    }


# ------------------------------------------------------------------ driver


def run(module) -> dict:
    return engine.run_by_state(module, validate, install, uninstall)


def uninstall(cli, params: dict, check_mode: bool) -> dict:
    """Remove the containers, then the files the module and node_certificates wrote for these agents."""
    data_dir = params["data_dir"]
    names = [entry["name"] for entry in params["instances"]]
    removed_containers = [
        container_name(params["name_prefix"], n)
        for n in names
        if ctr.remove_container(cli, container_name(params["name_prefix"], n), check_mode)
    ]
    files = [os.path.join(data_dir, engine.COMPOSE)]
    dirs = []
    for name in names:
        files.append(os.path.join(data_dir, name, engine.DATA, PROPERTIES))
        files += [os.path.join(data_dir, name, engine.DATA, old) for old in _OLD_DATA]
        files += [os.path.join(data_dir, name, engine.CERTS, old) for old in _OLD_CERTS]
        files += list(pki_paths(data_dir, name)[:2])
        dirs += [os.path.join(data_dir, name, sub) for sub in (engine.DATA, engine.CERTS)]
        dirs.append(os.path.join(data_dir, name))
    files.append(os.path.join(data_dir, PKI, CA))
    dirs += [os.path.join(data_dir, PKI), data_dir]
    removed, left = remove_paths(files, dirs, check_mode)
    warnings = []
    if left:
        warnings.append("kept %s: files not written by %s are never deleted" % (", ".join(left), MANAGED_BY))
    return {
        "changed": bool(removed_containers or removed),
        "containers": [{"name": n, "action": "removed"} for n in removed_containers],
        "changed_files": removed,
        "left_behind": left,
        "warnings_list": warnings,
    }


def install(module, cli, params: dict) -> dict:
    check_mode = module.check_mode
    data_dir = params["data_dir"]
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings: list[str] = []
    engine.check_network_target(cli, params, errors)
    try:
        certificates = read_certificates(params)
    except dep.ValidationError as exc:
        errors += exc.errors
        certificates = {}
    # gatehouse/agent is a test image: local or registry, not the dark-site bundle.
    refs, ids, loaded = engine.resolve_images(
        cli, dict(params, bundle_path=None), [SERVICE], check_mode, errors
    )
    if errors:
        raise dep.ValidationError(errors)
    uid, gid = engine.service_owner()
    if uid is None:
        warnings.append(engine.NOT_ROOT % "the agents run")
    files, containers = [], []
    dirs = [PlannedDir(data_dir, 0o755)]
    stale = []
    for entry in params["instances"]:
        name = entry["name"]
        data = os.path.join(data_dir, name, engine.DATA)
        dirs += [PlannedDir(os.path.join(data_dir, name), 0o755), PlannedDir(data, 0o750, uid, gid)]
        rendered = properties(params, entry)
        files.append(PlannedFile(os.path.join(data, PROPERTIES), rendered, 0o644, uid, gid))
        # The container reads its own files only (they share base names with the other agents').
        inputs = {"properties": sha256(rendered)}
        inputs.update((kind, sha256(content)) for kind, content in certificates[name].items() if content)
        containers.append(
            engine.Container(
                container_spec(params, entry, refs[SERVICE], host_label), reads=(), inputs=inputs
            )
        )
        old = [os.path.join(data, n) for n in _OLD_DATA]
        old += [os.path.join(data_dir, name, engine.CERTS, n) for n in _OLD_CERTS]
        # Never show the content of an old key (or token) in a diff.
        stale += [(path, "(removed)") for path in old if os.path.exists(path)]
    deployment = engine.Deployment(data_dir, files, dirs, containers, ids, loaded, stale_files=stale)
    deployment.plan(cli)
    deployment.apply(cli, check_mode, params["wait_timeout"])
    config = {
        "data_dir": data_dir,
        "image": refs[SERVICE],
        "network_mode": params["network_mode"],
        "host_label": host_label,
        "agents": [
            {
                "name": entry["name"],
                "container": container_name(params["name_prefix"], entry["name"]),
                "hostname": entry["hostname"] or entry["name"],
                "advertise_address": advertise_address(params, entry),
                "control_port": entry["control_port"],
                "session_port": entry["session_port"],
            }
            for entry in params["instances"]
        ],
    }
    return deployment.result(config, warnings)
