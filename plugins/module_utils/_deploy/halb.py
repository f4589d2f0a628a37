# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Converging one HALB node on the deploy engine (private to the collection).

The node is a Deployment without a compose file: the files in config_dir and one container whose
files are all taken up by a Reload, so that a configuration change never recreates it. Order of
a run, so a refused configuration never reaches the node: render -> compare with disk (plan) ->
validate the staged files in a throwaway container (haproxy -c, keepalived -t) -> (not in check
mode) write atomically -> create/start the container, or reload HAProxy / keepalived, or apply
backend states through the runtime API when nothing else of haproxy.cfg changed.
"""

from __future__ import annotations

import os
import re

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    PlannedDir,
    PlannedFile,
    remove_paths,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure, fail
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils._halb import runtime as hd
from ansible_collections.gatehouse.access.plugins.module_utils._halb.render import (
    METRICS_LUA_NAME,
    METRICS_LUA_SOURCE,
    HalbConfigError,
    backend_states,
    backend_weights,
    ca_file,
    cert_file,
    desired_states,
    failover_estimate,
    layout_of,
    normalize,
    render_haproxy,
    render_keepalived,
    runtime_commands,
)


def _read(module, path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        fail(module, "%s: cannot read %s: %s" % (what, path, exc.strerror))
    raise AssertionError("unreachable")


def plan(module, config: dict, config_dir: str) -> tuple[list[PlannedDir], list[PlannedFile], list[str]]:
    """The directories and files this node needs, and stale certificate files of removed virtual servers."""
    certs_dir = os.path.join(config_dir, "haproxy", "certs")
    dirs = [
        PlannedDir(config_dir, 0o755),
        PlannedDir(os.path.join(config_dir, "haproxy"), 0o755),
        PlannedDir(certs_dir, 0o700),
        PlannedDir(os.path.join(config_dir, "keepalived"), 0o755),
        # The entrypoint makes its /run/haproxy 0755; the admin socket in it is 0600.
        PlannedDir(os.path.join(config_dir, "run"), 0o755),
    ]
    files = [
        PlannedFile(
            os.path.join(config_dir, "haproxy", "haproxy.cfg"), render_haproxy(config).encode(), 0o644
        ),
        PlannedFile(
            os.path.join(config_dir, "keepalived", "keepalived.conf"),
            render_keepalived(config).encode(),
            0o644,
        ),
    ]
    metrics_lua = os.path.join(config_dir, "haproxy", METRICS_LUA_NAME)
    if config["metrics_port"]:
        files.append(PlannedFile(metrics_lua, METRICS_LUA_SOURCE.encode(), 0o644))
    raw_by_name = {vs["name"]: vs for vs in module.params["virtual_servers"]}
    for vs in config["virtual_servers"]:
        raw = raw_by_name[vs["name"]]
        if vs["tls"]:
            bundle = _read(module, raw["tls_cert"], "virtual_servers[%s].tls_cert" % vs["name"])
            if raw.get("tls_key"):
                key = _read(module, raw["tls_key"], "virtual_servers[%s].tls_key" % vs["name"])
                bundle = bundle.rstrip(b"\n") + b"\n" + key
            path = os.path.join(certs_dir, os.path.basename(cert_file(vs["name"])))
            files.append(PlannedFile(path, bundle, 0o600, hidden=True))
        if vs["backend_ca"]:
            data = _read(module, raw["backend_ca_file"], "virtual_servers[%s].backend_ca_file" % vs["name"])
            files.append(
                PlannedFile(os.path.join(certs_dir, os.path.basename(ca_file(vs["name"]))), data, 0o644)
            )
    wanted = {f.path for f in files}
    stale: list[str] = []
    if os.path.isdir(certs_dir):
        stale = sorted(
            os.path.join(certs_dir, n)
            for n in os.listdir(certs_dir)
            if n.endswith(".pem") and os.path.join(certs_dir, n) not in wanted
        )
    return dirs, files, stale


def run_present(module) -> dict:
    p = module.params
    try:
        config = normalize(p)
    except HalbConfigError as exc:
        fail(module, str(exc))
    for warning in config["warnings"]:
        module.warn(warning)
    config_dir = os.path.abspath(p["config_dir"])
    try:
        dirs, files, stale = plan(module, config, config_dir)
    except NotADirectoryError as exc:
        fail(module, str(exc))
    try:
        return _converge(module, config, config_dir, dirs, files, stale)
    except (ctr.ContainerError, Failure) as exc:
        fail(module, str(exc))
    raise AssertionError("unreachable")


def image_ref(params: dict) -> str:
    if params.get("image"):
        return params["image"]
    tag = params["image_tag"]
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", tag):
        raise HalbConfigError("image_tag %r is not a valid Docker tag" % tag)
    return "gatehouse/halb:%s" % tag


# What the diff shows for a removed certificate file instead of its content.
REMOVED_BUNDLE = "<certificate bundle>\n"
CREATE_ACTIONS = {
    "none": [],
    "create": ["created container"],
    "recreate": ["removed outdated container", "created container"],
    "start": ["started container"],
}


def _converge(module, config, config_dir, dirs, files, stale) -> dict:
    p = module.params
    try:
        image = image_ref(p)
    except HalbConfigError as exc:
        fail(module, str(exc))
    interface = config["vrrp"]["interface"]
    if p["network_mode"] == "host" and not os.path.exists(os.path.join("/sys/class/net", interface)):
        # The validation container cannot know the host's interfaces; keepalived would exit at start.
        fail(module, "vrrp.interface: the host has no interface %r (network_mode host)" % interface)
    client = ctr.client(p["docker_host"])
    image_id = hd.require_image(client, image)
    spec = hd.container_spec(
        name=p["container_name"],
        image=image,
        host_label=p["host_label"] or config["node_name"],
        config_dir=config_dir,
        network_mode=p["network_mode"],
        ipv4_address=p["ipv4_address"],
        container_limits=p.get("container_limits"),
    )

    def validate(cli, stage: str) -> None:
        ok, message = hd.validate(
            cli, spec, os.path.join(stage, "haproxy"), os.path.join(stage, "keepalived"), interface
        )
        if not ok:
            raise Failure("the rendered configuration was refused; nothing was changed.\n" + message)

    def reload(cli, changed, removed, check_mode: bool) -> list[str]:
        return _reload(module, config, config_dir, cli, spec["name"], changed, removed, check_mode)

    # Every file is taken up by a reload: the spec hash is the spec and the image alone.
    node = engine.Container(
        spec,
        reads=(),
        reload=engine.Reload(apply=reload, validate=validate),
        ready=hd.admin_socket_ready,
    )
    deployment = engine.Deployment(
        config_dir,
        files,
        dirs,
        [node],
        {spec["service"]: image_id},
        [],
        stale_files=[(path, REMOVED_BUNDLE) for path in stale],
        compose=False,
    )
    deployment.plan(client)
    deployment.apply(client, module.check_mode, hd.READY_TIMEOUT)

    changed_files = [f.path for f in files if f.changed]
    actions = ["validated"] if node.reloads else []
    if not module.check_mode:
        if any(d.changed for d in dirs):
            actions.append("set up directories")
        if changed_files or stale:
            actions.append("wrote files")
    actions += CREATE_ACTIONS[node.action] + node.reloaded
    result = dict(
        changed=deployment.changed,
        config_dir=config_dir,
        files_changed=changed_files + stale,
        actions=actions,
        failover_estimate=failover_estimate(config),
        diff=deployment.diff,
    )
    container = ctr.find_container(client, p["container_name"])
    if container is not None and not (module.check_mode and node.action in ("create", "recreate")):
        container.reload()
        result["container"] = dict(name=container.name, id=container.id, status=container.status)
        if container.status == "running":
            vips = [str(i.ip) for i in config["vrrp"]["vip_interfaces"]]
            result["vips_held"] = hd.vips_held(container, config["vrrp"]["interface"], vips)
    else:
        result["container"] = dict(name=p["container_name"], id="", status="absent")
    return result


def _reload(module, config, config_dir, cli, name, changed, removed, check_mode: bool) -> list[str]:
    """The Reload of a kept node: backend states through the runtime API, or reload HAProxy / keepalived."""
    haproxy_path = os.path.join(config_dir, "haproxy", "haproxy.cfg")
    keepalived_path = os.path.join(config_dir, "keepalived", "keepalived.conf")
    by_path = {f.path: f for f in changed}
    haproxy_file = by_path.get(haproxy_path)
    certs_changed = bool(removed) or any(path not in (haproxy_path, keepalived_path) for path in by_path)
    container = ctr.find_container(cli, name)
    actions: list[str] = []
    if haproxy_file is not None or certs_changed:
        old_haproxy = (haproxy_file.before or b"").decode("utf-8", "replace") if haproxy_file else ""
        states_only = (
            haproxy_file is not None
            and not certs_changed
            and layout_of(old_haproxy) is not None
            and layout_of(old_haproxy) == layout_of(haproxy_file.data.decode())
        )
        if states_only:
            actions.extend(_apply_states(module, config, config_dir, container, old_haproxy, check_mode))
        else:
            actions.append("reloaded haproxy")
            if not check_mode:
                hd.reload(container, "haproxy")
    if keepalived_path in by_path:
        actions.append("reloaded keepalived")
        if not check_mode:
            hd.reload(container, "keepalived")
    return actions


def _apply_states(
    module, config: dict, config_dir: str, container, old_haproxy: str, check_mode: bool
) -> list[str]:
    """Backend state changes through the runtime API; a reload if the socket does not answer."""
    before = backend_states(old_haproxy)
    weights = backend_weights(config)
    commands = []
    for key, state in sorted(desired_states(config).items()):
        if before.get(key) != state:
            commands.extend(runtime_commands(key[0], key[1], state, weights[key]))
    actions = ["runtime: %s" % c for c in commands]
    if check_mode:
        return actions
    socket_path = os.path.join(config_dir, "run", "admin.sock")
    try:
        for command in commands:
            answer = hd.runtime_api(socket_path, command)
            if answer:
                raise hd.RuntimeApiError("HAProxy answered %r to %r" % (answer, command))
    except (OSError, hd.RuntimeApiError) as exc:
        module.warn("runtime API failed (%s); reloading HAProxy instead" % exc)
        hd.reload(container, "haproxy")
        return ["reloaded haproxy"]
    return actions


def run_absent(module) -> dict:
    p = module.params
    config_dir = os.path.abspath(p["config_dir"])
    actions: list[str] = []
    changed = False
    try:
        removed_container = ctr.remove_container(
            ctr.client(p["docker_host"]),
            p["container_name"],
            module.check_mode,
            role=hd.ROLE,
            stop_timeout=hd.STOP_TIMEOUT,
        )
    except ctr.ContainerError as exc:
        fail(module, str(exc))
    if removed_container:
        changed = True
        actions.append("removed container %s" % p["container_name"])
    certs_dir = os.path.join(config_dir, "haproxy", "certs")
    run_dir = os.path.join(config_dir, "run")
    ours = [
        os.path.join(config_dir, "haproxy", "haproxy.cfg"),
        os.path.join(config_dir, "keepalived", "keepalived.conf"),
        os.path.join(config_dir, "haproxy", METRICS_LUA_NAME),
    ]
    for directory, suffix in ((certs_dir, ".pem"), (run_dir, "")):
        if os.path.isdir(directory):
            ours += [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(suffix)]
    removed, left = remove_paths(
        ours,
        [
            certs_dir,
            os.path.join(config_dir, "haproxy"),
            os.path.join(config_dir, "keepalived"),
            run_dir,
            config_dir,
        ],
        module.check_mode,
    )
    if removed:
        changed = True
        actions.append("removed files")
    if left:
        module.warn("left files in place that the module did not write: %s" % ", ".join(left))
    return dict(changed=changed, config_dir=config_dir, files_changed=removed, actions=actions)
