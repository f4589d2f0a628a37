"""The cmsg module's tenants option (docs/tenants.md): checks, files, settings and containers.

One name: the option ``tenants`` becomes data/tenants.json, named by the TenantsFile key of
config.properties and SecurityGateway.conf, and the CM's and SG's settings field ``tenants``.
Without tenants nothing changes (no key, no file: the spec hashes of test_deploy_engine.py hold);
adding or removing a tenant once there are tenants leaves every spec hash as it is (the services
reload tenants.json on SIGHUP instead of being recreated).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import test_deploy_engine as engine_tests
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from gatehouse.cm.settings import CmSettings
from gatehouse.config import Config, parse_kv
from gatehouse.grant import generate_secret
from gatehouse.sg.settings import SgSettings

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
helpers = importlib.import_module("collection_helpers")
helpers.ensure_importable()
cmsg = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.cmsg")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
CMSG_BASE = engine_tests.CMSG_BASE
hashes = engine_tests.hashes  # the fixture: spec hashes of a check-mode run on an empty Docker host

A = {
    "name": "tenant-a",
    "host_names": ["Desktops.Tenant-A.example"],
    "broker_url": "https://broker.a.internal:443",
    "agent_networks": ["10.31.0.0/16"],
}
B = {"name": "tenant-b", "host_names": ["desktops.tenant-b.example"], "broker_url": "https://10.32.0.5:8443"}
C = {"name": "tenant-c", "host_names": ["c.example.net"], "broker_url": "https://broker.c.internal:443"}


def params(**overrides) -> dict:
    tenants = overrides.pop("tenants", [])
    full = [{"agent_networks": [], **t} for t in tenants]
    return helpers.cmsg_params(tenants=full, **overrides)


def test_without_tenants_no_key_and_no_file() -> None:
    p = params()
    values = cmsg.validate(p, lambda: [])
    assert values["tenants"] == []
    assert cmsg.TENANTS_KEY not in cmsg.config_properties(p, values).decode()
    assert cmsg.TENANTS_KEY not in cmsg.security_gateway_conf(p, values).decode()


def test_tenants_reach_the_settings_field_of_their_name(tmp_path: Path) -> None:
    p = params(tenants=[A, B], broker_url=None)
    values = cmsg.validate(p, lambda: [])
    (tmp_path / cmsg.TENANTS_FILE).write_bytes(cmsg.tenants_json(values))
    env = {"GATEHOUSE_GRANTSECRET": generate_secret()}

    def read(text: bytes) -> dict[str, str]:
        kv = parse_kv(text.decode())
        assert kv[cmsg.TENANTS_KEY] == "/data/" + cmsg.TENANTS_FILE
        kv[cmsg.TENANTS_KEY] = str(tmp_path / cmsg.TENANTS_FILE)
        return kv

    cm = CmSettings.from_config(Config(read(cmsg.config_properties(p, values)), env))
    sg = SgSettings.from_config(Config(read(cmsg.security_gateway_conf(p, values)), env))
    for settings in (cm, sg):
        assert [t.name for t in settings.tenants.tenants] == ["tenant-a", "tenant-b"]
        assert settings.tenants.by_host("desktops.tenant-a.example").name == "tenant-a"
    assert cm.tenants.by_name("tenant-b").broker_url == "https://10.32.0.5:8443/pcoip-broker/xml"
    assert cm.broker_url == ""
    # One rendering: the same option gives the same bytes (no needless rewrite, no reload).
    assert cmsg.tenants_json(cmsg.validate(p, lambda: [])) == cmsg.tenants_json(values)


@pytest.mark.parametrize(
    ("tenants", "message"),
    [
        ([{**A, "name": "Tenant_A"}], "name 'Tenant_A' must be"),
        ([A, {**B, "name": "tenant-a"}], "tenant-a is listed twice"),
        ([A, {**B, "host_names": ["desktops.tenant-a.example"]}], "already tenant tenant-a's"),
        ([{**A, "host_names": ["localhost"]}], "not a fully qualified domain name"),
        ([{**A, "host_names": []}], "host_names needs"),
        ([{**A, "broker_url": "http://broker.a.internal"}], "tenants: tenant-a: broker_url must be an https"),
        ([{**A, "agent_networks": ["10.0.0.0/33"]}], "agent_networks entry"),
    ],
)
def test_bad_tenants_are_refused(tenants: list, message: str) -> None:
    with pytest.raises(dep.ValidationError) as exc:
        cmsg.validate(params(tenants=tenants), lambda: [])
    assert any(message in e for e in exc.value.errors), exc.value.errors


def test_broker_url_is_still_required_without_tenants() -> None:
    with pytest.raises(dep.ValidationError) as exc:
        cmsg.validate(params(broker_url=None), lambda: [])
    assert any("broker_url is required" in e for e in exc.value.errors)


def test_adding_and_removing_tenants_keeps_the_containers(hashes) -> None:
    """Spec hashes: the same for {A, B}, {A, C} and {A}; another (once) without tenants."""
    full = [{"agent_networks": [], **t} for t in (A, B, C)]
    by_set = {
        names: hashes(cmsg, dict(CMSG_BASE, tenants=[t for t in full if t["name"][-1] in names]))
        for names in ("ab", "ac", "a")
    }
    assert by_set["ab"] == by_set["ac"] == by_set["a"]
    assert hashes(cmsg, CMSG_BASE) != by_set["a"]


def test_the_tenants_file_is_reloaded_not_hashed() -> None:
    """Each container's Reload covers tenants.json (SIGHUP), and no container reads it for its hash."""
    assert all(cmsg.TENANTS_FILE not in names for names in cmsg.READS.values())


class Signalled:
    def __init__(self, status: str = "running") -> None:
        self.status = status
        self.signals: list[str] = []

    def kill(self, signal: str) -> None:
        self.signals.append(signal)


class OneContainer:
    def __init__(self, container: Signalled) -> None:
        self.container = container

    def get(self, name: str) -> Signalled:
        return self.container


@pytest.mark.parametrize("check_mode", [False, True])
def test_the_reload_hook_sends_sighup(check_mode: bool) -> None:
    """The CM or SG kept with a changed tenants.json gets SIGHUP (in check mode: only said)."""
    container = Signalled()
    cli = type("Cli", (), {"containers": OneContainer(container)})()
    done = cmsg._sighup("gh-cm")(cli, [], [], check_mode)
    assert done == ["reloaded the tenants of gh-cm (SIGHUP)"]
    assert container.signals == ([] if check_mode else ["SIGHUP"])


# ------------------------------------------------------------------ a tenant's own files

PKI = importlib.import_module("pki")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI.TestPKI(tmp_path_factory.mktemp("tenant-pki"))


def own_files(pki, name: str = "tenant-b") -> dict:
    issued = pki.issue(name, ["desktops.tenant-b.example"])
    return {"ssl_cert": str(issued.cert), "ssl_key": str(issued.key), "broker_ca_cert": str(issued.ca)}


def test_own_files_are_named_in_tenants_json_by_their_container_path(pki, tmp_path: Path) -> None:
    """Each option becomes certs/tenant.<name>.*.pem; the services' loader takes the entry."""
    p = params(tenants=[A, {**B, **own_files(pki)}], broker_url=None)
    values = cmsg.validate(p, lambda: [])
    entries = {t["name"]: t for t in values["tenants"]}
    assert entries["tenant-b"]["ssl_cert"] == "/certs/tenant.tenant-b.cert.pem"
    assert entries["tenant-b"]["ssl_key"] == "/certs/tenant.tenant-b.key.pem"
    assert entries["tenant-b"]["broker_ca_cert"] == "/certs/tenant.tenant-b.broker-ca.pem"
    # A tenant without them keeps the entry it had (no needless rewrite, no reload).
    assert set(entries["tenant-a"]) == {"name", "host_names", "broker_url", "agent_networks"}
    (tmp_path / cmsg.TENANTS_FILE).write_bytes(cmsg.tenants_json(values))
    loaded = importlib.import_module("gatehouse.tenants").load_tenants(
        tmp_path / cmsg.TENANTS_FILE, need_broker=True
    )
    tenant = loaded.by_name("tenant-b")
    assert (tenant.ssl_cert, tenant.ssl_key, tenant.broker_ca_cert) == (
        "/certs/tenant.tenant-b.cert.pem",
        "/certs/tenant.tenant-b.key.pem",
        "/certs/tenant.tenant-b.broker-ca.pem",
    )


def test_own_files_are_copied_checked_and_the_key_is_private(pki, tmp_path: Path) -> None:
    files = own_files(pki)
    planned = cmsg.tenant_files([{**B, **files}], str(tmp_path), [], [])
    by_name = {Path(f.path).name: f for f in planned}
    assert sorted(by_name) == [
        "tenant.tenant-b.broker-ca.pem",
        "tenant.tenant-b.cert.pem",
        "tenant.tenant-b.key.pem",
    ]
    assert by_name["tenant.tenant-b.cert.pem"].data == Path(files["ssl_cert"]).read_bytes()
    assert by_name["tenant.tenant-b.key.pem"].mode == 0o600
    assert by_name["tenant.tenant-b.broker-ca.pem"].data == Path(files["broker_ca_cert"]).read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("mismatch", "tenants: tenant-b: "),
        ("missing", "does not exist on the target"),
        ("ca-not-pem", "tenants: tenant-b: broker_ca_cert"),
    ],
)
def test_bad_own_files_are_refused(pki, tmp_path: Path, change: str, message: str) -> None:
    files = own_files(pki)
    if change == "mismatch":
        files["ssl_key"] = str(pki.issue("other", ["other.example"]).key)
    elif change == "missing":
        files["ssl_cert"] = str(tmp_path / "absent.pem")
    else:
        (tmp_path / "not.pem").write_text("not a certificate\n")
        files["broker_ca_cert"] = str(tmp_path / "not.pem")
    errors: list[str] = []
    cmsg.tenant_files([{**B, **files}], str(tmp_path), errors, [])
    assert any(message in e for e in errors), errors


def test_a_certificate_needs_its_key() -> None:
    """The module's argument spec refuses a tenant's certificate without its key (and the reverse)."""
    validator = ArgumentSpecValidator(cmsg.ARGUMENT_SPEC, required_together=cmsg.REQUIRED_TOGETHER)
    for option in ("ssl_cert", "ssl_key"):
        result = validator.validate(params(tenants=[{**B, option: "/pki/b.pem"}]))
        assert any("ssl_cert, ssl_key" in e for e in result.error_messages), result.error_messages
    both = validator.validate(params(tenants=[{**B, "ssl_cert": "/b.pem", "ssl_key": "/b.key"}]))
    assert not both.error_messages, both.error_messages


def test_files_no_tenant_names_are_stale(tmp_path: Path) -> None:
    """A removed tenant's (or option's) files go; every other file of certs/ stays."""
    for name in (
        "tenant.old.cert.pem",
        "tenant.old.key.pem",
        "tenant.b.broker-ca.pem",
        "tenant.b.cert.pem",
        "tenant-b.pem",
        "cert.pem",
    ):
        (tmp_path / name).write_text("x\n")
    kept = [cmsg.PlannedFile(str(tmp_path / "tenant.b.cert.pem"), b"x\n", 0o644)]
    stale = sorted(Path(p).name for p in cmsg.stale_tenant_files(str(tmp_path), kept))
    assert stale == ["tenant.b.broker-ca.pem", "tenant.old.cert.pem", "tenant.old.key.pem"]


def test_own_files_change_no_spec_hash(hashes) -> None:
    """Adding a tenant's certificate and broker CA (or changing them) reloads: the hashes stay."""
    plain = [{"agent_networks": [], **t} for t in (A, B)]
    own = [
        plain[0],
        {**plain[1], "ssl_cert": "/pki/b.pem", "ssl_key": "/pki/b.key", "broker_ca_cert": "/pki/b-ca.pem"},
    ]
    assert hashes(cmsg, dict(CMSG_BASE, tenants=plain)) == hashes(cmsg, dict(CMSG_BASE, tenants=own))
