# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Docker side of the halb module (private to the collection).

Validation of candidate files in a throwaway container, the HALB container itself (created
from a spec whose hash is kept in a label, so a change is detected without comparing every
field Docker reports back), reloads through the image's gatehouse-halb-reload and the HAProxy
runtime API over the admin socket that the container exposes in config_dir/run.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

try:
    from docker.errors import DockerException, ImageNotFound, NotFound

    HAS_DOCKER = True
    DOCKER_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - reported by the module
    HAS_DOCKER = False
    DOCKER_IMPORT_ERROR = exc
    DockerException = ImageNotFound = NotFound = Exception

from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (
    NO_NEW_PRIVILEGES,
    RUN,
    TMP,
    TMPFS_OPTIONS,
    ContainerError,
    engine_nofile_limit,
    hardening,
    hardening_kwargs,
)
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (
    client as docker_client,
)
from ansible_collections.gatehouse.access.plugins.module_utils._halb.render import (
    HAPROXY_CFG,
    HAPROXY_DIR,
    KEEPALIVED_CONF,
    KEEPALIVED_DIR,
    RUN_DIR,
)

SPEC_LABEL = "gatehouse.halb.spec"
# The throwaway validation container needs the configured interface to exist, or keepalived -t
# fails with "Non-existent interface"; a veth pair in its own (networkless) namespace stands in.
VALIDATE_SCRIPT = r"""
set +e
haproxy -c -f "$0" > /tmp/haproxy.out 2>&1; h=$?
ip link add "$2" type veth peer name ghvalidate0 > /tmp/keepalived.out 2>&1
keepalived -t -f "$1" >> /tmp/keepalived.out 2>&1; k=$?
echo "@@haproxy $h"; cat /tmp/haproxy.out
echo "@@keepalived $k"; cat /tmp/keepalived.out
"""


class HalbDockerError(RuntimeError):
    pass


def connect():
    if not HAS_DOCKER:
        raise HalbDockerError(
            "the Python docker SDK is required on the managed host: %s" % DOCKER_IMPORT_ERROR
        )
    try:
        return docker_client(None)
    except ContainerError as exc:
        raise HalbDockerError(str(exc)) from None


def require_image(client, image: str) -> None:
    try:
        client.images.get(image)
    except ImageNotFound:
        raise HalbDockerError(
            "image %s is not present on this host; build it (make images) or load the dark-site bundle"
            % image
        ) from None


def validate(client, image: str, haproxy_dir: str, keepalived_dir: str, interface: str) -> tuple[bool, str]:
    """Run haproxy -c and keepalived -t on candidate directories; (ok, message)."""
    try:
        raw = client.containers.run(
            image,
            entrypoint=["/bin/sh", "-c", VALIDATE_SCRIPT, HAPROXY_CFG, KEEPALIVED_CONF, interface],
            command=[],
            network_mode="none",
            # As locked down as the node itself; NET_ADMIN only for the stand-in interface.
            cap_drop=["ALL"],
            cap_add=["NET_ADMIN"],
            security_opt=[NO_NEW_PRIVILEGES],
            read_only=True,
            tmpfs={TMP: TMPFS_OPTIONS, RUN: TMPFS_OPTIONS},
            mem_limit="256m",
            pids_limit=64,
            volumes={
                haproxy_dir: {"bind": HAPROXY_DIR, "mode": "ro"},
                keepalived_dir: {"bind": KEEPALIVED_DIR, "mode": "ro"},
            },
            labels={"gatehouse.role": "halb-validate"},
            remove=True,
            stdout=True,
            stderr=True,
        )
    except DockerException as exc:
        raise HalbDockerError("the validation container failed: %s" % exc) from exc
    return parse_validation(raw.decode("utf-8", "replace"))


def parse_validation(output: str) -> tuple[bool, str]:
    sections: dict[str, tuple[int, list[str]]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("@@"):
            words = line[2:].split(" ", 1)
            current = words[0]
            sections[current] = (int(words[1]) if len(words) > 1 and words[1].isdigit() else 1, [])
        elif current is not None:
            sections[current][1].append(line)
    problems = []
    for name, label in (("haproxy", "haproxy -c"), ("keepalived", "keepalived -t")):
        code, lines = sections.get(name, (1, ["no result (validation script did not run)"]))
        if code != 0:
            text = "\n".join(line for line in lines if line.strip())
            problems.append("%s refused the configuration (exit %d):\n%s" % (label, code, text))
    return (not problems, "\n".join(problems))


def container_spec(
    *,
    name: str,
    image: str,
    host_label: str,
    config_dir: str,
    network_mode: str,
    ipv4_address: str | None,
    container_limits: dict | None = None,
) -> dict:
    """The HALB container; ``container_limits`` is the module option (see _containers.hardening)."""
    return {
        "name": name,
        "image": image,
        "labels": {"gatehouse.role": "halb", "gatehouse.host": host_label},
        "hardening": hardening("halb", container_limits),
        "network_mode": network_mode,
        "ipv4_address": ipv4_address,
        "volumes": {
            config_dir + "/haproxy": {"bind": HAPROXY_DIR, "mode": "ro"},
            config_dir + "/keepalived": {"bind": KEEPALIVED_DIR, "mode": "ro"},
            config_dir + "/run": {"bind": RUN_DIR, "mode": "rw"},
        },
        "restart_policy": {"Name": "unless-stopped"},
    }


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def get_container(client, name: str):
    try:
        return client.containers.get(name)
    except NotFound:
        return None


def image_id(client, image: str) -> str | None:
    try:
        return client.images.get(image).id
    except ImageNotFound:
        return None


def container_state(container, spec: dict, wanted_image_id: str | None) -> str:
    """'absent', 'current' (running as specified), 'stopped' (as specified, not running) or 'outdated'."""
    if container is None:
        return "absent"
    labels = container.labels or {}
    if labels.get(SPEC_LABEL) != spec_hash(spec):
        return "outdated"
    if wanted_image_id and container.image and container.image.id != wanted_image_id:
        return "outdated"
    return "current" if container.status == "running" else "stopped"


def create_container(client, spec: dict):
    labels = dict(spec["labels"])
    labels[SPEC_LABEL] = spec_hash(spec)
    network_mode = spec["network_mode"]
    host_config = client.api.create_host_config(
        binds={src: {"bind": v["bind"], "mode": v["mode"]} for src, v in spec["volumes"].items()},
        network_mode=network_mode,
        restart_policy=spec["restart_policy"],
        **hardening_kwargs(spec["hardening"], engine_nofile_limit(client, spec["image"])),
    )
    networking_config = None
    if spec["ipv4_address"]:
        networking_config = client.api.create_networking_config(
            {network_mode: client.api.create_endpoint_config(ipv4_address=spec["ipv4_address"])}
        )
    created = client.api.create_container(
        spec["image"],
        name=spec["name"],
        labels=labels,
        host_config=host_config,
        networking_config=networking_config,
        volumes=[v["bind"] for v in spec["volumes"].values()],
    )
    client.api.start(created["Id"])
    return client.containers.get(created["Id"])


def remove_container(container, timeout: int = 10) -> None:
    # SIGTERM: keepalived sends a priority 0 advertisement and the peer takes over at once.
    try:
        container.stop(timeout=timeout)
    except NotFound:
        return
    container.remove(force=True)


def exec_checked(container, argv: list[str]) -> str:
    code, output = container.exec_run(argv, stdout=True, stderr=True)
    text = (output or b"").decode("utf-8", "replace").strip()
    if code != 0:
        raise HalbDockerError("%s failed in %s (exit %s): %s" % (" ".join(argv), container.name, code, text))
    return text


def reload(container, what: str) -> str:
    """Validated reload inside the container: HAProxy master-worker (SIGUSR2) or keepalived (SIGHUP)."""
    return exec_checked(container, ["gatehouse-halb-reload", what])


def wait_running(container, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "running":
            code = container.exec_run(["test", "-S", "/run/haproxy/admin.sock"])[0]
            if code == 0:
                return
        elif container.status in ("exited", "dead") or container.attrs.get("RestartCount", 0) > 0:
            logs = container.logs(tail=20).decode("utf-8", "replace")
            raise HalbDockerError("container %s exited right after the start:\n%s" % (container.name, logs))
        time.sleep(0.2)
    logs = container.logs(tail=20).decode("utf-8", "replace")
    raise HalbDockerError(
        "container %s did not become ready within %ss:\n%s" % (container.name, timeout, logs)
    )


def runtime_api(socket_path: str, command: str, timeout: float = 5.0) -> str:
    """One command on HAProxy's admin socket (the runtime API); returns the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace").strip()


def vips_held(container, interface: str, vips: list[str]) -> list[str]:
    """The VIPs currently assigned in the container's network namespace."""
    code, output = container.exec_run(["ip", "-o", "addr", "show", "dev", interface])
    if code != 0:
        return []
    text = (output or b"").decode("utf-8", "replace")
    present = set()
    for line in text.splitlines():
        words = line.split()
        for key in ("inet", "inet6"):
            if key in words:
                present.add(words[words.index(key) + 1].split("/")[0])
    return [vip for vip in vips if vip in present]
