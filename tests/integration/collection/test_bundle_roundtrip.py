"""Dark-site round trip: make a bundle of the real images, lose one, load it back with the module.

Needs the Docker engine and the images of ``make images``. The images are tagged once more
under a repository prefix of this test run (``gatehouse-test-<random>/<name>:<version>``) and
the bundle is made of those tags, so the test never touches ``gatehouse/*`` - other work on the
same engine (a rebuild, a running deployment) is not disturbed, and a rebuild during the test
does not change what the bundle holds. The test tags are removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT, ensure_importable, run_module

docker = pytest.importorskip("docker")
pytestmark = [pytest.mark.docker, pytest.mark.images]

IMAGES = ("broker", "cm", "sg", "agent", "halb")
VICTIM = "agent"


def version() -> str:
    import yaml

    return str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    try:
        cli = docker.from_env()
        cli.ping()
    except Exception as exc:  # any failure means: no engine here
        pytest.skip(f"Docker engine not reachable: {exc}")
    missing = [
        f"gatehouse/{n}:{version()}" for n in IMAGES if not cli.images.list(name=f"gatehouse/{n}:{version()}")
    ]
    if missing:
        pytest.skip(f"images not built (run 'make images'): {', '.join(missing)}")
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def repository(client: docker.DockerClient) -> Iterator[str]:
    """A repository prefix of this run; every service image is tagged below it."""
    prefix = f"gatehouse-test-{uuid.uuid4().hex[:8]}/"
    tags = []
    try:
        for name in IMAGES:
            image = client.images.get(f"gatehouse/{name}:{version()}")
            image.tag(f"{prefix}{name}", version())
            tags.append(f"{prefix}{name}:{version()}")
        yield prefix
    finally:
        for tag in tags:
            try:
                client.images.remove(tag, noprune=True)
            except docker.errors.ImageNotFound:
                pass
            except docker.errors.APIError:
                client.images.remove(tag, force=True, noprune=True)


@pytest.fixture(scope="module")
def bundle(repository: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "hack" / "make-bundle.py"),
            "--output",
            str(out),
            "--repository",
            repository,
        ],
        check=True,
    )
    path = out / f"gatehouse-bundle-{version()}.tar.gz"
    assert path.is_file()
    return path


def image_id(client: docker.DockerClient, tag: str) -> str | None:
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def untag(client: docker.DockerClient, tag: str) -> None:
    # Removing the tag is what the module notices; the image data goes too unless another tag
    # (gatehouse/<name>) still holds it.
    client.images.remove(tag, noprune=True)
    assert image_id(client, tag) is None


def test_bundle_layout(bundle: Path) -> None:
    top = f"gatehouse-bundle-{version()}"
    with tarfile.open(bundle, "r:gz") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(f"{top}/manifest.json"))
        sums = tar.extractfile(f"{top}/SHA256SUMS").read().decode()
    assert names[:3] == [top, f"{top}/SHA256SUMS", f"{top}/manifest.json"]
    dependencies = manifest["dependencies"]
    assert {name.rsplit("-", 1)[0] for name in dependencies} == {
        "ansible-posix",
        "community-crypto",
        "community-docker",
        "community-library_inventory_filtering_v1",
    }
    assert set(names) == {
        top,
        f"{top}/SHA256SUMS",
        f"{top}/manifest.json",
        f"{top}/images.tar",
        f"{top}/gatehouse-access-{version()}.tar.gz",
        *(f"{top}/{name}" for name in dependencies),
    }
    assert manifest["version"] == version()
    assert sorted(i["name"] for i in manifest["images"]) == sorted(IMAGES)
    assert {line.split()[1] for line in sums.splitlines()} == {
        "manifest.json",
        "images.tar",
        f"gatehouse-access-{version()}.tar.gz",
        *dependencies,
    }


def tampered_copies(bundle: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    """(bundle, name the refusal must mention): a modified member unpacked and re-archived, and
    the archive cut in half."""
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = tmp_path / f"gatehouse-bundle-{version()}"
    collection = unpacked / f"gatehouse-access-{version()}.tar.gz"
    data = bytearray(collection.read_bytes())
    data[100] ^= 0xFF
    collection.write_bytes(bytes(data))
    rearchived = tmp_path / "tampered.tar"  # uncompressed: the module reads any tar compression
    with tarfile.open(rearchived, "w") as tar:
        tar.add(unpacked, arcname=unpacked.name)
    truncated = tmp_path / "truncated.tar.gz"
    with open(bundle, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(bundle.stat().st_size // 2))
    return [(unpacked, collection.name), (rearchived, collection.name), (truncated, "truncated")]


def restore(client: docker.DockerClient, bundle: Path, tag: str, expected: str | None) -> None:
    """Put the victim image back from the bundle when a test left it missing or wrong."""
    if image_id(client, tag) != expected:
        with tarfile.open(bundle, "r:gz") as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/images.tar"))
            client.images.load(tar.extractfile(member).read())


def test_round_trip(client: docker.DockerClient, repository: str, bundle: Path, tmp_path: Path) -> None:
    """Lose an image; tampered bundles load nothing; check mode loads nothing; the good bundle
    brings it back; a second run changes nothing."""
    tag = f"{repository}{VICTIM}:{version()}"
    expected = image_id(client, tag)
    assert expected is not None
    bad_bundles = tampered_copies(bundle, tmp_path)
    try:
        untag(client, tag)

        for path, culprit in bad_bundles:
            refused = run_module("bundle", {"path": str(path)})
            assert refused.failed, refused.result
            assert culprit in refused.result["msg"]
            assert "nothing loaded" in refused.result["msg"]
            assert image_id(client, tag) is None, f"{path.name} loaded an image"
        verify_only = run_module("bundle", {"path": str(bad_bundles[0][0]), "state": "verified"})
        assert verify_only.failed
        assert bad_bundles[0][1] in verify_only.result["msg"]

        preview = run_module("bundle", {"path": str(bundle)}, check=True, diff=True)
        assert not preview.failed, preview.result
        assert preview.changed
        assert image_id(client, tag) is None, "check mode loaded an image"
        assert preview.result["diff"]["before"]["images"][tag] is None
        assert preview.result["diff"]["after"]["images"][tag] == expected

        first = run_module("bundle", {"path": str(bundle)}, diff=True)
        assert not first.failed, first.result
        assert first.changed
        loaded = {i["name"]: i["loaded"] for i in first.result["images"]}
        assert loaded == {name: name == VICTIM for name in IMAGES}
        assert image_id(client, tag) == expected

        second = run_module("bundle", {"path": str(bundle)})
        assert not second.failed, second.result
        assert not second.changed
        assert not any(i["loaded"] for i in second.result["images"])
    finally:
        restore(client, bundle, tag, expected)
    assert image_id(client, tag) == expected


def test_verified_state_on_good_bundle(bundle: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = run_module("bundle", {"path": str(bundle), "state": "verified", "tmp_dir": str(scratch)})
    assert not run.failed, run.result
    assert not run.changed
    names = {f["name"] for f in run.result["files"]}
    assert {
        "images.tar",
        "manifest.json",
        f"gatehouse-access-{version()}.tar.gz",
        "ansible-posix-2.1.0.tar.gz",
    } <= names
    assert len(names) == 7  # and community.crypto, community.docker and its inventory library
    assert list(scratch.iterdir()) == []


def test_collection_tarball_installs(bundle: Path, tmp_path: Path) -> None:
    """The collection inside the bundle installs offline with ansible-galaxy."""
    with tarfile.open(bundle, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"gatehouse-access-{version()}.tar.gz"))
        (tmp_path / "c.tar.gz").write_bytes(tar.extractfile(member).read())
    galaxy = shutil.which("ansible-galaxy", path=str(Path(sys.executable).parent)) or "ansible-galaxy"
    subprocess.run(
        [galaxy, "collection", "install", "--offline", "-p", str(tmp_path / "c"), str(tmp_path / "c.tar.gz")],
        check=True,
        capture_output=True,
    )
    installed = tmp_path / "c" / "ansible_collections" / "gatehouse" / "access"
    assert (installed / "plugins" / "modules" / "bundle.py").is_file()
    assert not (installed / ".venv").exists()
    assert not (installed / "hack").exists()
    with tarfile.open(tmp_path / "c.tar.gz") as tar:
        assert not [n for n in tar.getnames() if "__pycache__" in n or n.endswith(".pyc")]


def _galaxy(*args: str | Path, collections: Path) -> subprocess.CompletedProcess[str]:
    """ansible-galaxy that sees only ``collections`` (not the collections of the ``ansible``
    package in the test's virtualenv), as on a controller that has nothing yet."""
    env = dict(
        os.environ, ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false", ANSIBLE_COLLECTIONS_PATH=str(collections)
    )
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-galaxy"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_bundle_installs_the_collection_and_its_dependencies_offline(
    bundle: Path, tmp_path: Path
) -> None:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    top = tmp_path / f"gatehouse-bundle-{version()}"
    manifest = json.loads((top / "manifest.json").read_text())
    collection = top / manifest["collection"]

    # The collection declares what it needs: alone, it does not install without Galaxy.
    alone = _galaxy(
        "collection",
        "install",
        "--offline",
        "-p",
        tmp_path / "alone",
        collection,
        collections=tmp_path / "alone",
    )
    assert alone.returncode != 0
    assert "ansible.posix" in alone.stdout + alone.stderr

    dest = tmp_path / "collections"
    tarballs = sorted(top.glob("*.tar.gz"))
    assert {t.name for t in tarballs} == {manifest["collection"], *manifest["dependencies"]}
    run = _galaxy("collection", "install", "--offline", "-p", dest, *tarballs, collections=dest)
    assert run.returncode == 0, run.stdout + run.stderr
    listed = _galaxy("collection", "list", "--format", "json", "-p", dest, collections=dest)
    installed = {
        name: info["version"]
        for name, info in json.loads(listed.stdout)[str(dest / "ansible_collections")].items()
    }
    assert set(installed) == {
        "gatehouse.access",
        "ansible.posix",
        "community.crypto",
        "community.docker",
        "community.library_inventory_filtering_v1",
    }
    assert installed["gatehouse.access"] == version()
    verified = _galaxy("collection", "verify", "--offline", "-p", dest, "gatehouse.access", collections=dest)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # An execution environment built with ansible-builder gets the collection's Python requirements
    # from meta/execution-environment.yml.
    introspect = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-builder"), "introspect", str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert introspect.returncode == 0, introspect.stderr
    python = yaml.safe_load(introspect.stdout)["python"]
    ours = [
        entry.split("#")[0].strip() for entry in python if entry.endswith("from collection gatehouse.access")
    ]
    assert ours == ["docker>=7.0.0", "cryptography>=41.0.0"], introspect.stdout


def test_bundle_path_of_the_deployment_modules_is_verified_first(
    client: docker.DockerClient, repository: str, bundle: Path, tmp_path: Path
) -> None:
    """cmsg and broker load a missing image from ``bundle_path`` with the bundle module's checks."""
    ensure_importable()
    from ansible_collections.gatehouse.access.plugins.module_utils._deploy.common import load_bundle
    from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import ContainerError

    tag = f"{repository}{VICTIM}:{version()}"
    expected = image_id(client, tag)
    bad_bundles = tampered_copies(bundle, tmp_path)
    try:
        untag(client, tag)
        for path, culprit in bad_bundles:
            with pytest.raises(ContainerError, match=culprit):
                load_bundle(client, str(path), check_mode=False)
            assert image_id(client, tag) is None, f"{path.name} loaded an image"
        assert load_bundle(client, str(bundle), check_mode=True) == [tag]
        assert image_id(client, tag) is None, "check mode loaded an image"
        assert load_bundle(client, str(bundle), check_mode=False) == [tag]
        assert image_id(client, tag) == expected
        assert load_bundle(client, str(bundle), check_mode=False) == []
    finally:
        restore(client, bundle, tag, expected)
    assert image_id(client, tag) == expected
