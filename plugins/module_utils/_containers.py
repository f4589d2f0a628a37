# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Converge Gatehouse containers and networks with the Docker SDK (private to the collection).

A container is described by a desired spec (a plain dict). Its SHA-256 over a canonical JSON
form, together with the hashes of the files it reads and the image id, is stored in the label
``gatehouse.spec-hash``. A container is (re)created only when that hash differs or when it does
not exist, and started when it exists with the right hash but is not running. Containers and
networks that carry our name but not our labels are never touched: the module fails instead.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback

try:
    import docker
    from docker.errors import APIError, DockerException, ImageNotFound, NotFound
except ImportError:
    HAS_DOCKER = False
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_DOCKER = True
    DOCKER_IMPORT_ERROR = None

# The one version of Gatehouse (galaxy.yml); the default tag of the images. A unit test keeps it in step.
COLLECTION_VERSION = "0.1.0"

LABEL_ROLE = "gatehouse.role"
LABEL_HOST = "gatehouse.host"
LABEL_HASH = "gatehouse.spec-hash"
LABEL_MANAGED = "gatehouse.managed-by"
# Runtime user of the service images (files/images/*/Dockerfile).
SERVICE_UID = 10001
SERVICE_GID = 10001


class ContainerError(Exception):
    """A container or network cannot be converged; the message says what to do."""


def client(docker_host: str | None, timeout: int = 60):
    try:
        if docker_host:
            cli = docker.DockerClient(base_url=docker_host, version="auto", timeout=timeout)
        else:
            cli = docker.from_env(version="auto", timeout=timeout)
        cli.ping()
    except DockerException as exc:
        raise ContainerError(
            "cannot reach the Docker engine (%s): %s; is Docker installed and running (role "
            "gatehouse.access.docker) and is the socket readable?"
            % (docker_host or "DOCKER_HOST or default", exc)
        ) from None
    return cli


def image_ref(name: str, tag: str, registry: str | None) -> str:
    base = "gatehouse/%s:%s" % (name, tag)
    return "%s/%s" % (registry.rstrip("/"), base) if registry else base


def image_id(cli, ref: str) -> str | None:
    try:
        return cli.images.get(ref).id
    except ImageNotFound:
        return None


def ensure_image(cli, ref: str, pull: bool, check_mode: bool) -> tuple[str | None, bool]:
    """The image id of ``ref`` and whether it was (or would be) pulled."""
    found = image_id(cli, ref)
    if found:
        return found, False
    if not pull:
        raise ContainerError(
            "image %s is not present on the Docker host; load it first (make images, or the dark-site "
            "bundle with bundle_path) or use image_source=registry" % ref
        )
    if check_mode:
        return None, True
    try:
        repository, _sep, tag = ref.rpartition(":")
        return cli.images.pull(repository, tag=tag).id, True
    except DockerException as exc:
        raise ContainerError("cannot pull %s: %s" % (ref, exc)) from None


def spec_hash(spec: dict, inputs: dict) -> str:
    """Hash of the desired spec plus ``inputs`` (image id, hashes of the files the container reads)."""
    canonical = json.dumps({"spec": spec, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_container(cli, name: str):
    try:
        return cli.containers.get(name)
    except NotFound:
        return None


def _check_ours(obj, kind: str, name: str) -> None:
    labels = obj.attrs.get("Config", {}).get("Labels") if kind == "container" else obj.attrs.get("Labels")
    if not labels or LABEL_MANAGED not in labels:
        raise ContainerError(
            "a %s named %s exists and was not created by Gatehouse (no %s label); remove or rename it, "
            "or choose another name_prefix" % (kind, name, LABEL_MANAGED)
        )


def container_plan(cli, spec: dict, desired_hash: str) -> str:
    """What converging ``spec`` needs: none, create, recreate or start."""
    current = find_container(cli, spec["name"])
    if current is None:
        return "create"
    _check_ours(current, "container", spec["name"])
    if (current.labels or {}).get(LABEL_HASH) != desired_hash:
        return "recreate"
    if current.status != "running":
        return "start"
    return "none"


def _create_kwargs(spec: dict, desired_hash: str) -> dict:
    labels = dict(spec["labels"])
    labels[LABEL_HASH] = desired_hash
    kwargs: dict = {
        "image": spec["image"],
        "name": spec["name"],
        "labels": labels,
        "detach": True,
        "restart_policy": {"Name": spec.get("restart_policy", "unless-stopped")},
        "volumes": {
            m["source"]: {"bind": m["target"], "mode": "ro" if m["read_only"] else "rw"}
            for m in spec["mounts"]
        },
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "5"}},
    }
    if spec.get("command"):
        kwargs["command"] = spec["command"]
    if spec.get("environment"):
        kwargs["environment"] = spec["environment"]
    mode = spec["network_mode"]
    if mode == "bridge":
        if spec.get("network"):
            kwargs["network"] = spec["network"]
        ports = {}
        for port in spec.get("ports", []):
            ports["%d/%s" % (port["container"], port["protocol"])] = port["host"]
        kwargs["ports"] = ports
    else:
        kwargs["network_mode"] = mode
    return kwargs


def _wait_running(container, timeout: int) -> None:
    """Fail with the last log lines when the service exits right after its start."""
    deadline = time.monotonic() + timeout
    steady_since = None
    while True:
        container.reload()
        state = container.attrs.get("State", {})
        health = (state.get("Health") or {}).get("Status")
        if state.get("Status") in ("exited", "dead") or (state.get("Restarting") and state.get("ExitCode")):
            tail = container.logs(tail=20).decode("utf-8", "replace")
            raise ContainerError(
                "container %s stopped right after its start (exit code %s); last log lines:\n%s"
                % (container.name, state.get("ExitCode"), tail)
            )
        if state.get("Running"):
            if health == "healthy":
                return
            if health is None:
                # Without a health check, staying up for a few seconds is the best signal we have.
                steady_since = steady_since or time.monotonic()
                if time.monotonic() - steady_since >= 3:
                    return
        if time.monotonic() > deadline:
            raise ContainerError(
                "container %s is not ready after %d s (state %s, health %s)"
                % (container.name, timeout, state.get("Status"), health)
            )
        time.sleep(0.5)


def converge_container(cli, spec: dict, desired_hash: str, action: str, wait_timeout: int | None) -> None:
    """Carry out ``action`` from container_plan()."""
    if action == "none":
        return
    current = find_container(cli, spec["name"])
    try:
        if action == "start":
            current.start()
            container = current
        else:
            if current is not None:
                current.remove(force=True)
            container = cli.containers.create(**_create_kwargs(spec, desired_hash))
            container.start()
    except APIError as exc:
        raise ContainerError(
            "cannot %s container %s: %s" % (action, spec["name"], exc.explanation or exc)
        ) from None
    if wait_timeout:
        _wait_running(container, wait_timeout)


def remove_container(cli, name: str, check_mode: bool) -> bool:
    current = find_container(cli, name)
    if current is None:
        return False
    _check_ours(current, "container", name)
    if not check_mode:
        current.remove(force=True)
    return True


def find_network(cli, name: str):
    try:
        return cli.networks.get(name)
    except NotFound:
        return None


def network_subnets(network) -> list[str]:
    return [
        cfg.get("Subnet")
        for cfg in (network.attrs.get("IPAM") or {}).get("Config") or []
        if cfg.get("Subnet")
    ]


def network_plan(cli, name: str, subnet: str, labels: dict) -> str:
    current = find_network(cli, name)
    if current is None:
        return "create"
    _check_ours(current, "network", name)
    if network_subnets(current) != [subnet] or any(
        (current.attrs.get("Labels") or {}).get(k) != v for k, v in labels.items()
    ):
        return "recreate"
    return "none"


def converge_network(cli, name: str, subnet: str, labels: dict, action: str) -> None:
    if action == "none":
        return
    current = find_network(cli, name)
    try:
        if current is not None:
            current.reload()
            for attached in current.containers:
                # Only our containers can be attached: they were removed or will be recreated.
                _check_ours(attached, "container", attached.name)
                attached.remove(force=True)
            current.remove()
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
        cli.networks.create(name, driver="bridge", ipam=ipam, labels=labels, check_duplicate=True)
    except APIError as exc:
        raise ContainerError("cannot %s network %s: %s" % (action, name, exc.explanation or exc)) from None


def remove_network(cli, name: str, check_mode: bool) -> bool:
    current = find_network(cli, name)
    if current is None:
        return False
    _check_ours(current, "network", name)
    if not check_mode:
        current.remove()
    return True


def docker_subnets(cli, exclude: str | None = None) -> list[tuple[str, str]]:
    """(network name, subnet) of every Docker network except ``exclude``."""
    result = []
    for network in cli.networks.list():
        if network.name == exclude:
            continue
        # networks.list() returns partial objects; IPAM is part of the list answer.
        for subnet in network_subnets(network):
            result.append((network.name, subnet))
    return result


def container_exists(cli, name: str) -> bool:
    return find_container(cli, name) is not None


def describe(cli, name: str) -> dict | None:
    current = find_container(cli, name)
    if current is None:
        return None
    return {
        "name": current.name,
        "id": current.id,
        "image": (current.attrs.get("Config") or {}).get("Image"),
        "status": current.status,
        "labels": {k: v for k, v in (current.labels or {}).items() if k.startswith("gatehouse.")},
    }
