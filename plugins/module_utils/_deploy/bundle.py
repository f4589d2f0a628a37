# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Dark-site bundles: verify them, then load their images (private to the collection).

A bundle (``make bundle``) is a gzip-compressed tar archive with one top directory
``gatehouse-bundle-<version>/`` holding:

- ``SHA256SUMS``   ``sha256sum`` lines over every other member (``sha256sum -c`` works),
- ``manifest.json`` format, version, the images (name, id, tags) and the files (sha256, size),
- ``images.tar``   ``docker save`` of the service images,
- ``gatehouse-access-<version>.tar.gz``, the collection,
- ``<namespace>-<name>-<version>.tar.gz``, the collections it depends on (manifest ``dependencies``).

The archive or its extracted top directory are accepted. Nothing is trusted before it is
verified: an archive is unpacked into a private temporary directory (regular files with plain
names only) while every member is hashed, then the hashes are compared with SHA256SUMS, the
manifest with SHA256SUMS, and the images the manifest promises with the ``docker save``
manifest inside images.tar. Only then does anything reach the Docker engine, and the engine
reads the verified copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import sha256_file
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (
    HAS_DOCKER,
    DockerException,
    ImageNotFound,
)

FORMAT = 1
SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"
IMAGES = "images.tar"
CHUNK = 1024 * 1024
# Member names are flat and plain: no directories, no "..", nothing a shell would mangle.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SUMS_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
IMAGE_ID_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# The manifest is small; a larger one is not ours.
MAX_SMALL_FILE = 1024 * 1024


class BundleError(Exception):
    """The bundle is unusable; the message names the file at fault."""


def _member_name(raw: str) -> tuple[str, str | None]:
    """Split an archive member name into (top directory or "", flat name or None for the top)."""
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if not parts or len(parts) > 2 or ".." in parts:
        raise BundleError("bundle member %r has an unexpected path; refused" % raw)
    if len(parts) == 1:
        return "", parts[0]
    return parts[0], parts[1]


def unpack(archive: str, dest: str) -> dict[str, str]:
    """Unpack ``archive`` into ``dest`` (flat), hashing on the way; returns {name: sha256}.

    Accepts members at the top level or below one top directory. Links, devices, nested
    directories and duplicate names are refused before anything else happens with them.
    """
    hashes: dict[str, str] = {}
    top: str | None = None
    current = "(archive header)"
    try:
        # Stream mode: one sequential pass, no seeking in the compressed file.
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                current = member.name
                directory, name = _member_name(member.name)
                if member.isdir():
                    if directory:
                        raise BundleError("bundle member %r: nested directories are not expected" % current)
                    if top not in (None, name):
                        raise BundleError("bundle has more than one top directory (%r, %r)" % (top, name))
                    top = name
                    continue
                if not member.isreg():
                    raise BundleError(
                        "bundle member %r is not a regular file (link or device); refused" % current
                    )
                if directory:
                    if top not in (None, directory):
                        raise BundleError(
                            "bundle has more than one top directory (%r, %r)" % (top, directory)
                        )
                    top = directory
                if not NAME_RE.match(name or ""):
                    raise BundleError("bundle member %r has an unexpected name; refused" % current)
                if name in hashes:
                    raise BundleError("bundle member %r appears twice; refused" % name)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - regular files always have data
                    raise BundleError("bundle member %r cannot be read" % current)
                digest = hashlib.sha256()
                target = os.path.join(dest, name)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = source.read(CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                hashes[name] = digest.hexdigest()
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(
            "%s is truncated or corrupt (reading %s): %s" % (os.path.basename(archive), current, exc)
        ) from None
    if not hashes:
        raise BundleError("%s holds no files" % os.path.basename(archive))
    return hashes


def hash_directory(path: str) -> dict[str, str]:
    """Hash the files of an extracted bundle directory; returns {name: sha256}."""
    hashes: dict[str, str] = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.islink(full) or not os.path.isfile(full):
            raise BundleError("%s in the bundle directory is not a regular file; refused" % name)
        hashes[name] = sha256_file(full)
    return hashes


def parse_sums(text: str) -> dict[str, str]:
    """Parse ``sha256sum`` output; returns {name: sha256}."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = SUMS_LINE_RE.match(line)
        if not match:
            raise BundleError("%s line %d is not a sha256sum line" % (SUMS, number))
        digest, name = match.groups()
        if not NAME_RE.match(name) or name == SUMS:
            raise BundleError("%s line %d names an unexpected file %r" % (SUMS, number, name))
        if name in sums:
            raise BundleError("%s lists %s twice" % (SUMS, name))
        sums[name] = digest
    if not sums:
        raise BundleError("%s is empty" % SUMS)
    return sums


def _read_small(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if os.path.getsize(path) > MAX_SMALL_FILE:
        raise BundleError("%s is larger than %d bytes; refused" % (name, MAX_SMALL_FILE))
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def check_sums(root: str, hashes: dict[str, str]) -> dict[str, str]:
    """Compare the actual hashes with SHA256SUMS; returns the verified {name: sha256}."""
    if SUMS not in hashes:
        raise BundleError("%s is missing from the bundle" % SUMS)
    try:
        sums = parse_sums(_read_small(root, SUMS))
    except UnicodeDecodeError:
        raise BundleError("%s is not text" % SUMS) from None
    for name in sorted(sums):
        if name not in hashes:
            raise BundleError("%s is listed in %s but missing from the bundle" % (name, SUMS))
        if hashes[name] != sums[name]:
            raise BundleError(
                "%s does not match its checksum (expected sha256 %s, got %s): the bundle is corrupt "
                "or was modified" % (name, sums[name], hashes[name])
            )
    for name in sorted(hashes):
        if name != SUMS and name not in sums:
            raise BundleError("%s is in the bundle but not listed in %s; refused" % (name, SUMS))
    for required in (MANIFEST, IMAGES):
        if required not in sums:
            raise BundleError("%s is missing from the bundle" % required)
    return sums


def parse_manifest(text: str, sums: dict[str, str], sizes: dict[str, int]) -> dict:
    """Validate manifest.json against the verified checksums; returns the manifest."""
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise BundleError("%s is not valid JSON: %s" % (MANIFEST, exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError("%s: unsupported bundle format (expected format %d)" % (MANIFEST, FORMAT))
    if not isinstance(manifest.get("version"), str) or not manifest["version"]:
        raise BundleError("%s has no version" % MANIFEST)
    images = manifest.get("images")
    if not isinstance(images, list) or not images:
        raise BundleError("%s lists no images" % MANIFEST)
    seen_tags: set[str] = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            raise BundleError("%s: images[%d] is not an object" % (MANIFEST, index))
        if not isinstance(image.get("name"), str) or not image["name"]:
            raise BundleError("%s: images[%d] has no name" % (MANIFEST, index))
        if not isinstance(image.get("id"), str) or not IMAGE_ID_RE.match(image["id"]):
            raise BundleError("%s: image %s has no valid id" % (MANIFEST, image["name"]))
        tags = image.get("tags")
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
            raise BundleError("%s: image %s has no tags" % (MANIFEST, image["name"]))
        for tag in tags:
            if tag in seen_tags:
                raise BundleError("%s: tag %s appears twice" % (MANIFEST, tag))
            seen_tags.add(tag)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError("%s has no files" % MANIFEST)
    for name in sorted(set(files) | (set(sums) - {MANIFEST})):
        entry = files.get(name)
        if not isinstance(entry, dict) or name not in sums:
            raise BundleError("%s and %s disagree about %s" % (MANIFEST, SUMS, name))
        if entry.get("sha256") != sums[name] or entry.get("size") != sizes.get(name):
            raise BundleError("%s and %s disagree about %s (checksum or size)" % (MANIFEST, SUMS, name))
    return manifest


def saved_images(images_tar: str) -> list[dict]:
    """The ``docker save`` manifest inside images.tar: [{"id": "sha256:...", "tags": [...]}]."""
    try:
        with tarfile.open(images_tar, "r:") as tar:
            member = tar.getmember("manifest.json")
            handle = tar.extractfile(member)
            if handle is None or member.size > MAX_SMALL_FILE:
                raise BundleError("%s has no usable manifest.json" % IMAGES)
            entries = json.loads(handle.read().decode("utf-8"))
    except BundleError:
        raise
    except KeyError:
        raise BundleError("%s is not a docker save archive (no manifest.json)" % IMAGES) from None
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError("%s is not a readable docker save archive: %s" % (IMAGES, exc)) from None
    result = []
    for entry in entries if isinstance(entries, list) else []:
        config = entry.get("Config", "") if isinstance(entry, dict) else ""
        # "<hex>.json" (classic layout) or "blobs/sha256/<hex>" (OCI layout, Docker >= 25)
        digest = os.path.basename(config)
        if digest.endswith(".json"):
            digest = digest[: -len(".json")]
        result.append({"id": "sha256:" + digest, "tags": list(entry.get("RepoTags") or [])})
    return result


def check_images_tar(root: str, manifest: dict) -> None:
    """Every image of the manifest must be in images.tar with its id and tags."""
    saved = saved_images(os.path.join(root, IMAGES))
    for image in manifest["images"]:
        match = [entry for entry in saved if entry["id"] == image["id"]]
        if not match:
            raise BundleError(
                "%s does not hold image %s (%s) that %s lists"
                % (IMAGES, image["name"], image["id"], MANIFEST)
            )
        missing = sorted(set(image["tags"]) - set(match[0]["tags"]))
        if missing:
            raise BundleError("%s does not tag image %s as %s" % (IMAGES, image["name"], ", ".join(missing)))


class VerifiedBundle:
    """A verified bundle: ``root`` holds the verified files (a private copy for archives)."""

    def __init__(self, root: str, manifest: dict, sums: dict[str, str], sizes: dict[str, int]) -> None:
        self.root = root
        self.manifest = manifest
        self.sums = sums
        self.sizes = sizes

    @property
    def images_tar(self) -> str:
        return os.path.join(self.root, IMAGES)

    def files(self) -> list[dict]:
        return [
            {"name": name, "sha256": self.sums[name], "size": self.sizes[name]} for name in sorted(self.sums)
        ]


def verify(path: str, workdir: str) -> VerifiedBundle:
    """Verify the bundle at ``path`` (archive or extracted directory).

    Archives are unpacked below ``workdir`` (which the caller removes). Raises BundleError.
    """
    if not os.path.exists(path):
        raise BundleError("bundle %s does not exist" % path)
    if os.path.isdir(path):
        root = path
        hashes = hash_directory(root)
    else:
        root = tempfile.mkdtemp(prefix="bundle.", dir=workdir)
        hashes = unpack(path, root)
    sums = check_sums(root, hashes)
    sizes = {name: os.path.getsize(os.path.join(root, name)) for name in sums}
    try:
        manifest_text = _read_small(root, MANIFEST)
    except UnicodeDecodeError:
        raise BundleError("%s is not text" % MANIFEST) from None
    manifest = parse_manifest(manifest_text, sums, sizes)
    check_images_tar(root, manifest)
    return VerifiedBundle(root, manifest, sums, sizes)


# ---------------------------------------------------------------- Docker side


def image_ids(client, tags: list[str]) -> dict[str, str | None]:
    """{tag: image id or None} as the engine sees them now."""
    ids: dict[str, str | None] = {}
    for tag in tags:
        try:
            ids[tag] = client.images.get(tag).id
        except ImageNotFound:
            ids[tag] = None
    return ids


def _all_tags(manifest: dict) -> list[str]:
    return [tag for image in manifest["images"] for tag in image["tags"]]


def _expected(manifest: dict) -> dict[str, str]:
    return {tag: image["id"] for image in manifest["images"] for tag in image["tags"]}


def load_verified(client, bundle: VerifiedBundle, check_mode: bool) -> dict:
    """Load the images of a verified bundle unless every tag already has the manifest's id.

    Returns {"changed", "images", "before", "after"}; raises BundleError when the engine does
    not end up with the manifest's images.
    """
    manifest = bundle.manifest
    expected = _expected(manifest)
    before = image_ids(client, _all_tags(manifest))
    to_load = {
        image["name"]
        for image in manifest["images"]
        if any(before[tag] != image["id"] for tag in image["tags"])
    }
    after = dict(before)
    if to_load and not check_mode:
        with open(bundle.images_tar, "rb") as handle:
            client.images.load(handle)
        after = image_ids(client, _all_tags(manifest))
        wrong = sorted(tag for tag, image_id in expected.items() if after[tag] != image_id)
        if wrong:
            raise BundleError(
                "after loading %s, %s do(es) not carry the image id the manifest lists"
                % (IMAGES, ", ".join("%s (%s)" % (tag, after[tag]) for tag in wrong))
            )
    elif to_load:
        after = dict(expected)
    images = [
        {
            "name": image["name"],
            "id": image["id"],
            "tags": list(image["tags"]),
            "present_before": all(before[tag] == image["id"] for tag in image["tags"]),
            "loaded": image["name"] in to_load,
        }
        for image in manifest["images"]
    ]
    return {"changed": bool(to_load), "images": images, "before": before, "after": after}


def run(params: dict, check_mode: bool, want_diff: bool) -> dict:
    """Module entry point: returns the result dict; ``failed`` with ``msg`` on a bad bundle."""
    path = params["path"]
    state = params["state"]
    if state == "present" and not HAS_DOCKER:
        return {"failed": True, "msg": "the Docker SDK for Python (docker) is required to load images"}
    tmp_parent = params.get("tmp_dir") or None
    if tmp_parent and not os.path.isdir(tmp_parent):
        return {"failed": True, "msg": "tmp_dir %s is not a directory" % tmp_parent}
    workdir = tempfile.mkdtemp(prefix="gatehouse-bundle.", dir=tmp_parent)
    try:
        try:
            bundle = verify(path, workdir)
        except BundleError as exc:
            return {
                "failed": True,
                "changed": False,
                "msg": "bundle %s refused, nothing loaded: %s" % (path, exc),
            }
        manifest = bundle.manifest
        result: dict = {
            "changed": False,
            "path": path,
            "version": manifest["version"],
            "files": bundle.files(),
        }
        if state == "verified":
            result["images"] = [
                {"name": i["name"], "id": i["id"], "tags": list(i["tags"])} for i in manifest["images"]
            ]
            result["msg"] = "bundle %s verified: %d file(s), %d image(s)" % (
                manifest["version"],
                len(result["files"]),
                len(result["images"]),
            )
            return result
        try:
            client = ctr.client(params.get("docker_host"), params["timeout"])
            loaded = load_verified(client, bundle, check_mode)
        except (BundleError, ctr.ContainerError) as exc:
            return dict(result, failed=True, msg=str(exc))
        except (DockerException, OSError) as exc:  # requests' errors are OSErrors
            return dict(result, failed=True, msg="Docker engine error while loading %s: %s" % (IMAGES, exc))
        result["changed"] = loaded["changed"]
        result["images"] = loaded["images"]
        names = [image["name"] for image in loaded["images"] if image["loaded"]]
        if not names:
            result["msg"] = "all %d image(s) of bundle %s are present" % (
                len(loaded["images"]),
                manifest["version"],
            )
        else:
            result["msg"] = "%s image(s) %s from bundle %s" % (
                "would load" if check_mode else "loaded",
                ", ".join(names),
                manifest["version"],
            )
        if want_diff:
            result["diff"] = {
                "before": {"images": loaded["before"]},
                "after": {"images": loaded["after"]},
            }
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
