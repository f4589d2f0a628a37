# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The deploy engine of the deployment modules cmsg and broker (private to the collection).

A module checks its options, reads what it needs from the host and describes the state it
wants as a ``Deployment``: the files and directories of its data directory, its containers
(each with the files it reads), the ids of their images, an optional bridge network, and what
other configurations leave behind (containers, files). The engine does the rest, the same way
for every module::

    deployment.plan(cli)                        compare with the host (reads only)
    deployment.apply(cli, check_mode, timeout)  change the host (nothing in check mode)
    deployment.result(config, warnings)         the module's result

``uninstall()`` removes what a deployment made. The data directory has the same layout for
every module: ``docker-compose.yaml``, ``data/`` (configuration, state) and ``certs/`` (TLS).

Invariants:

- Nothing is changed before every check passed. A module raises its errors before it builds a
  Deployment; resolve_images() loads or pulls an image only when no error was found (with
  errors it looks as in check mode, so that its problems are reported too).
- Check mode computes the same plan, ``changed`` flag and diff as a real run: plan() only reads,
  apply() in check mode does nothing, and the diff is taken before anything is written.
- Directories are set up first, then every changed file is written atomically (a temporary file
  with its mode and owner, renamed over the old one: PlannedFile.apply).
- A container's spec hash covers its spec, its image id, the contents of the files it reads and
  the module's further inputs; the container is (re)created exactly when the hash differs from
  its label or it is missing, and started when it is stopped. The compose file is read by no
  container: it documents what runs.
- A replaced network recreates its containers (Docker cannot keep them without it).
- A file that no configuration names any more is removed only after the containers that could
  read it are converged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    SECRET_TEXT,
    PlannedDir,
    PlannedFile,
    read_bytes,
    remove_paths,
    sha256,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

COMPOSE = "docker-compose.yaml"
DATA, CERTS = "data", "certs"
TLS_FILES = ("cert.pem", "key.pem", "ca.pem")
NOT_ROOT = "not running as root: files keep the current owner; %s as uid 10001"


# ------------------------------------------------------------------ before the plan


def check_network_target(cli, params: dict, errors: list[str]) -> None:
    """network_mode container:<name> needs that container on the Docker host."""
    if params["network_mode"].startswith("container:"):
        target = params["network_mode"].split(":", 1)[1]
        if not ctr.container_exists(cli, target):
            errors.append(
                "network_mode %s: there is no container %s on the Docker host"
                % (params["network_mode"], target)
            )


def resolve_images(cli, params: dict, services: list[str], check_mode: bool, errors: list[str]):
    """(references, ids, loaded) of the images of ``services``: local, from the registry or the bundle.

    A missing image is loaded from ``bundle_path`` (verified first) or pulled with
    image_source=registry; ``loaded`` lists the references loaded or pulled. An id is None in
    check mode when the image would come from the bundle or the registry. With ``errors``
    already found nothing is loaded or pulled and the registry is not asked: only the engine and
    the bundle are looked at. A problem is added to ``errors``.
    """
    registry = params["registry"] if params["image_source"] == "registry" else None
    refs = {service: ctr.image_ref(service, params["image_tag"], registry) for service in services}
    ids: dict = dict.fromkeys(services)
    loaded: list[str] = []
    failing = bool(errors)
    look_only = check_mode or failing
    bundle = params["bundle_path"]
    try:
        if bundle and any(ctr.image_id(cli, ref) is None for ref in refs.values()):
            loaded = dep.load_bundle(cli, bundle, look_only)
        for service, ref in refs.items():
            if look_only and bundle and ctr.image_id(cli, ref) is None:
                continue  # would come from the bundle
            ids[service], pulled = ctr.ensure_image(
                cli, ref, params["image_source"] == "registry", look_only, failing
            )
            if pulled:
                loaded.append(ref)
    except ctr.ContainerError as exc:
        errors.append(str(exc))
    return refs, ids, loaded


def service_owner() -> tuple[int | None, int | None]:
    """Owner of the files the services read: their user, or (None, None) when not root (see NOT_ROOT)."""
    if os.geteuid() != 0:
        return None, None
    return ctr.SERVICE_UID, ctr.SERVICE_GID


def data_dirs(data_dir: str, uid: int | None, gid: int | None) -> list[PlannedDir]:
    """The data directory and its data/ and certs/, readable by the services only."""
    return [
        PlannedDir(data_dir, 0o755),
        PlannedDir(os.path.join(data_dir, DATA), 0o750, uid, gid),
        PlannedDir(os.path.join(data_dir, CERTS), 0o750, uid, gid),
    ]


# ------------------------------------------------------------------ the deployment


@dataclass
class Container:
    """One container of a deployment and the inputs of its spec hash.

    ``reads`` names the files the container reads by their base name (``cert.pem``); None means
    every file of the deployment. ``inputs`` are further hash inputs (a rendered configuration,
    the network). ``hash`` and ``action`` (none, create, recreate, start) are set by plan().
    """

    spec: dict
    reads: tuple[str, ...] | None = None
    inputs: dict = field(default_factory=dict)
    hash: str = field(default="", init=False)
    action: str = field(default="none", init=False)

    @property
    def name(self) -> str:
        return self.spec["name"]


@dataclass
class Deployment:
    """What a module wants on the host; plan(), then apply(), then result().

    ``files`` and ``dirs`` are PlannedFile and PlannedDir objects (the compose file is added
    here, first). ``image_ids`` maps a container's ``service`` to its image id (None: the image is
    still to be loaded or pulled, so the container is to be created). ``network`` is the bridge
    network (dict: key, name, subnets, labels) or None; ``network_name`` names the deployment's
    network in the result, and when ``network`` is None such a network is removed. ``retired``
    names containers of other configurations, removed when present. ``stale_files`` lists
    (path, secret) of files to remove; a secret one never shows its content in the diff.
    The fields after them are set by plan().
    """

    data_dir: str
    files: list[PlannedFile]
    dirs: list[PlannedDir]
    containers: list[Container]
    image_ids: dict
    images_loaded: list[str]
    network: dict | None = None
    network_name: str | None = None
    retired: list[str] = field(default_factory=list)
    stale_files: list[tuple[str, bool]] = field(default_factory=list)
    network_action: str = field(default="none", init=False)
    stale_network: bool = field(default=False, init=False)
    stale_containers: list[str] = field(default_factory=list, init=False)
    changed_files: list[str] = field(default_factory=list, init=False)
    diff: list[dict] = field(default_factory=list, init=False)
    changed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        compose = dep.render_compose([c.spec for c in self.containers], self.network)
        self.files = [PlannedFile(os.path.join(self.data_dir, COMPOSE), compose, 0o644), *self.files]

    def plan(self, cli) -> None:
        """Compare with the host: container hashes and actions, the network, what is stale, the diff."""
        read = {os.path.basename(f.path): f for f in self.files[1:]}
        for container in self.containers:
            names = read if container.reads is None else [n for n in container.reads if n in read]
            inputs = {name: sha256(read[name].data) for name in names}
            inputs["image"] = self.image_ids.get(container.spec["service"])
            inputs.update(container.inputs)
            container.hash = ctr.spec_hash(container.spec, inputs)
            if inputs["image"] is None:
                container.action = "create"
            else:
                container.action = ctr.container_plan(cli, container.spec, container.hash)
        if self.network is not None:
            self.network_action = ctr.network_plan(
                cli, self.network["name"], self.network["subnets"], self.network["labels"]
            )
        elif self.network_name:
            self.stale_network = ctr.find_network(cli, self.network_name) is not None
        self.stale_containers = [n for n in self.retired if ctr.find_container(cli, n) is not None]
        stale_paths = [path for path, _secret in self.stale_files]
        self.changed_files = (
            [f.path for f in self.files if f.changed] + [d.path for d in self.dirs if d.changed] + stale_paths
        )
        self.diff = [f.diff() for f in self.files if f.changed]
        self.diff += [_removed_diff(path, secret) for path, secret in self.stale_files]
        self.changed = bool(
            self.changed_files
            or self.container_changes()
            or self.network_action != "none"
            or self.stale_network
            or self.images_loaded
        )

    def container_changes(self) -> list[dict]:
        changes = [{"name": c.name, "action": c.action} for c in self.containers if c.action != "none"]
        return changes + [{"name": n, "action": "removed"} for n in self.stale_containers]

    def apply(self, cli, check_mode: bool, wait_timeout: int | None) -> None:
        """Carry out the plan; raises Failure (changed, changed_files) when Docker refuses."""
        if check_mode or not self.changed:
            return
        for planned_dir in self.dirs:
            if planned_dir.changed:
                planned_dir.apply()
        for planned in self.files:
            if planned.changed:
                planned.apply()
        actions = {c.name: c.action for c in self.containers}
        try:
            for name in self.stale_containers:
                ctr.remove_container(cli, name, False)
            if self.stale_network:
                ctr.remove_network(cli, self.network_name, False)
            if self.network_action != "none":
                network = self.network
                ctr.converge_network(
                    cli, network["name"], network["subnets"], network["labels"], self.network_action
                )
                for name, action in actions.items():
                    if action in ("none", "start"):
                        actions[name] = "create"
            for container in self.containers:
                ctr.converge_container(
                    cli, container.spec, container.hash, actions[container.name], wait_timeout
                )
        except ctr.ContainerError as exc:
            raise Failure(str(exc), changed=True, changed_files=self.changed_files) from None
        for path, _secret in self.stale_files:
            os.unlink(path)

    def result(self, config: dict, warnings: list[str]) -> dict:
        """The module result; ``network`` only for a deployment that has one."""
        result = {
            "changed": self.changed,
            "changed_files": self.changed_files,
            "containers": self.container_changes(),
            "images_loaded": self.images_loaded,
            "config": config,
            "diff": self.diff,
            "warnings_list": warnings,
        }
        if self.network_name:
            action = "removed" if self.stale_network else self.network_action
            result["network"] = {"name": self.network_name, "action": action}
        return result


def _removed_diff(path: str, secret: bool) -> dict:
    before = SECRET_TEXT if secret else (read_bytes(path) or b"").decode("utf-8", "replace")
    return {"before_header": path, "after_header": path, "before": before, "after": ""}


# ------------------------------------------------------------------ state=absent


def uninstall(
    cli,
    check_mode: bool,
    data_dir: str,
    containers: list[str],
    data_files: tuple[str, ...],
    cert_files: tuple[str, ...],
    managed_by: str,
    more_files: list[str] | None = None,
    more_dirs: list[str] | None = None,
    network_name: str | None = None,
) -> dict:
    """Remove the containers, the network and the files a deployment wrote, then its empty directories.

    Files are named: the compose file, ``data_files`` in data/, the TLS files and ``cert_files``
    in certs/, and ``more_files``; the directories are data/, certs/, ``more_dirs`` and the data
    directory. A directory that still holds other files is kept (``left_behind``, warned about):
    nothing of the operator's is deleted.
    """
    data, certs_dir = os.path.join(data_dir, DATA), os.path.join(data_dir, CERTS)
    removed_containers = [n for n in containers if ctr.remove_container(cli, n, check_mode)]
    network_removed = bool(network_name) and ctr.remove_network(cli, network_name, check_mode)
    files = [os.path.join(data_dir, COMPOSE)]
    files += [os.path.join(data, n) for n in data_files]
    files += [os.path.join(certs_dir, n) for n in (*TLS_FILES, *cert_files)]
    files += more_files or []
    removed, left = remove_paths(files, [data, certs_dir, *(more_dirs or []), data_dir], check_mode)
    result = {
        "changed": bool(removed_containers or network_removed or removed),
        "containers": [{"name": n, "action": "removed"} for n in removed_containers],
        "changed_files": removed,
        "left_behind": left,
        "warnings_list": [],
    }
    if network_name:
        result["network"] = {"name": network_name, "action": "removed" if network_removed else "none"}
    if left:
        result["warnings_list"].append(
            "kept %s: files not written by %s are never deleted" % (", ".join(left), managed_by)
        )
    return result
