"""make bundle: write dist/gatehouse-bundle-<version>.tar.gz for dark sites.

The archive has one top directory gatehouse-bundle-<version>/ with
  SHA256SUMS       sha256sum lines over the other members (``sha256sum -c SHA256SUMS`` works)
  manifest.json    format, version, images (name, id, tags), files (sha256, size)
  images.tar       ``docker save`` of the service images gatehouse/<name>:<version>
  gatehouse-access-<version>.tar.gz   the collection (ansible-galaxy collection build)
  <namespace>-<name>-<version>.tar.gz the collections it depends on (galaxy.yml, transitively),
                   so that on a host without Galaxy
                   ``ansible-galaxy collection install --offline *.tar.gz`` installs it whole
The layout is what plugins/module_utils/_deploy/bundle.py verifies; change both together.

The dependency tarballs are packed from the collections of the pinned ``ansible`` package in
the virtualenv (Galaxy may be out of reach where bundles are made). That package leaves out
some files of each collection (CI files, tests), so FILES.json is rewritten to the files
present and MANIFEST.json to the new FILES.json checksum; the installed content is unchanged.

Usage: python hack/make-bundle.py [--output DIR] [--images "broker cm ..."] [--collection TARBALL]
                                 [--repository PREFIX]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES = ("broker", "cm", "sg", "agent", "halb")
FORMAT = 1
CHUNK = 1024 * 1024


def version() -> str:
    with open(REPO_ROOT / "galaxy.yml", encoding="utf-8") as handle:
        return str(yaml.safe_load(handle)["version"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_id(tag: str) -> str:
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"error: image {tag} is missing; run 'make images' first")
    return proc.stdout.strip()


def build_collection(output: Path) -> Path:
    """ansible-galaxy collection build from the files a commit would hold."""
    with tempfile.TemporaryDirectory(prefix="gatehouse-collection-") as tmp:
        tree = Path(tmp) / "ansible_collections" / "gatehouse" / "access"
        subprocess.run([str(REPO_ROOT / "hack" / "export-tree.sh"), str(tree)], check=True)
        galaxy = shutil.which("ansible-galaxy", path=str(Path(sys.executable).parent)) or "ansible-galaxy"
        subprocess.run(
            [galaxy, "collection", "build", "--force", "--output-path", str(output), str(tree)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return output / f"gatehouse-access-{version()}.tar.gz"


def installed_collections() -> Path:
    import ansible_collections  # the pinned ``ansible`` package's collections

    return Path(next(iter(ansible_collections.__path__)))


def dependency_tarballs(output: Path) -> list[Path]:
    """Artifacts of galaxy.yml's dependencies and theirs, each checked against its version range."""
    from ansible.galaxy.dependency_resolution.versioning import meets_requirements

    with open(REPO_ROOT / "galaxy.yml", encoding="utf-8") as handle:
        wanted = list((yaml.safe_load(handle).get("dependencies") or {}).items())
    root = installed_collections()
    done: dict[str, Path] = {}
    while wanted:
        fqcn, spec = wanted.pop(0)
        source = root.joinpath(*fqcn.split("."))
        info = json.loads((source / "MANIFEST.json").read_text(encoding="utf-8"))["collection_info"]
        if not meets_requirements(info["version"], spec):
            sys.exit(f"error: {fqcn} {info['version']} in the virtualenv does not meet {spec}")
        if fqcn not in done:
            done[fqcn] = pack_collection(source, info, output)
            wanted.extend((info.get("dependencies") or {}).items())
    return list(done.values())


def pack_collection(source: Path, info: dict, output: Path) -> Path:
    """A collection artifact (MANIFEST.json, FILES.json, the files) of an installed collection."""
    manifest = json.loads((source / "MANIFEST.json").read_text(encoding="utf-8"))
    listed = json.loads((source / "FILES.json").read_text(encoding="utf-8"))
    present = [
        entry for entry in listed["files"] if entry["name"] == "." or (source / entry["name"]).exists()
    ]
    files_json = json.dumps({"files": present, "format": listed["format"]}, indent=4).encode()
    manifest["file_manifest_file"]["chksum_sha256"] = hashlib.sha256(files_json).hexdigest()
    manifest_json = json.dumps(manifest, indent=4).encode()
    dest = output / f"{info['namespace']}-{info['name']}-{info['version']}.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in (("MANIFEST.json", manifest_json), ("FILES.json", files_json)):
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), 0o644
            tar.addfile(member, io.BytesIO(data))
        for entry in present:
            if entry["name"] != ".":
                tar.add(str(source / entry["name"]), arcname=entry["name"], recursive=False)
    return dest


def write_archive(dest: Path, top: str, members: list[Path]) -> None:
    """tar.gz with the members below ``top``/, written atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    mtime = int(time.time())

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o644 if info.isfile() else 0o755
        info.mtime = mtime
        return info

    # Level 6 is the gzip default; the images dominate and compress about 3:1.
    with gzip.open(tmp, "wb", compresslevel=6) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        directory = tarfile.TarInfo(top)
        directory.type = tarfile.DIRTYPE
        tar.addfile(normalise(directory))
        for member in members:
            tar.add(str(member), arcname=f"{top}/{member.name}", filter=normalise)
    os.replace(tmp, dest)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", default=str(REPO_ROOT / "dist"), help="directory of the bundle (default dist/)"
    )
    parser.add_argument("--images", default=" ".join(IMAGES), help="service images to include")
    parser.add_argument("--collection", help="collection tarball to include (default: build it)")
    parser.add_argument(
        "--repository",
        default="gatehouse/",
        help="repository prefix of the image tags (default gatehouse/; tests use their own)",
    )
    args = parser.parse_args()

    ver = version()
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    top = f"gatehouse-bundle-{ver}"
    started = time.monotonic()
    images = [
        {
            "name": name,
            "id": image_id(f"{args.repository}{name}:{ver}"),
            "tags": [f"{args.repository}{name}:{ver}"],
        }
        for name in args.images.split()
    ]

    with tempfile.TemporaryDirectory(prefix="gatehouse-bundle-", dir=output) as tmp:
        staging = Path(tmp)
        images_tar = staging / "images.tar"
        tags = [tag for image in images for tag in image["tags"]]
        subprocess.run(["docker", "save", "--output", str(images_tar), *tags], check=True)
        # The ids may have moved while saving (a concurrent build); the archive must match.
        for image in images:
            if image_id(image["tags"][0]) != image["id"]:
                sys.exit(f"error: {image['tags'][0]} changed while the bundle was written; run again")

        if args.collection:
            collection = staging / Path(args.collection).name
            shutil.copyfile(args.collection, collection)
        else:
            collection = build_collection(staging)

        dependencies = dependency_tarballs(staging)
        members = [images_tar, collection, *dependencies]
        files = {p.name: {"sha256": sha256(p), "size": p.stat().st_size} for p in members}
        manifest = {
            "format": FORMAT,
            "name": "gatehouse-bundle",
            "version": ver,
            "collection": collection.name,
            "dependencies": [p.name for p in dependencies],
            "images": images,
            "files": files,
        }
        manifest_path = staging / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        sums = {name: entry["sha256"] for name, entry in files.items()}
        sums["manifest.json"] = sha256(manifest_path)
        sums_path = staging / "SHA256SUMS"
        sums_path.write_text("".join(f"{sums[name]}  {name}\n" for name in sorted(sums)), encoding="ascii")

        dest = output / f"{top}.tar.gz"
        # Small members first: a reader sees SHA256SUMS and the manifest before the images.
        write_archive(dest, top, [sums_path, manifest_path, collection, *dependencies, images_tar])

    size = dest.stat().st_size
    print(f"{dest} ({size / 1e6:.0f} MB, sha256 {sha256(dest)}) in {time.monotonic() - started:.0f} s")
    for image in images:
        print(f"  {image['tags'][0]}  {image['id'][7:19]}")


if __name__ == "__main__":
    main()
