# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Docker side of the halb module (private to the collection).

The HALB container is a container spec like the cmsg and broker ones (_docker.containers:
same labels, spec hash, hardening, plan and converge). What only the HALB does lives here:
validation of candidate files in a throwaway container, readiness (the HAProxy admin socket),
reloads through the image's gatehouse-halb-reload, the HAProxy runtime API over the admin
socket that the container exposes in config_dir/run, and the VIPs the node holds.
"""

from __future__ import annotations

import socket

from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils._halb.render import (
    ADMIN_SOCKET,
    HAPROXY_CFG,
    HAPROXY_DIR,
    KEEPALIVED_CONF,
    KEEPALIVED_DIR,
    RUN_DIR,
)

ROLE = "halb"
MANAGED_BY = "gatehouse.access.halb"
# Seconds a removed node gets to stop: on SIGTERM keepalived sends a priority 0 advertisement and
# the peer takes the VIPs over at once.
STOP_TIMEOUT = 10
# Seconds for a (re)started container to open its admin socket.
READY_TIMEOUT = 20
# Seconds for haproxy -c and keepalived -t together.
VALIDATE_TIMEOUT = 60
# The throwaway validation container needs the configured interface to exist, or keepalived -t
# fails with "Non-existent interface"; a veth pair in its own (networkless) namespace stands in.
# $0 names the script in the shells' messages; $1, $2, $3: haproxy.cfg, keepalived.conf, interface.
VALIDATE_SCRIPT = r"""
set +e
haproxy -c -f "$1" > /tmp/haproxy.out 2>&1; h=$?
ip link add "$3" type veth peer name ghvalidate0 > /tmp/keepalived.out 2>&1
keepalived -t -f "$2" >> /tmp/keepalived.out 2>&1; k=$?
echo "@@haproxy $h"; cat /tmp/haproxy.out
echo "@@keepalived $k"; cat /tmp/keepalived.out
"""


class RuntimeApiError(RuntimeError):
    """HAProxy refused a runtime API command."""


def require_image(cli, image: str) -> str:
    """The id of ``image``; the HALB image is never pulled."""
    found = ctr.image_id(cli, image)
    if found is None:
        raise ctr.ContainerError(
            "image %s is not present on this host; build it (make images) or load the dark-site bundle"
            % image
        )
    return found


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
    """The HALB container as a _docker.containers spec; ``container_limits`` is the module option."""
    return {
        "service": "halb",
        "name": name,
        "image": image,
        "labels": {ctr.LABEL_ROLE: ROLE, ctr.LABEL_HOST: host_label, ctr.LABEL_MANAGED: MANAGED_BY},
        "mounts": [
            {"source": config_dir + "/haproxy", "target": HAPROXY_DIR, "read_only": True},
            {"source": config_dir + "/keepalived", "target": KEEPALIVED_DIR, "read_only": True},
            {"source": config_dir + "/run", "target": RUN_DIR, "read_only": False},
        ],
        # No published ports: the VIPs are on the host's (or the network's) interface.
        "network_mode": network_mode,
        "network": None,
        "ports": [],
        "ipv4_address": ipv4_address,
        "restart_policy": "unless-stopped",
        "stop_timeout": STOP_TIMEOUT,
        "container_limits": container_limits,
    }


def validate(cli, spec: dict, haproxy_dir: str, keepalived_dir: str, interface: str) -> tuple[bool, str]:
    """Run haproxy -c and keepalived -t on candidate directories; (ok, message).

    The container is the HALB ``spec`` with the candidate directories, no network and the
    hardening of the service ``halb-check``.
    """
    check_spec = dict(
        spec,
        service="halb-check",
        mounts=[
            {"source": haproxy_dir, "target": HAPROXY_DIR, "read_only": True},
            {"source": keepalived_dir, "target": KEEPALIVED_DIR, "read_only": True},
        ],
        network_mode="none",
        ipv4_address=None,
        container_limits=None,
        entrypoint=["/bin/sh", "-c", VALIDATE_SCRIPT],
    )
    status, output = ctr.run_once(
        cli,
        check_spec,
        spec["name"] + "-validate",
        ["gatehouse-halb-validate", HAPROXY_CFG, KEEPALIVED_CONF, interface],
        VALIDATE_TIMEOUT,
    )
    if status is None:
        return False, "haproxy -c and keepalived -t did not finish within %d s" % VALIDATE_TIMEOUT
    return parse_validation(output)


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


def admin_socket_ready(container) -> bool:
    """Readiness of a HALB container: HAProxy has opened its admin socket."""
    try:
        return ctr.exec_in(container, ["test", "-S", ADMIN_SOCKET])[0] == 0
    except ctr.ContainerError:
        # Between two starts (restart policy) nothing can be executed; the wait goes on.
        return False


def reload(container, what: str) -> str:
    """Validated reload inside the container: HAProxy master-worker (SIGUSR2) or keepalived (SIGHUP)."""
    argv = ["gatehouse-halb-reload", what]
    code, output = ctr.exec_in(container, argv)
    if code != 0:
        raise ctr.ContainerError(
            "%s failed in %s (exit %s): %s" % (" ".join(argv), container.name, code, output.strip())
        )
    return output.strip()


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
    code, text = ctr.exec_in(container, ["ip", "-o", "addr", "show", "dev", interface])
    if code != 0:
        return []
    present = set()
    for line in text.splitlines():
        words = line.split()
        for key in ("inet", "inet6"):
            if key in words:
                present.add(words[words.index(key) + 1].split("/")[0])
    return [vip for vip in vips if vip in present]
