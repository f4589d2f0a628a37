"""Dark-site bundle verification (module_utils._deploy.bundle) on small synthetic bundles.

Each bundle here is built like hack/make-bundle.py builds the real one: a docker-save-shaped
images.tar, a collection tarball stand-in, manifest.json and SHA256SUMS, in a tar.gz with one
top directory. The tests then break one thing at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
bundle_utils = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._deploy.bundle"
)
BundleError = bundle_utils.BundleError

VERSION = "9.8.7"
TOP = f"gatehouse-bundle-{VERSION}"
IMAGE_IDS = {
    "cm": "sha256:" + hashlib.sha256(b"cm-config").hexdigest(),
    "sg": "sha256:" + hashlib.sha256(b"sg-config").hexdigest(),
}
COLLECTION = f"gatehouse-access-{VERSION}.tar.gz"


def tar_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def docker_save(ids: dict[str, str]) -> bytes:
    """A minimal ``docker save`` archive: manifest.json plus one config blob per image."""
    manifest = [
        {"Config": f"{image_id[7:]}.json", "RepoTags": [f"gatehouse/{name}:{VERSION}"], "Layers": []}
        for name, image_id in ids.items()
    ]
    entries = {f"{image_id[7:]}.json": b"{}" for image_id in ids.values()}
    entries["manifest.json"] = json.dumps(manifest).encode()
    return tar_bytes(entries)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def members(ids: dict[str, str] | None = None) -> dict[str, bytes]:
    """The members of a good bundle, SHA256SUMS last."""
    ids = IMAGE_IDS if ids is None else ids
    payload = {"images.tar": docker_save(ids), COLLECTION: gzip.compress(b"collection")}
    manifest = {
        "format": 1,
        "name": "gatehouse-bundle",
        "version": VERSION,
        "collection": COLLECTION,
        "images": [{"name": n, "id": i, "tags": [f"gatehouse/{n}:{VERSION}"]} for n, i in ids.items()],
        "files": {name: {"sha256": sha(data), "size": len(data)} for name, data in payload.items()},
    }
    payload["manifest.json"] = json.dumps(manifest).encode()
    payload["SHA256SUMS"] = "".join(f"{sha(d)}  {n}\n" for n, d in sorted(payload.items())).encode()
    return payload


def write_bundle(path: Path, files: dict[str, bytes], top: str | None = TOP) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if top:
            info = tarfile.TarInfo(top)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def verify(path: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return bundle_utils.verify(str(path), str(work))


def test_good_archive_verifies(tmp_path: Path) -> None:
    files = members()
    verified = verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)
    assert verified.manifest["version"] == VERSION
    assert {i["name"]: i["id"] for i in verified.manifest["images"]} == IMAGE_IDS
    listed = {f["name"]: f["sha256"] for f in verified.files()}
    assert listed == {name: sha(data) for name, data in files.items() if name != "SHA256SUMS"}
    # the engine will read the private, verified copy
    assert Path(verified.images_tar).read_bytes() == files["images.tar"]
    assert str(tmp_path / "work") in verified.images_tar


def test_archive_without_top_directory_verifies(tmp_path: Path) -> None:
    verified = verify(write_bundle(tmp_path / "flat.tar.gz", members(), top=None), tmp_path)
    assert verified.manifest["version"] == VERSION


def test_extracted_directory_verifies_in_place(tmp_path: Path) -> None:
    directory = tmp_path / TOP
    directory.mkdir()
    for name, data in members().items():
        (directory / name).write_bytes(data)
    verified = verify(directory, tmp_path)
    assert verified.images_tar == str(directory / "images.tar")


@pytest.mark.parametrize("victim", ["images.tar", COLLECTION, "manifest.json"])
def test_modified_member_is_refused_by_name(tmp_path: Path, victim: str) -> None:
    files = members()
    data = bytearray(files[victim])
    data[len(data) // 2] ^= 0x01
    files[victim] = bytes(data)
    with pytest.raises(BundleError, match="^" + re.escape(victim) + " does not match its checksum"):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


def test_modified_member_in_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    for name, data in members().items():
        (directory / name).write_bytes(data)
    with open(directory / "images.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(BundleError, match=r"^images\.tar does not match its checksum"):
        verify(directory, tmp_path)


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    good = write_bundle(tmp_path / "b.tar.gz", members()).read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(BundleError, match=r"^truncated\.tar\.gz is truncated or corrupt \(reading "):
        verify(truncated, tmp_path)


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a bundle" * 100)
    with pytest.raises(BundleError, match=r"junk\.tar\.gz is truncated or corrupt"):
        verify(junk, tmp_path)


def test_missing_member_is_named(tmp_path: Path) -> None:
    files = members()
    del files[COLLECTION]
    with pytest.raises(
        BundleError, match="^" + re.escape(COLLECTION) + " is listed in SHA256SUMS but missing"
    ):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


def test_missing_sums_is_refused(tmp_path: Path) -> None:
    files = members()
    del files["SHA256SUMS"]
    with pytest.raises(BundleError, match=r"^SHA256SUMS is missing"):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


def test_unlisted_member_is_refused(tmp_path: Path) -> None:
    files = members()
    files["extra.sh"] = b"#!/bin/sh\n"
    with pytest.raises(BundleError, match=r"^extra\.sh is in the bundle but not listed in SHA256SUMS"):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


def test_link_member_is_refused(tmp_path: Path) -> None:
    raw = io.BytesIO(gzip.decompress(write_bundle(tmp_path / "good.tar.gz", members()).read_bytes()))
    with tarfile.open(fileobj=raw, mode="a") as tar:
        link = tarfile.TarInfo(f"{TOP}/passwd")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    path = tmp_path / "b.tar.gz"
    path.write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(BundleError, match="passwd' is not a regular file"):
        verify(path, tmp_path)


def test_path_traversal_is_refused_and_nothing_escapes(tmp_path: Path) -> None:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BundleError, match="unexpected path"):
        verify(path, tmp_path)
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path.parent / "escaped").exists()


def test_manifest_promising_an_image_that_images_tar_lacks_is_refused(tmp_path: Path) -> None:
    # Consistent checksums, but images.tar only holds the cm image.
    files = members()
    manifest = json.loads(files["manifest.json"])
    files["images.tar"] = docker_save({"cm": IMAGE_IDS["cm"]})
    manifest["files"]["images.tar"] = {"sha256": sha(files["images.tar"]), "size": len(files["images.tar"])}
    files["manifest.json"] = json.dumps(manifest).encode()
    files["SHA256SUMS"] = "".join(
        f"{sha(d)}  {n}\n" for n, d in sorted(files.items()) if n != "SHA256SUMS"
    ).encode()
    with pytest.raises(BundleError, match=r"^images.tar does not hold image sg"):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


def test_manifest_disagreeing_with_sums_is_refused(tmp_path: Path) -> None:
    files = members()
    manifest = json.loads(files["manifest.json"])
    manifest["files"][COLLECTION]["size"] += 1
    files["manifest.json"] = json.dumps(manifest).encode()
    files["SHA256SUMS"] = "".join(
        f"{sha(d)}  {n}\n" for n, d in sorted(files.items()) if n != "SHA256SUMS"
    ).encode()
    with pytest.raises(
        BundleError, match=re.escape(f"manifest.json and SHA256SUMS disagree about {COLLECTION}")
    ):
        verify(write_bundle(tmp_path / "b.tar.gz", files), tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not a checksum line", "line 1 is not a sha256sum line"),
        (f"{'0' * 64}  ../etc/passwd", "names an unexpected file"),
        (f"{'0' * 64}  a\n{'1' * 64}  a", "lists a twice"),
        ("", "SHA256SUMS is empty"),
    ],
)
def test_parse_sums_rejects(line: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        bundle_utils.parse_sums(line)


def test_parse_sums_accepts_binary_marker() -> None:
    assert bundle_utils.parse_sums(f"{'a' * 64} *images.tar\n") == {"images.tar": "a" * 64}


# ------------------------------------------------------------ loading decisions


class Image:
    def __init__(self, image_id: str) -> None:
        self.id = image_id


class Engine:
    """Just enough of docker.DockerClient for load_verified: images.get and images.load."""

    def __init__(self, tags: dict[str, str], on_load: dict[str, str]) -> None:
        self.tags = dict(tags)
        self.on_load = on_load
        self.loads = 0
        self.images = self

    def get(self, tag: str) -> Image:
        if tag not in self.tags:
            raise bundle_utils.ImageNotFound(tag)
        return Image(self.tags[tag])

    def load(self, handle) -> list:
        assert handle.read(512)  # the verified images.tar
        self.loads += 1
        self.tags.update(self.on_load)
        return []


def all_tags(ids: dict[str, str]) -> dict[str, str]:
    return {f"gatehouse/{name}:{VERSION}": image_id for name, image_id in ids.items()}


@pytest.fixture
def verified(tmp_path: Path):
    return verify(write_bundle(tmp_path / "b.tar.gz", members()), tmp_path)


def test_present_images_are_not_loaded(verified) -> None:
    engine = Engine(all_tags(IMAGE_IDS), {})
    result = bundle_utils.load_verified(engine, verified, check_mode=False)
    assert result["changed"] is False
    assert engine.loads == 0
    assert all(image["present_before"] and not image["loaded"] for image in result["images"])


def test_missing_image_is_loaded_and_reported(verified) -> None:
    present = all_tags({"cm": IMAGE_IDS["cm"]})
    engine = Engine(present, all_tags(IMAGE_IDS))
    result = bundle_utils.load_verified(engine, verified, check_mode=False)
    assert result["changed"] is True
    assert engine.loads == 1
    assert {i["name"]: i["loaded"] for i in result["images"]} == {"cm": False, "sg": True}
    assert result["before"][f"gatehouse/sg:{VERSION}"] is None
    assert result["after"] == all_tags(IMAGE_IDS)


def test_tag_on_another_image_counts_as_missing(verified) -> None:
    other = "sha256:" + "f" * 64
    engine = Engine(all_tags({"cm": IMAGE_IDS["cm"], "sg": other}), all_tags(IMAGE_IDS))
    result = bundle_utils.load_verified(engine, verified, check_mode=False)
    assert result["changed"] is True
    assert result["before"][f"gatehouse/sg:{VERSION}"] == other


def test_check_mode_loads_nothing(verified) -> None:
    engine = Engine({}, all_tags(IMAGE_IDS))
    result = bundle_utils.load_verified(engine, verified, check_mode=True)
    assert result["changed"] is True
    assert engine.loads == 0
    assert engine.tags == {}
    assert result["after"] == all_tags(IMAGE_IDS)


def test_engine_not_ending_with_the_manifest_ids_fails(verified) -> None:
    engine = Engine({}, all_tags({"cm": IMAGE_IDS["cm"], "sg": "sha256:" + "0" * 64}))
    with pytest.raises(BundleError, match=re.escape(f"gatehouse/sg:{VERSION}")):
        bundle_utils.load_verified(engine, verified, check_mode=False)


# ------------------------------------------------------------ run(): the module's view


def params(path: Path, tmp_dir: Path, state: str = "verified") -> dict:
    return {"path": str(path), "state": state, "tmp_dir": str(tmp_dir), "docker_host": None, "timeout": 60}


def test_run_verified_reports_and_cleans_up(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = bundle_utils.run(params(write_bundle(tmp_path / "b.tar.gz", members()), scratch), False, False)
    assert "failed" not in result
    assert result["changed"] is False
    assert result["version"] == VERSION
    assert sorted(i["name"] for i in result["images"]) == ["cm", "sg"]
    assert os.listdir(scratch) == []


def test_run_refuses_tampered_bundle_naming_the_member(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    files = members()
    files[COLLECTION] = gzip.compress(b"another collection")
    result = bundle_utils.run(params(write_bundle(tmp_path / "b.tar.gz", files), scratch), False, False)
    assert result["failed"] is True
    assert result["changed"] is False
    assert f"{COLLECTION} does not match its checksum" in result["msg"]
    assert "nothing loaded" in result["msg"]
    assert os.listdir(scratch) == []


def test_run_missing_bundle(tmp_path: Path) -> None:
    result = bundle_utils.run(params(tmp_path / "nope.tar.gz", tmp_path), False, False)
    assert result["failed"] is True
    assert "does not exist" in result["msg"]
