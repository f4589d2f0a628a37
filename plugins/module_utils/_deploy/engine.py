# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The deploy engine of the deployment modules cmsg, broker, monitoring and halb (private to the collection).

A module checks its options, reads what it needs from the host and describes the state it
wants as a ``Deployment``: the files and directories of its data directory, its containers
(each with the files it reads), the ids of their images, an optional bridge network, and what
other configurations leave behind (containers, files). The engine does the rest, the same way
for every module::

    deployment.plan(cli)                        compare with the host (reads only)
    deployment.apply(cli, check_mode, timeout)  change the host (nothing in check mode)
    deployment.result(config, warnings)         the module's result

``uninstall()`` removes what a deployment made. The data directory of the modules built on
``resolve_images`` and ``data_dirs`` has the same layout: ``docker-compose.yaml``, ``data/``
(configuration, state) and ``certs/`` (TLS). A deployment may do without the compose file.

A container may take some of its files up while it runs (a ``Reload``): a change of them is
checked on staged copies before anything is written and then applied by a reload hook instead
of a new container, so these files stay out of its spec hash.

Invariants:

- Nothing is changed before every check passed. A module raises its errors before it builds a
  Deployment, and apply() runs every Reload's validation hook before it writes anything;
  resolve_images() loads or pulls an image only when no error was found (with errors it looks
  as in check mode, so that its problems are reported too).
- Check mode computes the same plan, ``changed`` flag and diff as a real run: plan() only reads,
  apply() in check mode only validates and asks the reload hooks what they would do, and the
  diff is taken before anything is written.
- Directories are set up first, then every changed file is written atomically (a temporary file
  with its mode and owner, renamed over the old one: PlannedFile.apply).
- A container's spec hash covers its spec, its image id, the contents of the files it reads and
  the module's further inputs, not the files of its Reload; the container is (re)created exactly
  when the hash differs from its label or it is missing, and started when it is stopped. A
  running container whose reloaded files changed (content, or a removed stale file) gets its
  reload hook instead. The compose file is read by no container: it documents what runs.
- A replaced network recreates its containers (Docker cannot keep them without it).
- A file that no configuration names any more is removed only after the containers that could
  read it are converged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    PlannedDir,
    PlannedFile,
    read_bytes,
    remove_paths,
    sha256,
    write_atomic,
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


def run_by_state(module, validate: Callable, install: Callable, uninstall: Callable) -> dict:
    """The run() of a module with the usual shape: ``validate(params)`` raises on bad options, then
    ``uninstall(cli, params, check_mode)`` for state=absent, else ``install(module, cli, params)``."""
    params = module.params
    validate(params)
    cli = ctr.client(params["docker_host"])
    if params["state"] == "absent":
        return uninstall(cli, params, module.check_mode)
    return install(module, cli, params)


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
class Reload:
    """Files a running container takes up by a reload, so that changing them keeps the container.

    ``files`` names them by base name, like Container.reads (None: every file of the deployment);
    they never enter the spec hash. A stale file with such a name counts as changed too.

    ``validate(cli, stage)`` runs when one of them changed, in check mode too, before anything is
    written: ``stage`` is a private copy of the deployment's planned directories (with their
    modes) and files, laid out like the data directory and removed afterwards. It raises Failure
    to refuse; then nothing on the host has changed.

    ``apply(cli, changed, removed, check_mode)`` runs when the container is kept (action none)
    and one of them changed, after the files are written: ``changed`` are the PlannedFiles whose
    content changed (``before`` is the old content), ``removed`` the stale paths. It returns what
    it did, or in check mode would do (for the module's result); it raises ContainerError.
    """

    apply: Callable
    validate: Callable | None = None
    files: tuple[str, ...] | None = None

    def covers(self, path: str) -> bool:
        return self.files is None or os.path.basename(path) in self.files


@dataclass
class Container:
    """One container of a deployment and the inputs of its spec hash.

    ``reads`` names the files the container reads by their base name (``cert.pem``); None means
    every file of the deployment. ``inputs`` are further hash inputs (a rendered configuration,
    the network). ``reload`` takes some of its files up while it runs (they leave the hash);
    ``ready`` is a readiness test of a (re)started container (see converge_container). ``hash``,
    ``action`` (none, create, recreate, start) and ``reloads`` (the changed files of its Reload:
    a reload when the action is none) are set by plan(); ``reloaded`` (what the reload hook did)
    by apply().
    """

    spec: dict
    reads: tuple[str, ...] | None = None
    inputs: dict = field(default_factory=dict)
    reload: Reload | None = None
    ready: Callable | None = None
    hash: str = field(default="", init=False)
    action: str = field(default="none", init=False)
    reloads: list[str] = field(default_factory=list, init=False)
    reloaded: list[str] = field(default_factory=list, init=False)

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
    (path, shown) of files to remove: the diff shows ``shown`` as the removed content, or the
    content itself when it is None. ``compose`` False: no compose file. The fields after them
    are set by plan().
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
    stale_files: list[tuple[str, str | None]] = field(default_factory=list)
    compose: bool = True
    network_action: str = field(default="none", init=False)
    stale_network: bool = field(default=False, init=False)
    stale_containers: list[str] = field(default_factory=list, init=False)
    changed_files: list[str] = field(default_factory=list, init=False)
    diff: list[dict] = field(default_factory=list, init=False)
    changed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.compose:
            compose = dep.render_compose([c.spec for c in self.containers], self.network)
            self.files = [PlannedFile(os.path.join(self.data_dir, COMPOSE), compose, 0o644), *self.files]

    def plan(self, cli) -> None:
        """Compare with the host: container hashes and actions, the network, what is stale, the diff."""
        compose = os.path.join(self.data_dir, COMPOSE) if self.compose else None
        read = {os.path.basename(f.path): f for f in self.files if f.path != compose}
        stale_paths = [path for path, _shown in self.stale_files]
        for container in self.containers:
            reload = container.reload
            names = read if container.reads is None else [n for n in container.reads if n in read]
            if reload is not None:
                names = [n for n in names if not reload.covers(n)]
                container.reloads = [
                    f.path for f in read.values() if reload.covers(f.path) and f.content_changed
                ] + [path for path in stale_paths if reload.covers(path)]
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
        self.changed_files = (
            [f.path for f in self.files if f.changed] + [d.path for d in self.dirs if d.changed] + stale_paths
        )
        self.diff = [f.diff() for f in self.files if f.changed]
        self.diff += [_removed_diff(path, shown) for path, shown in self.stale_files]
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
        """Validate, then carry out the plan; raises Failure (changed, changed_files) when Docker refuses.

        A refusal of a validation hook is raised as it is (nothing was changed). In check mode
        only the validation hooks run, and the reload hooks say what they would do.
        """
        if not self.changed:
            return
        for container in self.containers:
            if container.reloads and container.reload.validate is not None:
                self._validate(cli, container.reload.validate)
        if check_mode:
            for container in self.containers:
                if container.reloads and container.action == "none":
                    container.reloaded = self._reload(cli, container, True)
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
                action = actions[container.name]
                ctr.converge_container(
                    cli, container.spec, container.hash, action, wait_timeout, container.ready
                )
                if container.reloads and action == "none":
                    container.reloaded = self._reload(cli, container, False)
        except ctr.ContainerError as exc:
            raise Failure(str(exc), changed=True, changed_files=self.changed_files) from None
        for path, _shown in self.stale_files:
            os.unlink(path)

    def _validate(self, cli, validate: Callable) -> None:
        """Run ``validate`` on a private staged copy of the planned directories and files."""
        stage = tempfile.mkdtemp(prefix="gatehouse-stage-")
        try:
            for planned_dir in sorted(self.dirs, key=lambda d: d.path):
                target = os.path.normpath(
                    os.path.join(stage, os.path.relpath(planned_dir.path, self.data_dir))
                )
                if target != stage:  # the stage itself stays private (0700)
                    os.makedirs(target, mode=0o700, exist_ok=True)
                    os.chmod(target, planned_dir.mode)
            for planned in self.files:
                target = os.path.join(stage, os.path.relpath(planned.path, self.data_dir))
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                write_atomic(target, planned.data, planned.mode)
            validate(cli, stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _reload(self, cli, container: Container, check_mode: bool) -> list[str]:
        stale = [path for path, _shown in self.stale_files]
        changed = [f for f in self.files if f.path in container.reloads]
        removed = [path for path in container.reloads if path in stale]
        return container.reload.apply(cli, changed, removed, check_mode)

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


def _removed_diff(path: str, shown: str | None) -> dict:
    before = shown if shown is not None else (read_bytes(path) or b"").decode("utf-8", "replace")
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
    kept: tuple[list[str], str, bool] | None = None,
) -> dict:
    """Remove the containers, the network and the files a deployment wrote, then its empty directories.

    Files are named: the compose file, ``data_files`` in data/, the TLS files and ``cert_files``
    in certs/, and ``more_files``; the directories are data/, certs/, ``more_dirs`` and the data
    directory. A directory that still holds other files is kept (``left_behind``, warned about):
    nothing of the operator's is deleted. ``kept`` is (directories, what they hold, purge): the
    service's own data (a database, time series), deleted whole only with purge, once the
    containers that write there are gone; otherwise kept with a warning of its own.
    """
    data, certs_dir = os.path.join(data_dir, DATA), os.path.join(data_dir, CERTS)
    removed_containers = [n for n in containers if ctr.remove_container(cli, n, check_mode)]
    network_removed = bool(network_name) and ctr.remove_network(cli, network_name, check_mode)
    files = [os.path.join(data_dir, COMPOSE)]
    files += [os.path.join(data, n) for n in data_files]
    files += [os.path.join(certs_dir, n) for n in (*TLS_FILES, *cert_files)]
    files += more_files or []
    kept_dirs, kept_what, purge = kept or ([], "", False)
    removed, left = remove_paths(
        files, [data, certs_dir, *(more_dirs or []), *kept_dirs, data_dir], check_mode
    )

    def in_kept(path: str) -> bool:
        return any(path == k or path.startswith(k + os.sep) for k in kept_dirs)

    if purge:
        for path in kept_dirs:
            if os.path.isdir(path):
                if not check_mode:
                    shutil.rmtree(path)
                removed.append(path)
        left = [p for p in left if not in_kept(p)]
        if not left and os.path.isdir(data_dir):
            if not check_mode and not os.listdir(data_dir):
                os.rmdir(data_dir)
            removed.append(data_dir)
    result = {
        "changed": bool(removed_containers or network_removed or removed),
        "containers": [{"name": n, "action": "removed"} for n in removed_containers],
        "changed_files": removed,
        "left_behind": left,
        "warnings_list": [],
    }
    if network_name:
        result["network"] = {"name": network_name, "action": "removed" if network_removed else "none"}
    if any(in_kept(p) for p in left):
        result["warnings_list"].append("kept the %s; set purge=true to delete it" % kept_what)
    others = [p for p in left if not in_kept(p)]
    if others:
        result["warnings_list"].append(
            "kept %s: files not written by %s are never deleted" % (", ".join(others), managed_by)
        )
    return result
