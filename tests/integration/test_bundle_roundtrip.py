"""Dark-site round trip: make a bundle of the real images, lose one, load it back with the module.

Needs the Docker engine and the images of ``make images``. The images are tagged once more
under a repository prefix of this test run (``gatehouse-test-<random>/<name>:<version>``) and
the bundle is made of those tags, so the test never touches ``gatehouse/*`` - other work on the
same engine (a rebuild, a running deployment) is not disturbed, and a rebuild during the test
does not change what the bundle holds. The test tags are removed at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collection_helpers import REPO_ROOT, run_module

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
    assert set(names) == {
        top,
        f"{top}/SHA256SUMS",
        f"{top}/manifest.json",
        f"{top}/images.tar",
        f"{top}/gatehouse-access-{version()}.tar.gz",
    }
    assert manifest["version"] == version()
    assert sorted(i["name"] for i in manifest["images"]) == sorted(IMAGES)
    assert {line.split()[1] for line in sums.splitlines()} == {
        "manifest.json",
        "images.tar",
        f"gatehouse-access-{version()}.tar.gz",
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
        if image_id(client, tag) != expected:
            with tarfile.open(bundle, "r:gz") as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("/images.tar"))
                client.images.load(tar.extractfile(member).read())
    assert image_id(client, tag) == expected


def test_verified_state_on_good_bundle(bundle: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = run_module("bundle", {"path": str(bundle), "state": "verified", "tmp_dir": str(scratch)})
    assert not run.failed, run.result
    assert not run.changed
    assert {f["name"] for f in run.result["files"]} == {
        "images.tar",
        "manifest.json",
        f"gatehouse-access-{version()}.tar.gz",
    }
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
