"""Hardening of the containers the modules start (plugins/module_utils/_docker/containers.py, _halb_docker.py)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
ctr = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._docker.containers")
hd = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._halb.runtime")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")


def test_every_service_drops_all_capabilities_and_cannot_gain_privileges():
    for service in ("cm", "sg", "broker", "agent", "halb"):
        effective = ctr.hardening(service)
        assert effective["cap_drop"] == ["ALL"], service
        assert effective["security_opt"] == ["no-new-privileges:true"], service
        assert effective["read_only"] is True, service
        assert "/tmp" in effective["tmpfs"], service
        assert "noexec" in effective["tmpfs"]["/tmp"]
        assert effective["nofile"] == 65536
        assert effective["pids_limit"] > 0 and effective["mem_limit"]
    # The Python services listen on ports >= 1024 as uid 10001: no capability at all.
    for service in ("cm", "sg", "broker", "agent"):
        assert ctr.hardening(service)["cap_add"] == [], service


def test_halb_gets_only_what_keepalived_and_the_haproxy_master_need():
    assert ctr.hardening("halb")["cap_add"] == [
        "KILL",
        "NET_ADMIN",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_RAW",
        "SETGID",
        "SETUID",
    ]
    assert set(ctr.hardening("halb")["tmpfs"]) == {"/tmp", "/run"}


def test_container_limits_override_the_defaults_and_are_checked():
    effective = ctr.hardening(
        "cm", {"memory": "2G", "pids": 2048, "nofile": 131072, "read_only": None, "cap_add": ["cap_sys_nice"]}
    )
    assert effective["mem_limit"] == "2g"
    assert effective["pids_limit"] == 2048
    assert effective["nofile"] == 131072
    assert effective["read_only"] is True  # None keeps the default
    assert effective["cap_add"] == ["SYS_NICE"]
    assert effective["cap_drop"] == ["ALL"]
    for bad, message in (
        ({"memory": "lots"}, "container_limits.memory"),
        ({"pids": 3}, "container_limits.pids"),
        ({"nofile": 10}, "container_limits.nofile"),
        ({"cap_add": ["ALL"]}, "container_limits.cap_add"),
    ):
        with pytest.raises(ctr.ContainerError, match=message):
            ctr.hardening("broker", bad)


def test_docker_arguments_cap_nofile_at_the_engines_limit():
    kwargs = ctr.hardening_kwargs(ctr.hardening("sg"))
    assert "nofile" not in kwargs
    assert [(u["Name"], u["Soft"], u["Hard"]) for u in kwargs["ulimits"]] == [("nofile", 65536, 65536)]
    capped = ctr.hardening_kwargs(ctr.hardening("sg"), engine_nofile=20000)
    assert [(u["Soft"], u["Hard"]) for u in capped["ulimits"]] == [(20000, 20000)]
    assert capped["cap_drop"] == ["ALL"] and capped["mem_limit"] == "1g" and capped["pids_limit"] == 512


def _spec(**extra) -> dict:
    spec = {
        "service": "broker",
        "name": "gatehouse-broker",
        "image": "gatehouse/broker:0.1.0",
        "labels": {ctr.LABEL_ROLE: "broker"},
        "mounts": [],
        "network_mode": "host",
        "restart_policy": "unless-stopped",
    }
    spec.update(extra)
    return spec


def test_create_arguments_and_hash_carry_the_hardening():
    kwargs = ctr._create_kwargs(_spec(), "hash", 65536)
    assert kwargs["cap_drop"] == ["ALL"] and kwargs["read_only"] is True
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    # A change of the limits recreates the container.
    assert ctr.spec_hash(_spec(), {}) != ctr.spec_hash(_spec(container_limits={"memory": "2g"}), {})
    assert ctr.spec_hash(_spec(), {}) == ctr.spec_hash(_spec(container_limits={"memory": None}), {})


def test_compose_file_shows_the_hardening():
    doc = yaml.safe_load(dep.render_compose([_spec()], None))
    broker = doc["services"]["broker"]
    assert broker["cap_drop"] == ["ALL"] and broker["cap_add"] == []
    assert broker["security_opt"] == ["no-new-privileges:true"] and broker["read_only"] is True
    assert broker["ulimits"] == {"nofile": {"soft": 65536, "hard": 65536}}


def test_halb_container_spec_is_hardened():
    spec = hd.container_spec(
        name="gatehouse-halb",
        image="gatehouse/halb:0.1.0",
        host_label="halb1",
        config_dir="/opt/gatehouse/halb",
        network_mode="host",
        ipv4_address=None,
        container_limits={"memory": "2g"},
    )
    assert spec["hardening"]["mem_limit"] == "2g"
    assert spec["hardening"]["cap_drop"] == ["ALL"]
    assert "NET_BIND_SERVICE" in spec["hardening"]["cap_add"]


def test_agent_role_restates_the_agent_hardening_unchanged():
    """The agent role runs its containers with community.docker, not the modules: same values."""
    defaults = yaml.safe_load((REPO / "roles" / "agent" / "defaults" / "main.yml").read_text())
    effective = ctr.hardening("agent")
    assert defaults["agent_container_memory"] == effective["mem_limit"]
    assert defaults["agent_container_pids"] == effective["pids_limit"]
    assert defaults["agent_container_nofile"] == effective["nofile"]
    tasks = yaml.safe_load((REPO / "roles" / "agent" / "tasks" / "main.yml").read_text())
    run = next(
        t["community.docker.docker_container"] for t in tasks if t["name"] == "Run the agent containers"
    )
    assert run["cap_drop"] == effective["cap_drop"] and not run.get("capabilities")
    assert run["security_opts"] == ["no-new-privileges"] and run["read_only"] is effective["read_only"]
    assert run["tmpfs"] == [f"{path}:{options}" for path, options in effective["tmpfs"].items()]


def _doc(module: Path) -> dict:
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DOCUMENTATION":
            return yaml.safe_load(node.value.value)
    raise AssertionError(f"no DOCUMENTATION in {module}")


def test_container_limits_is_documented_as_specified_in_every_module():
    spec = ctr.CONTAINER_LIMITS_SPEC
    fragment = importlib.import_module("ansible_collections.gatehouse.access.plugins.doc_fragments.deploy")
    doc = yaml.safe_load(fragment.ModuleDocFragment.CONTAINER_LIMITS)["options"]["container_limits"][
        "suboptions"
    ]
    assert set(doc) == set(spec)
    for name, option in doc.items():
        assert option["type"] == spec[name]["type"], name
        assert "default" not in option and "default" not in spec[name], name
    # One declaration: every module that takes the option documents it with this fragment.
    assert "container_limits" not in yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]
    for module in ("halb", "cmsg", "broker"):
        documentation = _doc(REPO / "plugins" / "modules" / f"{module}.py")
        assert (
            "gatehouse.access.deploy.container_limits" in documentation["extends_documentation_fragment"]
        ), module
        assert "container_limits" not in documentation["options"], module
    assert dep.COMMON_ARGUMENT_SPEC["container_limits"] is ctr.CONTAINER_LIMITS_OPTION


class _FakeContainers:
    def __init__(self, current, probe_error=None):
        self.current, self.probe_error = current, probe_error
        self.runs, self.created = 0, []

    def get(self, name):
        return self.current

    def run(self, image, **kwargs):
        self.runs += 1
        if self.probe_error:
            raise self.probe_error
        return b"1048576\n"

    def create(self, **kwargs):
        self.created.append(kwargs)
        return _FakeContainer()


class _FakeContainer:
    def __init__(self):
        self.removed = False

    def remove(self, force=False):
        self.removed = True

    def start(self):
        pass


class _FakeClient:
    def __init__(self, base_url, current=None, probe_error=None):
        self.api = type("Api", (), {"base_url": base_url})()
        self.containers = _FakeContainers(current, probe_error)


def test_engine_probe_once_per_engine_and_before_the_old_container_goes(monkeypatch):
    monkeypatch.setattr(ctr, "_ENGINE_NOFILE", {})
    cli = _FakeClient("unix://probe-once")
    for name in ("gatehouse-cm", "gatehouse-sg"):
        ctr.converge_container(cli, _spec(name=name), "hash", "create", None)
    assert cli.containers.runs == 1 and len(cli.containers.created) == 2
    assert [u["Hard"] for u in cli.containers.created[0]["ulimits"]] == [65536]

    old = _FakeContainer()
    failing = _FakeClient("unix://probe-fails", current=old, probe_error=ctr.DockerException("no /bin/sh"))
    with pytest.raises(ctr.ContainerError, match="probe container"):
        ctr.converge_container(failing, _spec(), "hash", "recreate", None)
    assert not old.removed and failing.containers.created == []
