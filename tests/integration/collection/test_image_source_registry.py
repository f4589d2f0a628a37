"""gatehouse.access.cmsg and gatehouse.access.broker with ``image_source: registry`` against a real registry.

The registry is gatehouse/registry-test (Debian's docker-registry, files/images/registry-test),
serving plain HTTP on a port published on 127.0.0.1: the Docker engine trusts registries on
127.0.0.0/8 without TLS, so pushing and pulling need no change to the daemon. The images
gatehouse/cm, sg and broker are pushed to it and their registry references removed from the
engine, so the modules have to pull them:

  cmsg from ``127.0.0.1:<port>`` (references ``127.0.0.1:<port>/gatehouse/<name>:<tag>``) and
  broker from ``127.0.0.1:<port>/mirror`` (a registry prefix with a path).

Check mode reports the pulls and pulls nothing; the real run pulls and runs the containers from
the pulled images; the next run pulls nothing and changes nothing. A registry that is down, a tag
it does not have, invalid options and a layer that fails its checksum all fail the task with the
reason and leave the host as it was. Everything created here (registry, containers, networks,
pulled references, data directories) is removed afterwards, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module
from deploy_helpers import (
    IMAGE_TAG,
    cleanup,
    docker_client,
    free_cidr,
    objects_named,
    require_service_images,
    unique_prefix,
)
from services import free_port
from tls_material import Chain, pem, write

try:
    import docker
except ImportError:  # pragma: no cover - the virtualenv has it
    docker = None

pytestmark = [pytest.mark.docker, pytest.mark.images]

REGISTRY_IMAGE = f"gatehouse/registry-test:{IMAGE_TAG}"
ROLES = ("cm", "sg", "broker")
ADMIN = "registry-admin-" + "r" * 24


@dataclass
class Registry:
    cli: Any
    prefix: str  # of every Docker object and directory of this module's tests
    root: Path
    container: Any
    port: int
    pushed: dict[str, str]  # role -> id of the image pushed as gatehouse/<role>:<tag>

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, role: str, registry: str | None = None, tag: str = IMAGE_TAG) -> str:
        return f"{registry or self.host}/gatehouse/{role}:{tag}"

    def local(self, ref: str) -> str | None:
        """The id of ``ref`` on the engine, None when the engine does not have it."""
        try:
            return self.cli.images.get(ref).id
        except docker.errors.ImageNotFound:
            return None

    def push(self, source: str, ref: str) -> str:
        """Push the image ``source`` as ``ref``, then drop ``ref`` from the engine; returns its id."""
        image = self.cli.images.get(source)
        repository, _sep, tag = ref.rpartition(":")
        image.tag(repository, tag)
        try:
            for event in self.cli.api.push(repository, tag=tag, stream=True, decode=True):
                assert not event.get("error"), f"push {ref}: {event}"
        finally:
            self.untag(ref)
        return image.id

    def untag(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.cli.images.remove(ref)

    def untag_pulled(self) -> None:
        """Remove every reference of this registry from the engine (the images stay under their own tags)."""
        for image in self.cli.images.list():
            for ref in image.tags:
                if ref.startswith(f"{self.host}/"):
                    self.untag(ref)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.container.reload()
                raise AssertionError(f"registry not ready: {self.container.status}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    cli = docker_client()
    try:
        cli.images.get(REGISTRY_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {REGISTRY_IMAGE} is not built yet (IMAGES=registry-test hack/build-images.sh)")
    require_service_images(cli, *ROLES)
    prefix = unique_prefix("registry")
    root = tmp_path_factory.mktemp("registry")
    reg = None
    try:
        port = free_port()
        container = cli.containers.run(
            REGISTRY_IMAGE,
            name=f"{prefix}-registry",
            detach=True,
            ports={"5000/tcp": ("127.0.0.1", port)},
            labels={"gatehouse.test": "test_image_source_registry"},
        )
        reg = Registry(cli, prefix, root, container, port, {})
        reg.wait_ready()
        reg.pushed = {role: reg.push(f"gatehouse/{role}:{IMAGE_TAG}", reg.ref(role)) for role in ("cm", "sg")}
        reg.pushed["broker"] = reg.push(f"gatehouse/broker:{IMAGE_TAG}", reg.ref("broker", mirror(reg)))
        yield reg
    finally:
        # Containers first: a reference in use by one cannot be removed.
        cleanup(cli, prefix)
        if reg is not None:
            reg.untag_pulled()
        shutil.rmtree(root, ignore_errors=True)


def mirror(reg: Registry) -> str:
    """The broker's registry prefix: one with a path."""
    return f"{reg.host}/mirror"


def cmsg_args(reg: Registry, name: str, registry: str) -> dict[str, Any]:
    ca = reg.root / "deployment-ca.pem"
    if not ca.exists():
        write(ca, pem(Chain().root))
    return {
        "image_source": "registry",
        "registry": registry,
        "agent_ca_cert": str(ca),
        "accept_policies": True,
        "broker_url": "https://broker.gatehouse.test:8443",
        "external_pcoip_ip": ["192.0.2.10"],
        "host_address": ["cmsg1.gatehouse.test"],
        "self_signed": True,
        "data_dir": str(reg.root / name),
        "name_prefix": f"{reg.prefix}-{name}",
        "network_mode": "bridge",
        "docker_network_cidr": free_cidr(reg.cli),
        "https_port": free_port(),
        "http_port": free_port(),
        "pcoip_port": free_port(),
        # Not the default 9180 and 9172: other bridge-mode deployments may run on this host.
        "cm_admin_host_port": free_port(),
        "sg_admin_host_port": free_port(),
        "host_label": "node1",
        "wait_timeout": 90,
    }


def broker_args(reg: Registry, name: str, registry: str) -> dict[str, Any]:
    ca = reg.root / "deployment-ca.pem"
    if not ca.exists():
        write(ca, pem(Chain().root))
    return {
        "image_source": "registry",
        "registry": registry,
        "admin_token": ADMIN,
        "client_ca_cert": str(ca),
        "self_signed": True,
        "data_dir": str(reg.root / name),
        "name_prefix": f"{reg.prefix}-{name}",
        "network_mode": "bridge",
        "https_port": free_port(),
        "host_label": "broker1",
        "wait_timeout": 90,
    }


def assert_untouched(reg: Registry, args: dict[str, Any], refs: list[str]) -> None:
    """Nothing of a failed or check run is left: no files, no Docker objects, no pulled image."""
    assert not Path(args["data_dir"]).exists(), "files were written"
    assert objects_named(reg.cli, args["name_prefix"]) == [], "Docker objects were created"
    for ref in refs:
        assert reg.local(ref) is None, f"{ref} was pulled"


def remove_deployment(module: str, args: dict[str, Any]) -> None:
    gone = run_module(
        module, {"state": "absent", "data_dir": args["data_dir"], "name_prefix": args["name_prefix"]}
    )
    assert not gone.failed, gone.result


def test_cmsg_pulls_from_the_registry(registry: Registry) -> None:
    reg = registry
    args = cmsg_args(reg, "cmsg", reg.host)
    prefix = args["name_prefix"]
    refs = [reg.ref("cm"), reg.ref("sg")]
    assert_untouched(reg, args, refs)

    check = run_module("cmsg", args, check=True)
    assert not check.failed, check.result
    assert check.changed
    assert check.result["images_loaded"] == refs
    assert check.result["config"]["images"] == {"cm": refs[0], "sg": refs[1]}
    assert {c["name"]: c["action"] for c in check.result["containers"]} == {
        f"{prefix}-cm": "create",
        f"{prefix}-sg": "create",
    }
    assert_untouched(reg, args, refs)

    try:
        real = run_module("cmsg", args)
        assert not real.failed, real.result.get("msg")
        assert real.changed and real.result["images_loaded"] == refs
        for role, ref in zip(("cm", "sg"), refs, strict=True):
            assert reg.local(ref) == reg.pushed[role], f"{ref} is not the image pushed"
            container = reg.cli.containers.get(f"{prefix}-{role}")
            assert container.status == "running", reg.logs()
            assert container.attrs["Config"]["Image"] == ref
            assert container.attrs["Image"] == reg.pushed[role]

        again_check = run_module("cmsg", args, check=True)
        assert not again_check.failed and not again_check.changed, again_check.result
        again = run_module("cmsg", args)
        assert not again.failed and not again.changed, again.result
        assert again.result["images_loaded"] == [] and again.result["containers"] == []
    finally:
        remove_deployment("cmsg", args)
        for ref in refs:
            reg.untag(ref)


def test_broker_pulls_from_a_registry_path(registry: Registry) -> None:
    reg = registry
    args = broker_args(reg, "broker", mirror(reg) + "/")  # a trailing slash is dropped
    ref = reg.ref("broker", mirror(reg))
    assert_untouched(reg, args, [ref])

    check = run_module("broker", args, check=True)
    assert not check.failed, check.result
    assert check.changed and check.result["images_loaded"] == [ref]
    assert check.result["config"]["image"] == ref
    assert check.result["containers"] == [{"name": f"{args['name_prefix']}-broker", "action": "create"}]
    assert_untouched(reg, args, [ref])

    try:
        real = run_module("broker", args)
        assert not real.failed, real.result.get("msg")
        assert real.changed and real.result["images_loaded"] == [ref]
        assert reg.local(ref) == reg.pushed["broker"]
        container = reg.cli.containers.get(f"{args['name_prefix']}-broker")
        assert container.status == "running"
        assert container.attrs["Config"]["Image"] == ref
        assert container.attrs["Image"] == reg.pushed["broker"]

        assert not run_module("broker", args, check=True).changed
        again = run_module("broker", args)
        assert not again.failed and not again.changed, again.result
        assert again.result["images_loaded"] == []
    finally:
        remove_deployment("broker", args)
        reg.untag(ref)


def test_registry_down_changes_nothing(registry: Registry) -> None:
    reg = registry
    cmsg = cmsg_args(reg, "down-cmsg", reg.host)
    broker = broker_args(reg, "down-broker", mirror(reg))
    refs = [reg.ref("cm"), reg.ref("sg"), reg.ref("broker", mirror(reg))]
    reg.container.stop(timeout=10)
    try:
        for module, args in (("cmsg", cmsg), ("broker", broker)):
            for check in (True, False):
                run = run_module(module, args, check=check)
                assert run.failed, run.result
                msg = run.result["msg"]
                assert f"cannot pull {reg.host}/" in msg and "connection refused" in msg, msg
                assert not run.changed
                assert_untouched(reg, args, refs)
    finally:
        reg.container.start()
        reg.wait_ready()


def test_missing_tag_changes_nothing(registry: Registry) -> None:
    reg = registry
    cmsg = dict(cmsg_args(reg, "tag-cmsg", reg.host), image_tag="9.9.9")
    broker = dict(broker_args(reg, "tag-broker", mirror(reg)), image_tag="9.9.9")
    for module, args, ref in (
        ("cmsg", cmsg, reg.ref("cm", tag="9.9.9")),
        ("broker", broker, reg.ref("broker", mirror(reg), tag="9.9.9")),
    ):
        for check in (True, False):
            run = run_module(module, args, check=check)
            assert run.failed, run.result
            msg = run.result["msg"]
            assert f"cannot pull {ref}: the registry has no such image" in msg, msg
            assert "manifest unknown" in msg, msg
            assert_untouched(reg, args, [ref])


def test_invalid_options_pull_nothing(registry: Registry) -> None:
    """The task fails on its options before any image is pulled."""
    reg = registry
    missing = str(reg.root / "missing-ca.pem")
    cmsg = dict(cmsg_args(reg, "bad-cmsg", reg.host), broker_ca_cert=missing)
    broker = dict(broker_args(reg, "bad-broker", mirror(reg)), client_ca_cert=missing)
    refs = [reg.ref("cm"), reg.ref("sg"), reg.ref("broker", mirror(reg))]
    for module, args, reason in (
        ("cmsg", cmsg, "broker_ca_cert"),
        ("broker", broker, "client_ca_cert"),
    ):
        run = run_module(module, args)
        assert run.failed and reason in run.result["msg"], run.result
        assert_untouched(reg, args, refs)


def test_a_corrupt_layer_fails_with_the_engines_reason(registry: Registry) -> None:
    """A pull that fails after it started (here a layer whose content does not match its digest)
    reports the engine's reason, not just that the image is missing afterwards."""
    reg = registry
    tag = f"corrupt-{reg.prefix[-8:]}"
    ref = reg.ref("broker", mirror(reg), tag=tag)
    source = f"{reg.prefix}-tiny:1"
    # A one-layer image of one small file, pushed, then its layer overwritten in the registry's storage.
    layer = reg.root / "tiny"
    layer.mkdir()
    (layer / "payload").write_text("corrupt me\n")
    archive = reg.root / "tiny.tar"
    shutil.make_archive(str(archive.with_suffix("")), "tar", layer)
    with open(archive, "rb") as handle:
        reg.cli.api.import_image_from_data(handle.read(), repository=f"{reg.prefix}-tiny", tag="1")
    try:
        reg.push(source, ref)
    finally:
        reg.untag(source)
    repository = "mirror/gatehouse/broker"
    request = urllib.request.Request(
        f"http://{reg.host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        digest = json.loads(response.read())["layers"][0]["digest"].split(":", 1)[1]
    blob = f"/var/lib/docker-registry/docker/registry/v2/blobs/sha256/{digest[:2]}/{digest}/data"
    result = reg.container.exec_run(["sh", "-c", f'head -c "$(stat -c %s {blob})" /dev/zero > {blob}'])
    assert result.exit_code == 0, result.output

    args = dict(broker_args(reg, "corrupt-broker", mirror(reg)), image_tag=tag)
    check = run_module("broker", args, check=True)
    assert not check.failed and check.result["images_loaded"] == [ref], check.result  # the manifest is fine
    run = run_module("broker", args)
    assert run.failed, run.result
    msg = run.result["msg"]
    assert f"cannot pull {ref}: filesystem layer verification failed" in msg, msg
    assert_untouched(reg, args, [ref])
