"""Hardening of the containers the modules start (plugins/module_utils/_docker/containers.py, _halb/runtime.py)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import docker
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
    host_config = ctr._create_args(_spec(), {}, 65536)["host_config"]
    assert host_config["cap_drop"] == ["ALL"] and host_config["read_only"] is True
    assert host_config["security_opt"] == ["no-new-privileges:true"]
    # A change of the limits recreates the container.
    assert ctr.spec_hash(_spec(), {}) != ctr.spec_hash(_spec(container_limits={"memory": "2g"}), {})
    assert ctr.spec_hash(_spec(), {}) == ctr.spec_hash(_spec(container_limits={"memory": None}), {})


def test_compose_file_shows_the_hardening():
    doc = yaml.safe_load(dep.render_compose([_spec()], None))
    broker = doc["services"]["broker"]
    assert broker["cap_drop"] == ["ALL"] and broker["cap_add"] == []
    assert broker["security_opt"] == ["no-new-privileges:true"] and broker["read_only"] is True
    assert broker["ulimits"] == {"nofile": {"soft": 65536, "hard": 65536}}


def _halb_spec(**options) -> dict:
    return hd.container_spec(
        name="gatehouse-halb",
        image="gatehouse/halb:0.1.0",
        host_label="halb1",
        config_dir="/opt/gatehouse/halb",
        network_mode=options.pop("network_mode", "host"),
        ipv4_address=options.pop("ipv4_address", None),
        **options,
    )


def _engine(monkeypatch, base_url: str) -> _FakeClient:
    """A fake engine whose open files limit is already known (no probe container)."""
    monkeypatch.setattr(ctr, "_ENGINE_NOFILE", {base_url: None})
    return _FakeClient(base_url)


def test_halb_container_is_a_hardened_spec_like_the_others(monkeypatch):
    spec = _halb_spec(container_limits={"memory": "2g"})
    # The same labels as the cmsg and broker containers: ours, the host, the role.
    assert spec["labels"] == {
        ctr.LABEL_ROLE: "halb",
        ctr.LABEL_HOST: "halb1",
        ctr.LABEL_MANAGED: "gatehouse.access.halb",
    }
    cli = _engine(monkeypatch, "unix://halb")
    ctr.converge_container(cli, spec, "hash", "create", None)
    created = cli.api.created[0]
    host_config = created["host_config"]
    assert created["labels"][ctr.LABEL_HASH] == "hash" and created["labels"][ctr.LABEL_MANAGED]
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["CapAdd"] == ctr.hardening("halb")["cap_add"]
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"] and host_config["ReadonlyRootfs"] is True
    assert set(host_config["Tmpfs"]) == {"/tmp", "/run"}
    assert host_config["Memory"] == 2 * 1024**3 and host_config["PidsLimit"] == 1024
    assert host_config["NetworkMode"] == "host" and "PortBindings" not in host_config
    assert host_config["Binds"] == [
        "/opt/gatehouse/halb/haproxy:/etc/haproxy:ro",
        "/opt/gatehouse/halb/keepalived:/etc/keepalived:ro",
        "/opt/gatehouse/halb/run:/run/haproxy:rw",
    ]
    assert "networking_config" not in created
    # A change of the limits recreates the HALB container, as it does the others.
    assert ctr.spec_hash(spec, {"image": "sha256:1"}) != ctr.spec_hash(_halb_spec(), {"image": "sha256:1"})


def test_halb_container_gets_its_static_address_on_a_user_network(monkeypatch):
    cli = _engine(monkeypatch, "unix://halb-static")
    ctr.converge_container(
        cli, _halb_spec(network_mode="lan", ipv4_address="192.0.2.11"), "hash", "create", None
    )
    created = cli.api.created[0]
    assert created["host_config"]["NetworkMode"] == "lan"
    endpoint = created["networking_config"]["EndpointsConfig"]["lan"]
    assert endpoint["IPAMConfig"]["IPv4Address"] == "192.0.2.11"


def test_halb_validation_container_is_hardened_and_has_no_network(monkeypatch):
    cli = _engine(monkeypatch, "unix://halb-check")
    output = "@@haproxy 0\nConfiguration file is valid\n@@keepalived 0\n"
    cli.containers.output = output.encode()
    ok, message = hd.validate(
        cli, _halb_spec(), "/tmp/candidate/haproxy", "/tmp/candidate/keepalived", "eth0"
    )
    assert ok and message == ""
    created = cli.api.created[0]
    host_config = created["host_config"]
    assert created["name"] == "gatehouse-halb-validate"
    assert created["labels"][ctr.LABEL_ROLE] == "check" and ctr.LABEL_HASH not in created["labels"]
    assert created["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert created["command"] == [
        "gatehouse-halb-validate",
        "/etc/haproxy/haproxy.cfg",
        "/etc/keepalived/keepalived.conf",
        "eth0",
    ]
    assert host_config["NetworkMode"] == "none"
    assert host_config["CapDrop"] == ["ALL"] and host_config["CapAdd"] == ["NET_ADMIN"]
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"] and host_config["ReadonlyRootfs"] is True
    assert host_config["Memory"] == 256 * 1024**2 and host_config["PidsLimit"] == 64
    assert host_config["RestartPolicy"] == {"Name": "no"}
    assert host_config["Binds"] == [
        "/tmp/candidate/haproxy:/etc/haproxy:ro",
        "/tmp/candidate/keepalived:/etc/keepalived:ro",
    ]


class _Existing:
    """A container the engine already has, with these labels."""

    def __init__(self, labels):
        self.labels, self.status = labels, "running"
        self.attrs = {"Config": {"Labels": labels}}


@pytest.mark.parametrize(
    ("labels", "outcome"),
    [
        # Created before the HALB container was a spec like the others: ours, recreated once.
        ({ctr.LABEL_ROLE: "halb", ctr.LABEL_HOST: "halb1", "gatehouse.halb.spec": "0" * 64}, "recreate"),
        (
            {ctr.LABEL_ROLE: "halb", ctr.LABEL_MANAGED: "gatehouse.access.halb", ctr.LABEL_HASH: "hash"},
            "none",
        ),
        ({ctr.LABEL_ROLE: "cm", ctr.LABEL_MANAGED: "gatehouse.access.cmsg"}, "not a halb one"),
        ({ctr.LABEL_ROLE: "halb"}, "not created by Gatehouse"),
        ({}, "not created by Gatehouse"),
    ],
)
def test_halb_plan_adopts_only_halb_containers_of_gatehouse(labels, outcome):
    cli = _FakeClient("unix://plan", current=_Existing(labels))
    if outcome in ("recreate", "none"):
        assert ctr.container_plan(cli, _halb_spec(), "hash") == outcome
    else:
        with pytest.raises(ctr.ContainerError, match=outcome):
            ctr.container_plan(cli, _halb_spec(), "hash")
        with pytest.raises(ctr.ContainerError, match=outcome):
            ctr.remove_container(cli, "gatehouse-halb", True, role="halb")


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
        self.runs = 0
        self.output = b""

    def get(self, name):
        # Containers the fake engine created are looked up by id.
        return _FakeContainer(self.output) if name.startswith("created-") else self.current

    def run(self, image, **kwargs):
        self.runs += 1
        if self.probe_error:
            raise self.probe_error
        return b"1048576\n"


class _FakeContainer:
    def __init__(self, output=b""):
        self.removed = False
        self.output = output

    def remove(self, force=False):
        self.removed = True

    def start(self):
        pass

    def wait(self, timeout=None):
        return {"StatusCode": 0}

    def logs(self, **kwargs):
        return self.output


class _FakeApi(docker.APIClient):
    """The SDK's own argument checks and host config, without an engine."""

    def __init__(self, base_url):
        super().__init__(base_url=base_url, version="1.41")
        # The SDK names every unix socket http+docker://localhost; the probe cache needs them apart.
        self.base_url = base_url
        self.created = []

    def create_container(self, **kwargs):
        self.created.append(kwargs)
        return {"Id": f"created-{len(self.created)}"}


class _FakeClient:
    def __init__(self, base_url, current=None, probe_error=None):
        self.api = _FakeApi(base_url)
        self.containers = _FakeContainers(current, probe_error)


def test_engine_probe_once_per_engine_and_before_the_old_container_goes(monkeypatch):
    monkeypatch.setattr(ctr, "_ENGINE_NOFILE", {})
    cli = _FakeClient("unix://probe-once")
    for name in ("gatehouse-cm", "gatehouse-sg"):
        ctr.converge_container(cli, _spec(name=name), "hash", "create", None)
    assert cli.containers.runs == 1 and len(cli.api.created) == 2
    assert [u["Hard"] for u in cli.api.created[0]["host_config"]["Ulimits"]] == [65536]

    old = _FakeContainer()
    failing = _FakeClient("unix://probe-fails", current=old, probe_error=ctr.DockerException("no /bin/sh"))
    with pytest.raises(ctr.ContainerError, match="probe container"):
        ctr.converge_container(failing, _spec(), "hash", "recreate", None)
    assert not old.removed and failing.api.created == []
