"""Docker-side helpers for the deployment module tests (cmsg, broker): skips, free names, clean-up."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import uuid

import pytest

try:
    import docker
except ImportError:  # pragma: no cover - the virtualenv has it
    docker = None

IMAGE_TAG = "0.1.0"


def docker_client():
    if docker is None:
        pytest.skip("the docker Python SDK is not installed")
    try:
        cli = docker.from_env(timeout=60)
        cli.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine reachable: {exc}")
    return cli


def require_service_images(cli, *roles: str) -> None:
    """Skip unless gatehouse/<role> images exist and contain their service (make images)."""
    for role in roles:
        ref = f"gatehouse/{role}:{IMAGE_TAG}"
        try:
            cli.images.get(ref)
        except docker.errors.ImageNotFound:
            pytest.skip(f"image {ref} is not built yet (run make images)")
        probe = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/opt/gatehouse/venv/bin/python",
                ref,
                "-c",
                f"import gatehouse.{role}.__main__",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(f"image {ref} has no working gatehouse-{role} service yet (rebuild with make images)")


def unique_prefix(kind: str) -> str:
    return f"ghtest-{kind}-{uuid.uuid4().hex[:8]}"


def free_cidr(cli, pool: str = "10.201.0.0/16", prefixlen: int = 24) -> str:
    """A /``prefixlen`` inside ``pool`` that no Docker network and no host interface uses."""
    used = []
    for network in cli.networks.list():
        for cfg in (network.attrs.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Subnet"):
                used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    out = (
        subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=False).stdout or "[]"
    )
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            used.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    candidates = list(ipaddress.ip_network(pool).subnets(new_prefix=prefixlen))
    start = uuid.uuid4().int % len(candidates)
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not any(candidate.overlaps(u) for u in used if u.version == 4):
            return str(candidate)
    pytest.skip(f"no free /{prefixlen} in {pool}")


def cleanup(cli, prefix: str) -> None:
    """Remove every container and network whose name starts with ``prefix`` (tests' own objects)."""
    for container in cli.containers.list(all=True, filters={"name": prefix}):
        if container.name.startswith(prefix):
            container.remove(force=True)
    for network in cli.networks.list(names=[prefix]):
        if network.name.startswith(prefix):
            network.remove()


def objects_named(cli, prefix: str) -> list[str]:
    names = [
        c.name for c in cli.containers.list(all=True, filters={"name": prefix}) if c.name.startswith(prefix)
    ]
    names += [n.name for n in cli.networks.list(names=[prefix]) if n.name.startswith(prefix)]
    return names


def network_gateway(cli, name: str) -> str:
    """The gateway address (the host side of the bridge) of the Docker network ``name``."""
    network = cli.networks.get(name)
    config = network.attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return config["Gateway"]
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
