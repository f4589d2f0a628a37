"""The deploy engine under the cmsg and broker modules, with a stand-in Docker client.

The spec hash of a container (label ``gatehouse.spec-hash``) decides whether an upgrade of the
collection recreates it. The expected hashes below were computed by the modules of release 0.1.0
for the same inputs: a change of what goes into a hash recreates every deployed container, so
it has to be deliberate (and said in the changelog).

Every input is fixed: TLS material and CA copies are stand-ins with fixed bytes, the grant
secret is fixed, image ids are derived from the image references, and the data directory does
not exist (check mode writes nothing).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import sys
import types
from pathlib import Path

import pytest
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from docker.errors import ImageNotFound, NotFound

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
_UTILS = "ansible_collections.gatehouse.access.plugins.module_utils."
cmsg = importlib.import_module(_UTILS + "_deploy.cmsg")
broker = importlib.import_module(_UTILS + "_deploy.broker")
dep = importlib.import_module(_UTILS + "_deploy.common")
ctr = importlib.import_module(_UTILS + "_docker.containers")
files = importlib.import_module(_UTILS + "_common.files")

DATA_DIR = "/nonexistent-gatehouse-engine-test/%s"
TOTP_KEY = base64.b64encode(bytes(range(32))).decode("ascii")


class FakeImage:
    def __init__(self, ref: str) -> None:
        self.id = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()


class FakeCollection:
    """containers/networks of an empty Docker host; images: every reference is present."""

    def get(self, name: str):
        raise NotFound(f"no {name}")

    def list(self, *args, **kwargs) -> list:
        return []


class FakeImages(FakeCollection):
    def get(self, name: str) -> FakeImage:
        return FakeImage(name)


class FakeClient:
    def __init__(self) -> None:
        self.images = FakeImages()
        self.containers = FakeCollection()
        self.networks = FakeCollection()


class FakeModule:
    check_mode = True
    _diff = True

    def __init__(self, params: dict) -> None:
        self.params = params
        self.no_log_values: set[str] = set()

    def fail_json(self, **result):
        raise AssertionError(f"module failed: {result!r}")

    def warn(self, text: str) -> None:
        pass


def stand_in(path: str, label: str) -> files.PlannedFile:
    return files.PlannedFile(path, f"{label}\n".encode(), 0o644, ctr.SERVICE_UID, ctr.SERVICE_GID)


@pytest.fixture
def hashes(monkeypatch):
    """Run a module's run() in check mode on an empty Docker host; returns {container: spec hash}."""
    recorded: dict[str, str] = {}
    real_hash = ctr.spec_hash

    def spec_hash(spec, inputs):
        recorded[spec["name"]] = real_hash(spec, inputs)
        return recorded[spec["name"]]

    def tls_files(params, certs_dir, common_name, sans, errors, warnings):
        names = ["cert.pem", "key.pem"] + (["ca.pem"] if params["ca_cert"] else [])
        return [stand_in(os.path.join(certs_dir, n), n) for n in names], {"source": "provided"}

    def extra_file(source, target, option, errors):
        return stand_in(target, f"{option} {source}") if source else None

    def provided_files(params, cert, key, ca, errors, warnings, prefix=""):
        return [stand_in(target, params[option]) for option, target in (cert, key)], None

    monkeypatch.setattr(ctr, "spec_hash", spec_hash)
    monkeypatch.setattr(ctr, "client", lambda *args, **kwargs: FakeClient())
    monkeypatch.setattr(dep, "tls_files", tls_files)
    monkeypatch.setattr(dep, "extra_file", extra_file)
    monkeypatch.setattr(dep, "provided_files", provided_files)
    monkeypatch.setattr(dep, "host_networks", lambda: [])
    monkeypatch.setattr(cmsg.secrets, "token_bytes", lambda n: bytes(range(n)))

    def run(logic, options: dict) -> dict[str, str]:
        recorded.clear()
        checked = ArgumentSpecValidator(
            logic.ARGUMENT_SPEC,
            required_if=logic.REQUIRED_IF,
            required_together=getattr(logic, "REQUIRED_TOGETHER", None),
        ).validate(options)
        assert not checked.error_messages, checked.error_messages
        result = logic.run(FakeModule(checked.validated_parameters))
        assert result["changed"] is True
        return dict(recorded)

    return run


CMSG_BASE = {
    "accept_policies": True,
    "broker_url": "https://broker.example.test:8443",
    "external_pcoip_ip": ["203.0.113.10"],
    "ssl_cert": "/pki/cert.pem",
    "ssl_key": "/pki/key.pem",
    "agent_ca_cert": "/pki/ca.pem",
    "host_label": "node1",
    "name_prefix": "gh",
    "data_dir": DATA_DIR % "cmsg",
}
BROKER_BASE = {
    "admin_token": "t" * 24,
    "ssl_cert": "/pki/cert.pem",
    "ssl_key": "/pki/key.pem",
    "client_ca_cert": "/pki/ca.pem",
    "host_label": "node1",
    "name_prefix": "gh",
    "data_dir": DATA_DIR % "broker",
}
DIRECTORY = {
    "domain": "CORP",
    "servers": ["ldaps://dc1.corp.example"],
    "ca_cert": "/pki/ldap-ca.pem",
    "bind_dn": "cn=svc,dc=corp,dc=example",
    "bind_password": "bind-secret-1234",
    "base_dn": "dc=corp,dc=example",
}

# Computed by release 0.1.0 (commit 6e51fef) with the inputs above.
CMSG_CASES = {
    "bridge with gateway": (
        {},
        {
            "gh-cm": "c58990dd87ff6794b08845537c98149d81c3db98c5b5bf9310829f07146ca625",
            "gh-sg": "a3054dfbf5990fe668c9a850a40475299c533e13000ac719cd5dbd552e99740d",
        },
    ),
    "host, no gateway, identity, broker CA, no redirect": (
        {
            "network_mode": "host",
            "enable_security_gateway": False,
            "external_pcoip_ip": [],
            "identity_cert": "/pki/cm.pem",
            "identity_key": "/pki/cm-key.pem",
            "broker_ca_cert": "/pki/broker-ca.pem",
            "http_port": 0,
            "ca_cert": "/pki/chain.pem",
        },
        {"gh-cm": "984caea84ae80ccbe75e12ab552c9519abfed12fb41cd7f30b613f013dc9feea"},
    ),
    "bridge, IPv6, limits, proxies": (
        {
            "enable_ipv6": True,
            "external_pcoip_ip": ["203.0.113.10", "2001:db8::10"],
            "container_limits": {"memory": "2g", "pids": 600},
            "trusted_proxies": ["10.0.0.0/24"],
            "host_address": ["cmsg1.example.test"],
            "log_level": "debug",
        },
        {
            "gh-cm": "820f01475bae102a3a286dd6806b44ff1d66cb21bf84ed7ac592a8456187e5f7",
            "gh-sg": "3706578045dacec1ff80404b8436e8187aec7d467d8eaaba0877990b773cfaf3",
        },
    ),
}
BROKER_CASES = {
    "bridge": ({}, {"gh-broker": "19be0b79f854e14f531257f72db63c828711c4a853c6c3326c72139a070bd1c2"}),
    "host, directory, TOTP key": (
        {
            "network_mode": "host",
            "domains": ["CORP", "LAB"],
            "directories": [DIRECTORY],
            "second_factor": {"method": "totp", "totp_key": TOTP_KEY, "domains": ["CORP"]},
        },
        {"gh-broker": "43fd99d300d77ea55b198fe2f467eeb142cdf16c4a6a5e0ada1872181803b0d8"},
    ),
    "RADIUS, no client verification, limits": (
        {
            "client_tls_verify": False,
            "client_ca_cert": None,
            "second_factor": {
                "method": "radius",
                "radius_servers": ["radius1.corp.example:1812"],
                "radius_secret": "radius-secret-5678",
            },
            "container_limits": {"memory": "1g"},
            "https_port": 8443,
        },
        {"gh-broker": "414b46dc5f3de8ae50eb8c78ccc9c59c0e5704ab03ae1524c53bba56b3fd16da"},
    ),
}


@pytest.mark.parametrize("case", sorted(CMSG_CASES))
def test_cmsg_spec_hashes_are_those_of_0_1_0(hashes, case: str) -> None:
    options, expected = CMSG_CASES[case]
    assert hashes(cmsg, dict(CMSG_BASE, **options)) == expected


def test_a_forwarder_deploys_the_security_gateway_alone(hashes) -> None:
    """forward_to: one container (the SG), no CM; other deployments keep their hashes above."""
    options = {
        "accept_policies": True,
        "forward_to": ["10.20.0.11:4172", "10.20.0.12:4172"],
        "host_label": "dmz1",
        "name_prefix": "gh",
        "data_dir": DATA_DIR % "cmsg",
    }
    assert set(hashes(cmsg, options)) == {"gh-sg"}


@pytest.mark.parametrize("case", sorted(BROKER_CASES))
def test_broker_spec_hashes_are_those_of_0_1_0(hashes, case: str) -> None:
    options, expected = BROKER_CASES[case]
    assert hashes(broker, dict(BROKER_BASE, **options)) == expected


# ------------------------------------------------------------------ engine behaviour

engine = importlib.import_module(_UTILS + "_deploy.engine")


class FakeObject:
    """A container or network of ours (managed-by label)."""

    def __init__(self, name: str) -> None:
        labels = {ctr.LABEL_MANAGED: "gatehouse.access.cmsg"}
        self.name = name
        self.labels = labels
        self.status = "running"
        self.attrs = {"Config": {"Labels": labels}, "Labels": labels}


class Present(FakeCollection):
    def __init__(self, *names: str) -> None:
        self.names = names

    def get(self, name: str):
        if name in self.names:
            return FakeObject(name)
        raise NotFound(f"no {name}")


def test_retired_container_without_network_is_removed_and_no_network_reported(hashes, monkeypatch) -> None:
    """Host mode, gateway switched off: the old SG container goes; the network was never there."""
    client = FakeClient()
    client.containers = Present("gh-sg")
    monkeypatch.setattr(ctr, "client", lambda *args, **kwargs: client)
    options = dict(CMSG_BASE, network_mode="host", enable_security_gateway=False, external_pcoip_ip=[])
    checked = ArgumentSpecValidator(cmsg.ARGUMENT_SPEC, required_if=cmsg.REQUIRED_IF).validate(options)
    result = cmsg.run(FakeModule(checked.validated_parameters))
    assert {"name": "gh-sg", "action": "removed"} in result["containers"]
    assert result["network"] == {"name": "gh-cmsg", "action": "none"}

    client.networks = Present("gh-cmsg")
    result = cmsg.run(FakeModule(checked.validated_parameters))
    assert result["network"] == {"name": "gh-cmsg", "action": "removed"}


class NoImages(FakeCollection):
    """No image on the engine; the registry has every reference (asked, never downloaded)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def get(self, name: str):
        raise ImageNotFound(f"no {name}")

    def get_registry_data(self, name: str) -> None:
        self.asked.append(name)


class PullRecorder:
    def __init__(self, pulled: list) -> None:
        self.pull = lambda *args, **kwargs: pulled.append(args) or iter(())


def test_with_errors_images_are_only_looked_at(monkeypatch) -> None:
    """An option error found first: nothing is pulled and the registry is not asked (the run fails anyway)."""
    pulled: list = []
    client = FakeClient()
    client.images = NoImages()
    client.images.pull = lambda *args, **kwargs: pulled.append(args)
    client.api = PullRecorder(pulled)
    params = {
        "registry": "registry.example",
        "image_source": "registry",
        "image_tag": "0.1.0",
        "bundle_path": None,
    }
    errors = ["an earlier problem"]
    refs, ids, _loaded = engine.resolve_images(client, params, ["broker"], False, errors)
    assert pulled == [] and ids == {"broker": None} and errors == ["an earlier problem"]
    assert refs == {"broker": "registry.example/gatehouse/broker:0.1.0"}
    assert client.images.asked == []

    # Check mode without an error asks the registry (a missing tag fails the check run too).
    engine.resolve_images(client, params, ["broker"], True, [])
    assert client.images.asked == ["registry.example/gatehouse/broker:0.1.0"] and pulled == []

    params["image_source"] = "local"
    engine.resolve_images(client, params, ["broker"], False, errors)
    assert "is not present on the Docker host" in errors[-1]


def test_ensure_image_on_a_failing_run_asks_only_the_engine() -> None:
    """The Docker layer itself: failing=True neither pulls nor contacts the registry, in any mode."""
    pulled: list = []
    client = FakeClient()
    client.images = NoImages()
    client.api = PullRecorder(pulled)
    ref = "registry.example/gatehouse/broker:0.1.0"
    for check_mode in (False, True):
        assert ctr.ensure_image(client, ref, True, check_mode, failing=True) == (None, True)
    assert client.images.asked == [] and pulled == []
    assert ctr.ensure_image(client, ref, True, True) == (None, True)
    assert client.images.asked == [ref] and pulled == []
    with pytest.raises(ctr.ContainerError, match="is not present on the Docker host"):
        ctr.ensure_image(client, ref, False, False, failing=True)


# ------------------------------------------------------------------ the HALB node

halb_module = importlib.import_module("ansible_collections.gatehouse.access.plugins.modules.halb")
halb_node = importlib.import_module(_UTILS + "_deploy.halb")
halb_runtime = importlib.import_module(_UTILS + "_halb.runtime")

HALB_BASE = {
    "config_dir": DATA_DIR % "halb",
    "node_name": "lb1",
    "network_mode": "gh-halb-net",
    "ipv4_address": "10.199.7.11",
    "virtual_servers": [
        {
            "name": "cm",
            "vip": "10.199.7.100",
            "port": 443,
            "backend_tls_verify": "none",
            "backends": [
                {"name": "cm1", "address": "10.199.7.21", "port": 443},
                {"name": "cm2", "address": "10.199.7.22", "port": 443, "state": "drain"},
            ],
        }
    ],
    "vrrp": {"router_id": 51, "priority": 150, "peers": ["10.199.7.12"], "vips": ["10.199.7.100"]},
}
# Computed by the halb module before it ran on the deploy engine (commit 244aeb8), same inputs.
HALB_CASES = {
    "bridge network": (
        {},
        {"gatehouse-halb": "741a1c42188880cb833e83ac4b01acec45fe9fe5b54bdb10f06cddae4897e4bf"},
    ),
    "no metrics, limits, own image": (
        {"metrics_port": 0, "container_limits": {"memory": "512m"}, "image": "gh/halb:test"},
        {"gatehouse-halb": "473ac87b042357387ca4a369d3e708f32efc9d4afd6f4bfba236db5bbea89d08"},
    ),
}


@pytest.mark.parametrize("case", sorted(HALB_CASES))
def test_halb_spec_hashes_are_unchanged(hashes, monkeypatch, case: str) -> None:
    """Moving the node onto the engine must not recreate the HALB containers already running."""
    monkeypatch.setattr(halb_runtime, "validate", lambda *args: (True, ""))
    logic = types.SimpleNamespace(
        ARGUMENT_SPEC=halb_module.ARGUMENT_SPEC,
        REQUIRED_IF=[("state", "present", ["node_name", "virtual_servers", "vrrp"])],
        run=halb_node.run_present,
    )
    options, expected = HALB_CASES[case]
    assert hashes(logic, dict(HALB_BASE, **options)) == expected


# ------------------------------------------------------------------ Reload: files taken up while running


class Running(FakeCollection):
    """One running container of ours with the spec hash ``labels[LABEL_HASH]``."""

    def __init__(self, name: str, spec_hash: str) -> None:
        self.object = FakeObject(name)
        self.object.labels.update({ctr.LABEL_ROLE: "app", ctr.LABEL_HASH: spec_hash})

    def get(self, name: str):
        if name == self.object.name:
            return self.object
        raise NotFound(f"no {name}")


class ReloadRecorder:
    """A Reload's hooks that record their calls; validate refuses when ``refuse`` is set."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.staged: dict[str, bytes] = {}
        self.applied: list[tuple] = []

    def validate(self, cli, stage: str) -> None:
        for root, _dirs, names in os.walk(stage):
            for name in names:
                path = os.path.join(root, name)
                self.staged[os.path.relpath(path, stage)] = Path(path).read_bytes()
        if self.refuse:
            raise engine.Failure("refused")

    def apply(self, cli, changed, removed, check_mode: bool) -> list[str]:
        self.applied.append(
            (
                [(f.path, f.before, f.data) for f in changed],
                removed,
                [os.path.exists(p) for p in removed],
                check_mode,
            )
        )
        return ["reloaded"]


def reload_deployment(data_dir: Path, conf: bytes, env: bytes, recorder: ReloadRecorder, stale: list[str]):
    """A deployment of one container reading ``env`` (hash) and taking ``conf/app.conf`` (and a stale ``old.conf``) up by a reload."""
    spec = {"service": "test", "name": "gh-app", "labels": {ctr.LABEL_ROLE: "app"}}
    container = engine.Container(
        spec,
        reload=engine.Reload(
            apply=recorder.apply, validate=recorder.validate, files=("app.conf", "old.conf")
        ),
    )
    return engine.Deployment(
        str(data_dir),
        [
            files.PlannedFile(str(data_dir / "conf" / "app.conf"), conf, 0o644),
            files.PlannedFile(str(data_dir / "env"), env, 0o600),
        ],
        [files.PlannedDir(str(data_dir), 0o755), files.PlannedDir(str(data_dir / "conf"), 0o750)],
        [container],
        {"test": "sha256:image"},
        [],
        stale_files=[(path, "<removed>\n") for path in stale],
        compose=False,
    )


@pytest.fixture
def running_app(tmp_path: Path):
    """data_dir with conf/app.conf (old), env and a stale conf/old.conf; a running container of that state."""
    data_dir = tmp_path / "app"
    (data_dir / "conf").mkdir(parents=True)
    (data_dir / "conf" / "app.conf").write_bytes(b"old\n")
    (data_dir / "conf" / "old.conf").write_bytes(b"stale\n")
    (data_dir / "env").write_bytes(b"A=1\n")
    os.chmod(data_dir, 0o755)
    os.chmod(data_dir / "conf", 0o750)
    os.chmod(data_dir / "conf" / "app.conf", 0o644)
    os.chmod(data_dir / "env", 0o600)
    current = reload_deployment(data_dir, b"old\n", b"A=1\n", ReloadRecorder(), [])
    current.plan(FakeClient())
    client = FakeClient()
    client.containers = Running("gh-app", current.containers[0].hash)
    return data_dir, client


@pytest.mark.parametrize("check_mode", [False, True])
def test_a_reloaded_file_keeps_the_container_and_is_validated_staged_first(running_app, check_mode) -> None:
    data_dir, client = running_app
    recorder = ReloadRecorder()
    stale = str(data_dir / "conf" / "old.conf")
    deployment = reload_deployment(data_dir, b"new\n", b"A=1\n", recorder, [stale])
    deployment.plan(client)
    container = deployment.containers[0]
    assert container.action == "none" and deployment.changed
    assert container.reloads == [str(data_dir / "conf" / "app.conf"), stale]

    deployment.apply(client, check_mode, None)
    # The staged copy has the new files and no compose file; the stage is gone afterwards.
    assert recorder.staged == {"conf/app.conf": b"new\n", "env": b"A=1\n"}
    changed = [(str(data_dir / "conf" / "app.conf"), b"old\n", b"new\n")]
    # The stale file is removed only after the reload (the old configuration may still name it).
    assert recorder.applied == [(changed, [stale], [True], check_mode)]
    assert container.reloaded == ["reloaded"]
    on_disk = (data_dir / "conf" / "app.conf").read_bytes()
    assert on_disk == (b"old\n" if check_mode else b"new\n")
    assert os.path.exists(stale) == check_mode
    assert [d["before"] for d in deployment.diff] == ["old\n", "<removed>\n"]


def test_a_refused_validation_changes_nothing(running_app) -> None:
    data_dir, client = running_app
    recorder = ReloadRecorder(refuse=True)
    deployment = reload_deployment(
        data_dir, b"bad\n", b"A=1\n", recorder, [str(data_dir / "conf" / "old.conf")]
    )
    deployment.plan(client)
    with pytest.raises(engine.Failure, match="refused"):
        deployment.apply(client, False, None)
    assert recorder.staged["conf/app.conf"] == b"bad\n" and recorder.applied == []
    assert (data_dir / "conf" / "app.conf").read_bytes() == b"old\n"
    assert (data_dir / "conf" / "old.conf").exists()


def test_a_file_outside_the_reload_still_recreates(running_app) -> None:
    data_dir, client = running_app
    recorder = ReloadRecorder()
    deployment = reload_deployment(data_dir, b"old\n", b"A=2\n", recorder, [])
    deployment.plan(client)
    assert deployment.containers[0].action == "recreate" and deployment.containers[0].reloads == []
    # An unchanged reloaded file: no validation either.
    deployment.apply(client, True, None)
    assert recorder.staged == {} and recorder.applied == []
