"""Hardening of the containers the modules start (plugins/module_utils/_containers.py, _halb_docker.py)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
ctr = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._containers")
hd = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._halb_docker")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy")


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


def _doc_suboptions(module: Path, option: str) -> dict:
    tree = ast.parse(module.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DOCUMENTATION":
            return yaml.safe_load(node.value.value)["options"][option]["suboptions"]
    raise AssertionError(f"no DOCUMENTATION in {module}")


def test_container_limits_is_documented_as_specified_in_every_module():
    spec = ctr.CONTAINER_LIMITS_SPEC
    halb_doc = _doc_suboptions(REPO / "plugins" / "modules" / "halb.py", "container_limits")
    fragment = importlib.import_module("ansible_collections.gatehouse.access.plugins.doc_fragments.deploy")
    deploy_doc = yaml.safe_load(fragment.ModuleDocFragment.DOCUMENTATION)["options"]["container_limits"][
        "suboptions"
    ]
    for doc in (halb_doc, deploy_doc):
        assert set(doc) == set(spec)
        for name, option in doc.items():
            assert option["type"] == spec[name]["type"], name
            assert "default" not in option and "default" not in spec[name], name
    assert dep.COMMON_ARGUMENT_SPEC["container_limits"] is ctr.CONTAINER_LIMITS_OPTION
