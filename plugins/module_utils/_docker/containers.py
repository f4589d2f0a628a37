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
import re
import time
import traceback

try:
    import docker
    from docker.errors import APIError, DockerException, ImageNotFound, NotFound
    from requests.exceptions import RequestException
except ImportError:
    HAS_DOCKER = False
    DOCKER_IMPORT_ERROR: str | None = traceback.format_exc()

    # Stand-ins with the SDK's hierarchy: without the SDK nothing raises them, but callers'
    # ``except`` clauses stay valid (and distinct).
    class DockerException(Exception):
        pass

    class APIError(DockerException):
        pass

    class NotFound(APIError):
        pass

    class ImageNotFound(NotFound):
        pass

    class RequestException(Exception):
        pass
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


# ------------------------------------------------------------------ hardening
#
# Every container a Gatehouse module starts drops all capabilities and adds back only what its
# service needs, cannot gain privileges (no-new-privileges), has a read-only root file system
# with tmpfs where the service writes, and memory, process and open-file limits. The option
# ``container_limits`` (the same in the cmsg, broker and halb modules) overrides the limits.

NO_NEW_PRIVILEGES = "no-new-privileges:true"
NOFILE = 65536
# tmpfs options: nothing executable, no set-uid, small.
TMPFS_OPTIONS = "rw,noexec,nosuid,nodev,size=64m"
# Paths inside the containers (not on the managed host), mounted as tmpfs.
TMP = "/tmp"  # noqa: S108
RUN = "/run"
# Per service: capabilities added back after dropping ALL, default limits, tmpfs mount points.
# The Python services listen on ports >= 1024 inside their containers and run as uid 10001,
# so they need no capability. The HALB: keepalived manages the VIPs and sends VRRP (NET_ADMIN,
# NET_RAW, NET_BROADCAST); the HAProxy master binds 443 and the VIPs (NET_BIND_SERVICE,
# NET_ADMIN for "transparent") as root, then starts its workers as the haproxy user (SETUID,
# SETGID) and signals them across that user boundary on reloads (KILL).
SERVICE_HARDENING = {
    "cm": {"cap_add": [], "memory": "1g", "pids": 512, "tmpfs": [TMP]},
    "sg": {"cap_add": [], "memory": "1g", "pids": 512, "tmpfs": [TMP]},
    "broker": {"cap_add": [], "memory": "512m", "pids": 512, "tmpfs": [TMP]},
    "agent": {"cap_add": [], "memory": "256m", "pids": 256, "tmpfs": [TMP]},
    # Prometheus (gatehouse/prometheus) runs as uid 10001 and listens on 9090; its data is a mount.
    "prometheus": {"cap_add": [], "memory": "1g", "pids": 512, "tmpfs": [TMP]},
    # The database cluster (gatehouse/database) runs as uid 10001 on ports >= 1024. etcd writes
    # only its data mount; Patroni its data mount and, in a private directory of /tmp, its
    # configuration with the passwords, the pgpass file and PostgreSQL's socket.
    "etcd": {"cap_add": [], "memory": "512m", "pids": 256, "tmpfs": [TMP]},
    "patroni": {"cap_add": [], "memory": "2g", "pids": 1024, "tmpfs": [TMP]},
    "halb": {
        "cap_add": ["KILL", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW", "SETGID", "SETUID"],
        "memory": "1g",
        # HAProxy runs a thread per CPU, and old workers stay for hard_stop_after after a reload.
        "pids": 1024,
        "tmpfs": [TMP, RUN],
    },
    # The throwaway container that checks candidate HALB files (haproxy -c, keepalived -t) without
    # a network: NET_ADMIN only for the stand-in interface it creates in its own namespace.
    "halb-check": {"cap_add": ["NET_ADMIN"], "memory": "256m", "pids": 64, "tmpfs": [TMP, RUN]},
}
# Argument spec of the ``container_limits`` option (cmsg, broker, halb). Unset suboptions take the
# service's defaults from SERVICE_HARDENING.
CONTAINER_LIMITS_SPEC = dict(
    memory=dict(type="str"),
    pids=dict(type="int"),
    nofile=dict(type="int"),
    read_only=dict(type="bool"),
    cap_add=dict(type="list", elements="str"),
)
CONTAINER_LIMITS_OPTION = dict(type="dict", options=CONTAINER_LIMITS_SPEC)
_MEMORY_RE = re.compile(r"^[1-9][0-9]*[bkmg]?$")
_CAP_RE = re.compile(r"^[A-Z_]{2,32}$")


def hardening(service: str, limits: dict | None = None) -> dict:
    """The effective hardening of a ``service`` container: its defaults with ``limits`` applied.

    ``limits`` is the module's ``container_limits`` option (None or a dict whose unset keys are
    None). Raises ContainerError for a value Docker would refuse.
    """
    base = SERVICE_HARDENING[service]
    given = {k: v for k, v in (limits or {}).items() if v is not None}
    memory = str(given.get("memory", base["memory"])).lower()
    if not _MEMORY_RE.match(memory):
        raise ContainerError(
            "container_limits.memory: %r is not a size (a number with an optional unit b, k, m or g, "
            "for example 512m)" % given.get("memory")
        )
    pids = given.get("pids", base["pids"])
    if not isinstance(pids, int) or pids < 32:
        raise ContainerError("container_limits.pids: %r must be a number of processes >= 32" % (pids,))
    nofile = given.get("nofile", NOFILE)
    if not isinstance(nofile, int) or nofile < 1024:
        raise ContainerError("container_limits.nofile: %r must be a number of open files >= 1024" % (nofile,))
    extra = [re.sub(r"^CAP_", "", str(c).upper()) for c in given.get("cap_add", [])]
    for cap in extra:
        if not _CAP_RE.match(cap) or cap == "ALL":
            raise ContainerError("container_limits.cap_add: %r is not a single capability name" % cap)
    return {
        "cap_drop": ["ALL"],
        "cap_add": sorted(set(base["cap_add"]) | set(extra)),
        "security_opt": [NO_NEW_PRIVILEGES],
        "read_only": bool(given.get("read_only", True)),
        "tmpfs": {path: TMPFS_OPTIONS for path in base["tmpfs"]},
        "mem_limit": memory,
        "pids_limit": pids,
        "nofile": nofile,
    }


def hardening_kwargs(effective: dict, engine_nofile: int | None = None) -> dict:
    """Docker SDK keyword arguments (containers.create / create_host_config) of hardening().

    ``engine_nofile`` (from engine_nofile_limit()) caps the open files limit: a container cannot
    get more than the engine itself may grant, and asking for more makes its start fail.
    """
    kwargs = {k: v for k, v in effective.items() if k != "nofile"}
    nofile = effective["nofile"]
    if engine_nofile:
        nofile = min(nofile, engine_nofile)
    kwargs["ulimits"] = [docker.types.Ulimit(name="nofile", soft=nofile, hard=nofile)]
    return kwargs


_ENGINE_NOFILE: dict = {}


def engine_nofile_limit(cli, image: str) -> int | None:
    """The hard open files limit that containers of this engine get by default (None: unlimited).

    Docker's engine normally runs with a limit of a million or more; some hosts (and nested or
    rootless engines) have less, and a container cannot be given more than that. Asked once per
    engine and run, in a throwaway container of ``image`` without network.
    """
    key = cli.api.base_url
    if key not in _ENGINE_NOFILE:
        limit = None
        try:
            raw = cli.containers.run(
                image,
                entrypoint=["/bin/sh", "-c", "ulimit -Hn"],
                command=[],
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=[NO_NEW_PRIVILEGES],
                read_only=True,
                labels={LABEL_ROLE: "probe"},
                remove=True,
            )
            text = raw.decode("ascii", "replace").strip()
            limit = int(text) if text.isdigit() else None
        except DockerException as exc:
            raise ContainerError("cannot start a probe container of %s: %s" % (image, exc)) from None
        _ENGINE_NOFILE[key] = limit
    return _ENGINE_NOFILE[key]


def spec_hardening(spec: dict) -> dict:
    """hardening() of a container spec: its ``service`` and optional ``container_limits``."""
    return hardening(spec["service"], spec.get("container_limits"))


# Argument spec of the ``docker_host`` option of every module that talks to the Docker engine
# (documented by the doc fragment gatehouse.access.docker).
DOCKER_HOST_OPTION = dict(type="str")


def client(docker_host: str | None, timeout: int = 60):
    """The one way the modules reach a Docker engine: ``docker_host`` (the module option) or,
    when it is empty, DOCKER_HOST or the local socket. Answers a ping before it is returned."""
    if not HAS_DOCKER:
        raise ContainerError(
            "the Docker SDK for Python (docker) is required on the managed host: %s" % DOCKER_IMPORT_ERROR
        )
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
    """``gatehouse/<name>:<tag>``, below ``registry`` (a host[:port][/path] prefix) when one is given."""
    base = "gatehouse/%s:%s" % (name, tag)
    return "%s/%s" % (registry.rstrip("/"), base) if registry else base


def image_id(cli, ref: str) -> str | None:
    """The id of the image ``ref`` (a reference or an id) on the engine, None when it is absent."""
    try:
        return cli.images.get(ref).id
    except ImageNotFound:
        return None


def ensure_image(
    cli, ref: str, pull: bool, check_mode: bool, failing: bool = False
) -> tuple[str | None, bool]:
    """The image id of ``ref`` and whether it was (or would be) pulled.

    An image present on the engine is used as it is: only missing images are pulled. Check mode
    downloads nothing but asks the registry for the manifest of ``ref``, so that a registry that
    is down or lacks the tag fails the check run as it would fail the real one; the id is then
    None. ``failing`` (the run already fails on another problem) asks the engine only: a missing
    image is reported as one that would be pulled and the registry is not contacted. Every
    failure is a ContainerError that names ``ref`` and the engine's reason.
    """
    found = image_id(cli, ref)
    if found:
        return found, False
    if not pull:
        raise ContainerError(
            "image %s is not present on the Docker host; load it first (make images, or the dark-site "
            "bundle with bundle_path) or use image_source=registry" % ref
        )
    if failing:
        return None, True
    repository, _sep, tag = ref.rpartition(":")
    try:
        if check_mode:
            cli.images.get_registry_data(ref)
            return None, True
        # Not images.pull(): it drops the error events of the progress stream (a layer that
        # fails its checksum, a download cut short) and then reports only "no such image".
        for event in cli.api.pull(repository, tag=tag, stream=True, decode=True):
            if event.get("error"):
                raise ContainerError("cannot pull %s: %s" % (ref, event["error"]))
    except NotFound as exc:
        raise ContainerError(
            "cannot pull %s: the registry has no such image (%s)" % (ref, exc.explanation or exc)
        ) from None
    except APIError as exc:
        raise ContainerError("cannot pull %s: %s" % (ref, exc.explanation or exc)) from None
    except (DockerException, RequestException) as exc:
        raise ContainerError("cannot pull %s: %s" % (ref, exc)) from None
    found = image_id(cli, ref)
    if found is None:
        raise ContainerError("cannot pull %s: the engine reported success but has no such image" % ref)
    return found, True


# ------------------------------------------------------------------ containers
#
# A spec has the keys service (a key of SERVICE_HARDENING), name, image, labels (LABEL_ROLE,
# LABEL_HOST and LABEL_MANAGED; LABEL_HASH is added at creation), mounts (source, target,
# read_only), network_mode (bridge, host, none, container:<name> or a network's name), network
# (the bridge network to attach to, bridge only), ports (host, container, protocol and an optional
# host_ip; bridge only), restart_policy and container_limits (the module option), and optionally
# command, entrypoint, environment, ipv4_address (a static address on the network) and
# stop_timeout (seconds for a graceful stop before the container is removed; without it the
# container is killed).


def spec_hash(spec: dict, inputs: dict) -> str:
    """Hash of the desired spec plus ``inputs`` (image id, hashes of the files the container reads)."""
    document = {"spec": spec, "inputs": inputs}
    if spec.get("service") in SERVICE_HARDENING:
        # The effective hardening rather than the option as given: a change of the defaults
        # recreates the containers, an option that restates them does not.
        document["spec"] = {k: v for k, v in spec.items() if k != "container_limits"}
        document["hardening"] = spec_hardening(spec)
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def find_container(cli, name: str):
    try:
        return cli.containers.get(name)
    except NotFound:
        return None


# The HALB container carried this label instead of LABEL_MANAGED and LABEL_HASH before it was
# described by a spec like the others: such a container is ours, and recreated once.
_LEGACY_MARKERS = ("gatehouse.halb.spec",)


def _check_ours(obj, kind: str, name: str, role: str | None = None) -> None:
    """Fail unless Gatehouse created ``obj`` and, when ``role`` is given, for that role."""
    labels = (
        obj.attrs.get("Config", {}).get("Labels") if kind == "container" else obj.attrs.get("Labels")
    ) or {}
    if not any(marker in labels for marker in (LABEL_MANAGED, *_LEGACY_MARKERS)):
        raise ContainerError(
            "a %s named %s exists and was not created by Gatehouse (no %s label); remove or rename it, "
            "or choose another name_prefix (container_name for the HALB)" % (kind, name, LABEL_MANAGED)
        )
    if role is not None and labels.get(LABEL_ROLE) != role:
        raise ContainerError(
            "a %s named %s exists and is a Gatehouse %s container, not a %s one; it is left alone"
            % (kind, name, labels.get(LABEL_ROLE), role)
        )


def container_plan(cli, spec: dict, desired_hash: str) -> str:
    """What converging ``spec`` needs: none, create, recreate or start."""
    current = find_container(cli, spec["name"])
    if current is None:
        return "create"
    _check_ours(current, "container", spec["name"], spec["labels"].get(LABEL_ROLE))
    if (current.labels or {}).get(LABEL_HASH) != desired_hash:
        return "recreate"
    if current.status != "running":
        return "start"
    return "none"


def _create_args(spec: dict, labels: dict, engine_nofile: int | None = None) -> dict:
    """Arguments of APIClient.create_container for ``spec``, except that ``host_config`` holds the
    arguments of create_host_config and ``endpoint`` those of create_endpoint_config (see _create).

    The low-level API, because the high-level create() of the SDKs that distributions ship cannot
    give a container a static address.
    """
    mode = spec["network_mode"]
    network = spec.get("network") if mode == "bridge" else None
    host_config = {
        "binds": {
            m["source"]: {"bind": m["target"], "mode": "ro" if m["read_only"] else "rw"}
            for m in spec["mounts"]
        },
        "network_mode": network or mode,
        "restart_policy": {"Name": spec.get("restart_policy", "unless-stopped")},
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "5"}},
    }
    host_config.update(hardening_kwargs(spec_hardening(spec), engine_nofile))
    args: dict = {
        "image": spec["image"],
        "name": spec["name"],
        "labels": labels,
        "detach": True,
        "volumes": [m["target"] for m in spec["mounts"]],
        "host_config": host_config,
    }
    for key in ("command", "entrypoint", "environment", "user"):
        if spec.get(key):
            args[key] = spec[key]
    if mode == "bridge" and spec.get("ports"):
        bindings = {}
        for port in spec["ports"]:
            host = (port["host_ip"], port["host"]) if port.get("host_ip") else port["host"]
            bindings["%d/%s" % (port["container"], port["protocol"])] = host
        host_config["port_bindings"] = bindings
        args["ports"] = [(p["container"], p["protocol"]) for p in spec["ports"]]
    if spec.get("ipv4_address"):
        args["endpoint"] = {"ipv4_address": spec["ipv4_address"]}
    return args


def _create(cli, args: dict):
    """Create (not start) the container of _create_args() and return it."""
    args = dict(args)
    host_config = cli.api.create_host_config(**args.pop("host_config"))
    endpoint = args.pop("endpoint", None)
    if endpoint:
        args["networking_config"] = cli.api.create_networking_config(
            {host_config["NetworkMode"]: cli.api.create_endpoint_config(**endpoint)}
        )
    created = cli.api.create_container(host_config=host_config, **args)
    return cli.containers.get(created["Id"])


def _wait_running(container, timeout: float, ready=None) -> None:
    """Wait until the service is up: ``ready(container)`` is true, or else its health check says
    healthy, or without one it has stayed up for a few seconds. Fail with the last log lines when
    it exits right after its start, and when it is not ready within ``timeout`` seconds."""
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
            if ready is not None:
                if ready(container):
                    return
            elif health == "healthy":
                return
            elif health is None:
                # Without a health check, staying up for a few seconds is the best signal we have.
                steady_since = steady_since or time.monotonic()
                if time.monotonic() - steady_since >= 3:
                    return
        if time.monotonic() > deadline:
            tail = container.logs(tail=20).decode("utf-8", "replace")
            raise ContainerError(
                "container %s is not ready after %d s (state %s, health %s); last log lines:\n%s"
                % (container.name, timeout, state.get("Status"), health, tail)
            )
        time.sleep(0.5 if ready is None else 0.2)


def _remove(container, stop_timeout: int | None) -> None:
    if stop_timeout is not None:
        # SIGTERM first, so the service can say goodbye (keepalived hands its VIPs over at once).
        try:
            container.stop(timeout=stop_timeout)
        except NotFound:
            return
    container.remove(force=True)


def converge_container(
    cli, spec: dict, desired_hash: str, action: str, wait_timeout: float | None, ready=None
):
    """Carry out ``action`` from container_plan() and return the container (None for none).

    With ``wait_timeout``, wait that long for the service to be up (see _wait_running; ``ready``
    is an optional readiness test of the container).
    """
    if action == "none":
        return None
    current = find_container(cli, spec["name"])
    try:
        if action == "start":
            current.start()
            container = current
        else:
            # Probed before the old container goes: a failing probe leaves the service running.
            limit = engine_nofile_limit(cli, spec["image"])
            if current is not None:
                _remove(current, spec.get("stop_timeout"))
            labels = dict(spec["labels"], **{LABEL_HASH: desired_hash})
            container = _create(cli, _create_args(spec, labels, limit))
            container.start()
    except DockerException as exc:
        raise ContainerError(
            "cannot %s container %s: %s" % (action, spec["name"], getattr(exc, "explanation", None) or exc)
        ) from None
    if wait_timeout:
        _wait_running(container, wait_timeout, ready)
    return container


def run_once(cli, spec: dict, name: str, command: list, timeout: int) -> tuple[int | None, str]:
    """Run ``command`` once in a throwaway container like ``spec`` and return (exit code, output).

    Same image, entrypoint, mounts, network mode and hardening as the service container, but no
    published ports (the running service holds them), no restart policy, the role ``check`` and
    its own ``name``. stdout and stderr are returned together; the container is removed in every
    case. The exit code is None when the command did not finish within ``timeout`` seconds (it is
    killed then).
    """
    stale = find_container(cli, name)
    if stale is not None:
        # Left over from an interrupted run; only ours are removed.
        _check_ours(stale, "container", name)
        stale.remove(force=True)
    labels = {k: v for k, v in spec["labels"].items() if k != LABEL_HASH}
    labels[LABEL_ROLE] = "check"
    args = _create_args(spec, labels, engine_nofile_limit(cli, spec["image"]))
    args.update(name=name, command=list(command))
    args.pop("ports", None)
    args["host_config"].pop("port_bindings", None)
    args["host_config"]["restart_policy"] = {"Name": "no"}
    container = None
    try:
        container = _create(cli, args)
        container.start()
        try:
            status = container.wait(timeout=timeout).get("StatusCode")
        except RequestException:
            # The SDK's wait() gives up with a requests timeout; stop the command before reading its output.
            container.kill()
            status = None
        output = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
    except DockerException as exc:
        raise ContainerError(
            "cannot run %s in a container of %s: %s" % (" ".join(command), spec["image"], exc)
        ) from None
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except DockerException:
                pass
    return status, output


def exec_in(container, argv: list) -> tuple[int, str]:
    """Run ``argv`` in the running ``container``: (exit code, stdout and stderr as text)."""
    try:
        code, output = container.exec_run(argv, stdout=True, stderr=True)
    except DockerException as exc:
        raise ContainerError("cannot run %s in %s: %s" % (" ".join(argv), container.name, exc)) from None
    return code, (output or b"").decode("utf-8", "replace")


def stop_container(container, timeout: int) -> None:
    """Stop the running ``container`` (SIGTERM, then SIGKILL after ``timeout`` seconds); it stays."""
    try:
        container.stop(timeout=timeout)
    except DockerException as exc:
        raise ContainerError("cannot stop %s: %s" % (container.name, exc)) from None


def start_container(container, timeout: float, ready=None) -> None:
    """Start the stopped ``container`` and wait until it is ready (as after a create, see _wait_running)."""
    try:
        container.start()
    except DockerException as exc:
        raise ContainerError("cannot start %s: %s" % (container.name, exc)) from None
    _wait_running(container, timeout, ready)


def remove_container(
    cli, name: str, check_mode: bool, role: str | None = None, stop_timeout: int | None = None
) -> bool:
    """Remove our container ``name`` (of ``role`` when given); whether there was one.

    ``stop_timeout`` as in a spec: seconds for a graceful stop first.
    """
    current = find_container(cli, name)
    if current is None:
        return False
    _check_ours(current, "container", name, role)
    if not check_mode:
        _remove(current, stop_timeout)
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


def network_plan(cli, name: str, subnets: list, labels: dict) -> str:
    """create, recreate or none for a bridge network with exactly ``subnets`` (IPv6 on when one is v6)."""
    current = find_network(cli, name)
    if current is None:
        return "create"
    _check_ours(current, "network", name)
    if sorted(network_subnets(current)) != sorted(subnets) or any(
        (current.attrs.get("Labels") or {}).get(k) != v for k, v in labels.items()
    ):
        return "recreate"
    return "none"


def converge_network(cli, name: str, subnets: list, labels: dict, action: str) -> None:
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
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=s) for s in subnets])
        cli.networks.create(
            name,
            driver="bridge",
            ipam=ipam,
            labels=labels,
            check_duplicate=True,
            enable_ipv6=any(":" in s for s in subnets),
        )
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
