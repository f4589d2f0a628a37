"""An execution environment built with ``ansible-builder build`` holds the collection and its needs.

No registry is reachable here, so the base image is gatehouse/ee-base (hack/build-debian-image.sh
ee-base): Debian's python3 with pip and venv, and the Debian packages community.crypto's
meta/ee-bindep.txt names. The definition is this test's own (version 3, written below); its
collections are the dark-site bundle's tarballs (the collection and its dependencies, made by
hack/make-bundle.py), installed with ``ansible-galaxy collection install --offline``. The
builder's own steps install ansible-core, ansible-runner and the Python requirements that
``introspect`` collects from every collection (meta/execution-environment.yml) from PyPI.

In the built image, ``ansible-galaxy collection list`` must show the collection and its
dependencies at their versions, ``ansible-doc gatehouse.access.cmsg`` must document the module,
and the modules' Python requirements must import.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import REPO_ROOT
from deploy_helpers import unique_prefix

# Two image builds (the stages install from PyPI), each several minutes on a busy machine.
pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(1800)]

VERSION = str(yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["version"])
BASE = f"gatehouse/ee-base:{VERSION}"
BUILDER = Path(sys.executable).parent / "ansible-builder"


# The collection and its dependencies as hack/make-bundle.py packs them into the bundle; in a
# process of its own, where ``ansible_collections`` is the pinned ansible package's (the tests put
# a tree holding only gatehouse.access first on sys.path).
PACK = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("make_bundle", sys.argv[1])
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)
out = Path(sys.argv[2])
print(json.dumps([str(bundle.build_collection(out)), *map(str, bundle.dependency_tarballs(out))]))
"""


def collection_tarballs(output: Path) -> list[Path]:
    proc = subprocess.run(
        [sys.executable, "-c", PACK, str(REPO_ROOT / "hack" / "make-bundle.py"), str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [Path(path) for path in json.loads(proc.stdout.splitlines()[-1])]


def _docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def _trust_store() -> Path:
    """The CA bundle pip uses on this machine: pip in the build trusts the same index (a mirror or a
    proxy with its own CA works in the build as it does here)."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return Path("/etc/ssl/certs/ca-certificates.crt")


def definition(collections: list[Path], label: str) -> dict:
    """Version 3 definition: the local base, the bundle's tarballs offline, apt as package manager."""
    core = importlib.metadata.version("ansible-core")
    return {
        "version": 3,
        "images": {"base_image": {"name": BASE}},
        "dependencies": {
            "python_interpreter": {"python_path": "/usr/bin/python3"},
            "ansible_core": {"package_pip": f"ansible-core=={core}"},
            "ansible_runner": {"package_pip": "ansible-runner"},
            "galaxy": {
                "collections": [{"name": f"collections/{path.name}", "type": "file"} for path in collections]
            },
        },
        # Debian's pip comes as python3-pip; the builder's pip step would run ensurepip, which Debian's
        # system Python refuses.
        "options": {"package_manager_path": "/usr/bin/apt-get", "skip_pip_install": True},
        "build_arg_defaults": {"ANSIBLE_GALAXY_CLI_COLLECTION_OPTS": "--offline"},
        "additional_build_files": [
            {"src": "collections", "dest": "collections"},
            {"src": "trust", "dest": "trust"},
        ],
        "additional_build_steps": {
            # Every stage derives from base: the label marks all the build's images for removal.
            "prepend_base": [
                f"LABEL gatehouse.test={label}",
                "COPY _build/trust/ca.pem /etc/ssl/certs/build-ca.pem",
                "ENV PIP_CERT=/etc/ssl/certs/build-ca.pem",
            ],
        },
    }


@pytest.fixture(scope="module")
def ee(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if _docker("image", "inspect", BASE).returncode != 0:
        pytest.skip(f"image {BASE} is missing: make images (only it: IMAGES=ee-base hack/build-images.sh)")
    work = tmp_path_factory.mktemp("ee")
    collections = work / "collections"
    collections.mkdir()
    tarballs = collection_tarballs(collections)
    (work / "trust").mkdir()
    shutil.copyfile(_trust_store(), work / "trust" / "ca.pem")
    label = unique_prefix("ee")
    (work / "execution-environment.yml").write_text(yaml.safe_dump(definition(tarballs, label)))
    tag = f"{label}:latest"
    try:
        build = subprocess.run(
            [
                str(BUILDER), "build", "--file", "execution-environment.yml", "--context", "context",
                "--tag", tag, "--container-runtime", "docker", "--verbosity", "2",
            ],
            cwd=work, capture_output=True, text=True, timeout=1500, check=False,
        )  # fmt: skip
        assert build.returncode == 0, build.stdout[-10000:] + build.stderr[-3000:]
        yield tag
    finally:
        images = _docker("images", "--quiet", "--filter", f"label=gatehouse.test={label}").stdout.split()
        if images:
            _docker("rmi", "--force", *sorted(set(images)))


def run_in(tag: str, *command: str) -> subprocess.CompletedProcess[str]:
    return _docker("run", "--rm", "--network", "none", tag, *command, timeout=180)


def test_the_collection_and_its_dependencies_are_installed(ee: str) -> None:
    listed = run_in(ee, "ansible-galaxy", "collection", "list", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    installed = {
        name: info["version"] for found in json.loads(listed.stdout).values() for name, info in found.items()
    }
    assert installed["gatehouse.access"] == VERSION
    wanted = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())["dependencies"]
    assert set(wanted) <= set(installed), installed


def test_ansible_doc_documents_the_cmsg_module(ee: str) -> None:
    doc = run_in(ee, "ansible-doc", "--json", "gatehouse.access.cmsg")
    assert doc.returncode == 0, doc.stdout + doc.stderr
    options = json.loads(doc.stdout)["gatehouse.access.cmsg"]["doc"]["options"]
    assert {"external_pcoip_ip", "pcoip_port", "docker_host"} <= set(options)


def test_the_modules_python_requirements_import(ee: str) -> None:
    # meta/execution-environment.yml -> meta/ee-requirements.txt: the Docker SDK and cryptography.
    probe = run_in(ee, "python3", "-c", "import docker, cryptography; print(docker.__version__)")
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert int(probe.stdout.split(".")[0]) >= 7
