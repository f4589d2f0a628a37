# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the broker module: deploy, configure and remove a connection broker.

The broker keeps its SQLite database in ``data/broker.db``; it survives upgrades and
``state=absent`` unless ``purge`` is set. The admin token comes in as a (no_log) option and is
written to ``data/broker.env`` (0600), which the broker reads with ``--env-file``. Connection
managers and agents authenticate with their certificates from the deployment CA
(``client_ca_cert``, copied to ``certs/client-ca.pem``), not with a token.
"""

from __future__ import annotations

import os
import re

from ansible_collections.gatehouse.access.plugins.module_utils import _containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils import _deploy as dep
from ansible_collections.gatehouse.access.plugins.module_utils._files import (
    PlannedDir,
    PlannedFile,
    mask_env_values,
    remove_paths,
    sha256,
)

TOKEN_KEYS = {"GATEHOUSE_ADMINTOKEN"}
CLIENT_CA = "client-ca.pem"
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

ARGUMENT_SPEC: dict = dict(
    dep.COMMON_ARGUMENT_SPEC,
    admin_token={"type": "str", "no_log": True},
    client_ca_cert={"type": "path"},
    client_tls_verify={"type": "bool", "default": True},
    domains={"type": "list", "elements": "str", "default": ["CORP"]},
    data_dir={"type": "path", "default": "/opt/gatehouse/broker"},
    https_port={"type": "int", "default": 443},
    purge={"type": "bool", "default": False},
)
REQUIRED_IF = [*dep.COMMON_REQUIRED_IF, ("state", "present", ["admin_token"])]
DB_FILES = ("broker.db", "broker.db-wal", "broker.db-shm", "broker.db-journal")


def validate(params: dict) -> list[str]:
    """Check every option; returns the warnings or raises dep.ValidationError listing all problems."""
    errors: list[str] = []
    warnings: list[str] = []
    dep.check_common(params, errors)
    if params["state"] == "present":
        dep.check_token(params["admin_token"], "admin_token", errors)
        if params["client_tls_verify"] and not params["client_ca_cert"]:
            errors.append(
                "client_ca_cert is required with client_tls_verify=true: give the CA that issued the connection "
                "managers' and agents' certificates (the deployment CA), or set client_tls_verify=false "
                "(tests only)"
            )
        if not params["client_tls_verify"]:
            warnings.append(
                "client_tls_verify=false: the broker does not check the certificates of connection managers "
                "and agents; anyone who reaches its port can send load reports and use the broker protocol"
            )
        if not params["domains"]:
            errors.append("domains needs at least one domain (the first one is the default)")
        for domain in params["domains"]:
            if not _DOMAIN_RE.match(domain):
                errors.append("domain %r may only hold letters, digits, '.', '_' and '-'" % domain)
        if len(set(d.upper() for d in params["domains"])) != len(params["domains"]):
            errors.append("domains lists a domain twice")
        dep.port_option(params["https_port"], "https_port", errors)
    if params["purge"] and params["state"] != "absent":
        errors.append("purge is only used with state=absent (it deletes the broker database)")
    if errors:
        raise dep.ValidationError(errors)
    return warnings


def broker_properties(params: dict) -> bytes:
    return dep.render_properties(
        "Connection broker configuration; AdminToken comes from broker.env",
        [
            ("ListenAddress", "0.0.0.0"),
            ("ListenPort", 8443),
            ("SslCert", "/certs/cert.pem"),
            ("SslKey", "/certs/key.pem"),
            ("ClientCaCert", "/certs/" + CLIENT_CA if params["client_ca_cert"] else ""),
            ("ClientTlsVerify", params["client_tls_verify"]),
            ("Database", "/data/broker.db"),
            ("Domains", params["domains"]),
            ("LogLevel", params["log_level"]),
        ],
    )


def broker_env(params: dict) -> bytes:
    return (
        "GATEHOUSE_ADMINTOKEN=%s\nGATEHOUSE_LOGLEVEL=%s\n" % (params["admin_token"], params["log_level"])
    ).encode("utf-8")


def container_spec(params: dict, image: str, host_label: str) -> dict:
    data_dir = params["data_dir"]
    mode = params["network_mode"]
    return {
        "service": "broker",
        "name": "%s-broker" % params["name_prefix"],
        "image": image,
        "command": ["--config", "/data/broker.properties", "--env-file", "/data/broker.env"],
        "labels": {
            ctr.LABEL_ROLE: "broker",
            ctr.LABEL_HOST: host_label,
            ctr.LABEL_MANAGED: "gatehouse.access.broker",
        },
        # data/ is writable: the SQLite database lives there.
        "mounts": [
            {"source": os.path.join(data_dir, "data"), "target": "/data", "read_only": False},
            {"source": os.path.join(data_dir, "certs"), "target": "/certs", "read_only": True},
        ],
        "network_mode": mode,
        "network": None,
        "ports": [{"host": params["https_port"], "container": 8443, "protocol": "tcp"}]
        if mode == "bridge"
        else [],
        "restart_policy": "unless-stopped",
        "container_limits": params.get("container_limits"),
    }


def run(module) -> dict:
    params = module.params
    try:
        warnings = validate(params)
    except dep.ValidationError as exc:
        module.fail_json(msg="invalid options: " + "; ".join(exc.errors), errors=exc.errors)
    cli = ctr.client(params["docker_host"])
    if params["state"] == "absent":
        return uninstall(cli, params, module.check_mode)
    result = install(module, cli, params, module.check_mode)
    result["warnings_list"] = warnings + result["warnings_list"]
    return result


def uninstall(cli, params: dict, check_mode: bool) -> dict:
    name = "%s-broker" % params["name_prefix"]
    removed_container = ctr.remove_container(cli, name, check_mode)
    data_dir = params["data_dir"]
    data, certs_dir = os.path.join(data_dir, "data"), os.path.join(data_dir, "certs")
    files = [os.path.join(data_dir, "docker-compose.yaml")]
    files += [os.path.join(data, n) for n in ("broker.properties", "broker.env")]
    files += [os.path.join(certs_dir, n) for n in ("cert.pem", "key.pem", "ca.pem", CLIENT_CA)]
    if params["purge"]:
        files += [os.path.join(data, n) for n in DB_FILES]
    removed, left = remove_paths(files, [data, certs_dir, data_dir], check_mode)
    result = {
        "changed": bool(removed_container or removed),
        "containers": [{"name": name, "action": "removed"}] if removed_container else [],
        "changed_files": removed,
        "left_behind": left,
        "warnings_list": [],
    }
    kept_db = [p for p in left if os.path.basename(p) in DB_FILES or p == data]
    if kept_db and not params["purge"]:
        result["warnings_list"].append(
            "kept the broker database in %s (users, desktops, entitlements); set purge=true to delete it"
            % data
        )
    elif left:
        result["warnings_list"].append(
            "kept %s: files not written by gatehouse.access.broker are never deleted" % ", ".join(left)
        )
    return result


def install(module, cli, params: dict, check_mode: bool) -> dict:
    data_dir = params["data_dir"]
    data, certs_dir = os.path.join(data_dir, "data"), os.path.join(data_dir, "certs")
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings: list[str] = []
    common_name = dep.certificate_name(host_label)
    tls, tls_info = dep.tls_files(params, certs_dir, common_name, [], errors, warnings)
    client_ca = dep.extra_file(
        params["client_ca_cert"], os.path.join(certs_dir, CLIENT_CA), "client_ca_cert", errors
    )
    if params["network_mode"].startswith("container:"):
        target = params["network_mode"].split(":", 1)[1]
        if not ctr.container_exists(cli, target):
            errors.append(
                "network_mode %s: there is no container %s on the Docker host"
                % (params["network_mode"], target)
            )
    registry = params["registry"] if params["image_source"] == "registry" else None
    ref = ctr.image_ref("broker", params["image_tag"], registry)
    loaded: list[str] = []
    image = None
    try:
        if params["bundle_path"] and ctr.image_id(cli, ref) is None:
            loaded = dep.load_bundle(cli, params["bundle_path"], check_mode)
        if not (check_mode and params["bundle_path"] and ctr.image_id(cli, ref) is None):
            image, pulled = ctr.ensure_image(cli, ref, params["image_source"] == "registry", check_mode)
            loaded += [ref] if pulled else []
    except ctr.ContainerError as exc:
        errors.append(str(exc))
    if errors:
        module.fail_json(msg="invalid options: " + "; ".join(errors), errors=errors)

    uid, gid = ctr.SERVICE_UID, ctr.SERVICE_GID
    if os.geteuid() != 0:
        uid = gid = None
        warnings.append("not running as root: files keep the current owner; the broker runs as uid 10001")
    spec = container_spec(params, ref, host_label)
    files = [
        PlannedFile(os.path.join(data_dir, "docker-compose.yaml"), dep.render_compose([spec], None), 0o644),
        PlannedFile(os.path.join(data, "broker.properties"), broker_properties(params), 0o644, uid, gid),
        PlannedFile(
            os.path.join(data, "broker.env"),
            broker_env(params),
            0o600,
            uid,
            gid,
            mask=mask_env_values(TOKEN_KEYS),
        ),
        *tls,
    ]
    if client_ca is not None:
        files.append(client_ca)
    dirs = [
        PlannedDir(data_dir, 0o755),
        PlannedDir(data, 0o750, uid, gid),
        PlannedDir(certs_dir, 0o750, uid, gid),
    ]
    inputs = {
        os.path.basename(f.path): sha256(f.data) for f in files if not f.path.endswith("docker-compose.yaml")
    }
    inputs["image"] = image
    desired = ctr.spec_hash(spec, inputs)
    action = "create" if image is None else ctr.container_plan(cli, spec, desired)
    changed_files = [f.path for f in files if f.changed] + [d.path for d in dirs if d.changed]
    changed = bool(changed_files or action != "none" or loaded)
    if changed and not check_mode:
        for d in dirs:
            if d.changed:
                d.apply()
        for f in files:
            if f.changed:
                f.apply()
        try:
            ctr.converge_container(cli, spec, desired, action, params["wait_timeout"])
        except ctr.ContainerError as exc:
            module.fail_json(msg=str(exc), changed=True, changed_files=changed_files)
    props = {}
    for line in files[1].data.decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _sep, value = line.partition("=")
            props[key] = value
    return {
        "changed": changed,
        "changed_files": changed_files,
        "containers": [{"name": spec["name"], "action": action}] if action != "none" else [],
        "images_loaded": loaded,
        "config": {
            "broker_properties": props,
            "data_dir": data_dir,
            "database": os.path.join(data, "broker.db"),
            "network_mode": params["network_mode"],
            "image": ref,
            "host_label": host_label,
            "tls": tls_info,
        },
        "diff": [f.diff() for f in files if f.changed],
        "warnings_list": warnings,
    }
