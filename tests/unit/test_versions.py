"""The version lives in galaxy.yml; every other place that repeats it must agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
DOCKERFILES = sorted((REPO_ROOT / "files" / "images").glob("*/Dockerfile"))


def test_services_distribution_has_the_collection_version() -> None:
    with open(REPO_ROOT / "files" / "services" / "pyproject.toml", "rb") as handle:
        assert tomllib.load(handle)["project"]["version"] == VERSION


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_defaults_match_the_version(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M) == [f"gatehouse/base:{VERSION}"]
    for default in re.findall(r"^ARG VERSION=(\S+)$", text, re.M):
        assert default == VERSION
    assert 'org.opencontainers.image.version="${VERSION}"' in text


def test_every_service_image_has_a_dockerfile() -> None:
    names = {p.parent.name for p in DOCKERFILES}
    assert {"broker", "cm", "sg", "agent", "halb"} <= names
