"""One docker_host option for every module that talks to the Docker engine (plugins/doc_fragments/docker.py)."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
ctr = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._docker.containers")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
fragment = importlib.import_module("ansible_collections.gatehouse.access.plugins.doc_fragments.docker")

MODULES = (
    "cmsg",
    "broker",
    "halb",
    "bundle",
    "support_bundle",
    "preflight",
    "broker_backup",
    "broker_migrate",
)


def _doc(source: str) -> dict:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DOCUMENTATION":
            return yaml.safe_load(node.value.value)
    raise AssertionError("no DOCUMENTATION")


def test_the_fragment_documents_the_argument_spec():
    option = yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]["docker_host"]
    assert option["type"] == ctr.DOCKER_HOST_OPTION["type"]
    assert "default" not in option and "default" not in ctr.DOCKER_HOST_OPTION
    deploy = importlib.import_module("ansible_collections.gatehouse.access.plugins.doc_fragments.deploy")
    assert "docker_host" not in yaml.safe_load(deploy.ModuleDocFragment.DOCUMENTATION)["options"]


@pytest.mark.parametrize("module", MODULES)
def test_every_docker_module_takes_docker_host_the_same_way(module: str):
    source = (REPO / "plugins" / "modules" / f"{module}.py").read_text()
    documentation = _doc(source)
    assert "gatehouse.access.docker" in documentation["extends_documentation_fragment"]
    assert "docker_host" not in documentation["options"]
    if module in ("cmsg", "broker"):
        assert dep.COMMON_ARGUMENT_SPEC["docker_host"] is ctr.DOCKER_HOST_OPTION
    else:
        assert re.search(r"""["']?docker_host["']?\s*[:=]\s*DOCKER_HOST_OPTION""", source), module
