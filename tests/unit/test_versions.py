"""The version lives in galaxy.yml; every other place that repeats it must agree."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
DOCKERFILES = sorted((REPO_ROOT / "files" / "images").glob("*/Dockerfile"))


# Where a tool needs the version written out (Galaxy, module and role defaults, image tags in
# Molecule and the example inventories, artefact names in docs), each copy must be this one.
# History is left alone: changelogs, and version_added (which names the release that added a thing).
_COPIES = re.compile(
    r"gatehouse/[a-z]+:(\d+\.\d+\.\d+)"  # image references
    r"|gatehouse-(?:access|bundle)-(\d+\.\d+\.\d+)"  # collection and bundle archives
    r"|(?:gatehouse_version|image_tag)\W{1,4}(\d+\.\d+\.\d+)"  # role defaults, inventories
    r"|image_tag[^\n]{0,40}default=\"(\d+\.\d+\.\d+)\""  # module argument specs
    r"|gatehouse_version \| default\('(\d+\.\d+\.\d+)'\)"  # playbook fallbacks
)
# Not copies: history, and test data (which uses version strings as values of its own).
_NOT_COPIES = ("CHANGELOG.md", "changelogs/", "tests/")


def _tracked_text_files() -> list[Path]:
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    return [REPO_ROOT / name for name in listed if name and not name.startswith(_NOT_COPIES)]


def test_services_take_the_collection_version() -> None:
    import gatehouse
    from gatehouse import protocol

    assert gatehouse.__version__ == VERSION
    with open(REPO_ROOT / "files" / "services" / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)
    # The distribution's version is read from gatehouse.__version__, never written twice.
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert protocol.ClientInfo().product_version == protocol.HelloResp().product_version == VERSION


def test_every_written_copy_of_the_version_is_the_version() -> None:
    copies: list[tuple[str, int, str, str]] = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in _COPIES.finditer(line):
                found = next(g for g in match.groups() if g)
                copies.append((str(path.relative_to(REPO_ROOT)), number, found, line))
    assert len(copies) > 30, "the pattern no longer finds the copies"
    wrong = [c[:3] for c in copies if c[2] != VERSION and not _is_an_upgrade_target(c)]
    assert not wrong, f"copies of another version than galaxy.yml's {VERSION}: {wrong}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_defaults_match_the_version(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M) == [f"gatehouse/base:{VERSION}"]
    for default in re.findall(r"^ARG VERSION=(\S+)$", text, re.M):
        assert default == VERSION
    assert 'org.opencontainers.image.version="${VERSION}"' in text


def test_every_service_image_has_a_dockerfile() -> None:
    """A Dockerfile of its own, or a stage of the Python services' shared one (hack/build-images.sh)."""
    names = {p.parent.name for p in DOCKERFILES}
    services = (REPO_ROOT / "files" / "images" / "services" / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM runtime AS ([a-z-]+)$", services, re.M))
    assert stages == {"broker", "cm", "sg", "agent"}
    assert not stages & names, "a service built from the shared Dockerfile has no Dockerfile of its own"
    assert {"halb"} <= names


def _is_an_upgrade_target(copy: tuple[str, int, str, str]) -> bool:
    """Where another release is the point: an upgrade's example target (``-e gatehouse_version=...``),
    and the upgrade scenario's next patch release, which it builds from this one."""
    path, _number, found, line = copy
    if "-e gatehouse_version=" in line:
        return True
    major, minor, patch = (int(n) for n in VERSION.split("."))
    return path.startswith(("molecule/upgrade/", "docs/")) and found == f"{major}.{minor}.{patch + 1}"
