"""gatehouse.access.broker with enterprise identity (directories, second_factor) against the local Docker engine.

Bad options fail before anything exists; check mode and diff mode show what a run does without
a secret or a hash of one; secret files are 0600 in secrets/ (owner 10001 as root) and never in
the output; the TOTP key is generated once and kept, also by state=absent (only purge removes it);
a second run changes nothing. The identity check runs the new image with ``--check-identity``
before a container with directories or RADIUS is created or replaced: when it fails the running
broker and its files stay as they were.

test_identity_check_against_the_test_directory_and_radius needs a broker image built from the
services with ``--check-identity`` (make images) and the test directory and RADIUS server
(fixture ``identity``); the others need any broker image.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import no_secret, run_module
from deploy_helpers import cleanup, docker_client, objects_named, require_service_images, unique_prefix
from services import free_port
from tls_material import Chain, pem, write

pytestmark = [pytest.mark.docker, pytest.mark.images]

ADMIN = "admin-" + "i" * 30
BIND_PW = "Bind-pw-" + os.urandom(6).hex()
RADIUS_SECRET = "Radius-" + os.urandom(6).hex()
TOTP_KEY = base64.b64encode(os.urandom(32)).decode()
SECRETS = (ADMIN, BIND_PW, RADIUS_SECRET, TOTP_KEY)


@pytest.fixture
def env(tmp_path: Path):
    cli = docker_client()
    prefix = unique_prefix("broker-id")
    try:
        yield cli, prefix, tmp_path
    finally:
        cleanup(cli, prefix)


def base_args(prefix: str, tmp_path: Path, **extra) -> dict:
    args = {
        "admin_token": ADMIN,
        "self_signed": True,
        "client_tls_verify": False,
        "domains": ["CORP", "LAB"],
        "data_dir": str(tmp_path / "broker"),
        "name_prefix": prefix,
        "https_port": free_port(),
    }
    args.update(extra)
    return args


def directory(ca: Path | None = None, **extra) -> dict:
    entry = {
        "domain": "CORP",
        "servers": ["ldaps://127.0.0.1:9"],
        "bind_dn": "cn=gatehouse-svc,ou=services,dc=corp,dc=example",
        "bind_password": BIND_PW,
        "base_dn": "ou=people,dc=corp,dc=example",
    }
    if ca is not None:
        entry["ca_cert"] = str(ca)
    entry.update(extra)
    return entry


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def stages(data_dir: Path) -> list[str]:
    return [p.name for p in data_dir.glob(".identity-check-*")] if data_dir.exists() else []


def test_bad_identity_options_change_nothing(env) -> None:
    _cli, prefix, tmp_path = env
    data_dir = tmp_path / "broker"
    cases = [
        ({"directories": [directory(domain="SALES")]}, "SALES is not one of domains"),
        ({"directories": [directory(servers=["https://dc1.corp.example"])]}, "must be ldaps://host[:636]"),
        ({"directories": [directory(allow_plain=True)]}, "allow_plain only concerns ldap:// servers"),
        ({"second_factor": {"method": "totp", "totp_key": "c2hvcnQ="}}, "totp_key must be the base64 of 32"),
        (
            {"second_factor": {"method": "radius", "radius_servers": ["10.0.0.5"]}},
            "missing: radius_secret",
        ),
        (
            {
                "second_factor": {
                    "method": "radius",
                    "radius_servers": ["10.0.0.5:99999"],
                    "radius_secret": RADIUS_SECRET,
                }
            },
            "invalid port",
        ),
        ({"directories": [directory(ca=tmp_path / "missing.pem")]}, "does not exist"),
    ]
    for options, needle in cases:
        run = no_secret(run_module("broker", base_args(prefix, tmp_path, **options)), SECRETS)
        assert run.failed, options
        assert needle in run.result["msg"], run.result["msg"]
        assert not data_dir.exists(), options


def test_check_mode_and_diff_show_no_secret(env) -> None:
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    ca = write(tmp_path / "corp-ca.pem", pem(Chain().root))
    args = base_args(
        prefix,
        tmp_path,
        directories=[directory(ca, user_attribute="sAMAccountName", group_mode="ad-nested")],
        second_factor={
            "method": "radius",
            "first": True,
            "radius_servers": ["10.0.0.5", "[fd00::5]:1645"],
            "radius_secret": RADIUS_SECRET,
        },
    )
    run = no_secret(run_module("broker", args, check=True, diff=True), SECRETS)
    assert run.changed and not run.failed, run.result
    assert not (tmp_path / "broker").exists() and objects_named(cli, prefix) == []
    props = run.result["config"]["broker_properties"]
    assert props["Domain.CORP.Source"] == "ldap"
    assert props["Domain.CORP.LdapBindPasswordFile"] == "/secrets/ldap-CORP.password"
    assert props["Domain.CORP.LdapCaCert"] == "/certs/ldap-CORP.pem"
    assert props["SecondFactor"] == "radius" and props["SecondFactorFirst"] == "true"
    assert props["RadiusSecretFile"] == "/secrets/radius.secret"
    diffs = {d["after_header"].rsplit("/", 1)[-1]: d for d in run.result["diff"]}
    assert diffs["ldap-CORP.password"]["after"] == "<secret, not shown (changed)>\n"
    assert diffs["radius.secret"]["after"] == "<secret, not shown (changed)>\n"
    assert "/secrets:ro" in diffs["docker-compose.yaml"]["after"]
    # The check is not run in check mode.
    assert "identity_check" not in run.result


def test_totp_key_generated_once_secret_files_and_idempotency(env) -> None:
    """TOTP needs no server, so no identity check: this runs with any broker image."""
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    data_dir = tmp_path / "broker"
    args = base_args(prefix, tmp_path, second_factor={"method": "totp", "totp_issuer": "Gatehouse Test"})
    check = no_secret(run_module("broker", args, check=True, diff=True), SECRETS)
    assert check.changed and not data_dir.exists()
    real = no_secret(run_module("broker", args, diff=True), SECRETS)
    assert real.changed and not real.failed, real.result
    key_file = data_dir / "secrets" / "totp.key"
    key = key_file.read_text().strip()
    assert len(base64.b64decode(key, validate=True)) == 32
    assert key not in real.stdout and key not in json.dumps(real.result)
    assert mode(key_file) == 0o600 and mode(data_dir / "secrets") == 0o700
    if os.geteuid() == 0:
        assert (key_file.stat().st_uid, key_file.stat().st_gid) == (10001, 10001)
    container = cli.containers.get(f"{prefix}-broker")
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/secrets"]["RW"] is False
    assert "identity_check" not in real.result  # TOTP alone has nothing to check against
    # Generated once: the same options again change nothing and keep the key.
    assert not run_module("broker", args, check=True).changed
    again = no_secret(run_module("broker", args, diff=True), (*SECRETS, key))
    assert not again.changed, again.result
    assert key_file.read_text().strip() == key

    # Second factor off: the container no longer mounts secrets/, the key stays (it decrypts the database).
    plain = no_secret(run_module("broker", base_args(prefix, tmp_path)), (*SECRETS, key))
    assert plain.changed and not plain.failed, plain.result
    assert "SecondFactor" not in plain.result["config"]["broker_properties"]
    assert key_file.read_text().strip() == key
    container = cli.containers.get(f"{prefix}-broker")
    assert "/secrets" not in {m["Destination"] for m in container.attrs["Mounts"]}

    absent = {"state": "absent", "data_dir": str(data_dir), "name_prefix": prefix}
    gone = no_secret(run_module("broker", absent), (*SECRETS, key))
    assert gone.changed and key_file.exists()
    assert any("TOTP secrets" in w for w in gone.warnings), gone.warnings
    purged = no_secret(run_module("broker", dict(absent, purge=True)), (*SECRETS, key))
    assert purged.changed and not data_dir.exists(), purged.result


def test_given_totp_key_is_written_not_returned(env) -> None:
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    args = base_args(prefix, tmp_path, second_factor={"method": "totp", "totp_key": TOTP_KEY})
    run = no_secret(run_module("broker", args, diff=True), SECRETS)
    assert run.changed and not run.failed, run.result
    assert (tmp_path / "broker" / "secrets" / "totp.key").read_text() == TOTP_KEY + "\n"
    assert not no_secret(run_module("broker", args), SECRETS).changed


def test_failed_identity_check_keeps_the_running_broker(env) -> None:
    """With directories the new image checks them first; when that fails nothing changes.

    No directory listens on 127.0.0.1:9 in the container; an image without --check-identity fails
    the check too. Either way the old container keeps running with its files.
    """
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    data_dir = tmp_path / "broker"
    plain = run_module("broker", base_args(prefix, tmp_path))
    assert plain.changed and not plain.failed, plain.result
    before = cli.containers.get(f"{prefix}-broker")
    props = (data_dir / "data" / "broker.properties").read_bytes()
    compose = (data_dir / "docker-compose.yaml").read_bytes()

    failed = no_secret(run_module("broker", base_args(prefix, tmp_path, directories=[directory()])), SECRETS)
    assert failed.failed and not failed.changed, failed.result
    assert "identity check of the new configuration" in failed.result["msg"]
    assert "left unchanged" in failed.result["msg"]
    assert failed.result["identity_check"]["exit_code"] != 0
    after = cli.containers.get(f"{prefix}-broker")
    assert after.id == before.id and after.status == "running"
    assert (data_dir / "data" / "broker.properties").read_bytes() == props
    assert (data_dir / "docker-compose.yaml").read_bytes() == compose
    assert not (data_dir / "secrets").exists() and stages(data_dir) == []
    assert [
        c.name for c in cli.containers.list(all=True, filters={"name": f"{prefix}-broker-identity"})
    ] == []

    # A first deployment whose check fails leaves no data directory behind.
    fresh = tmp_path / "fresh"
    first = no_secret(
        run_module(
            "broker",
            base_args(prefix + "x", tmp_path, data_dir=str(fresh), directories=[directory()]),
        ),
        SECRETS,
    )
    assert first.failed and "nothing was deployed" in first.result["msg"] and not fresh.exists()
    assert objects_named(cli, prefix + "x") == []


# ------------------------------------------------------------------ with the rebuilt image and real servers


def radius_address(identity) -> str:
    """The RADIUS server as a container in the directory's network namespace reaches it."""
    identity.radius.container.reload()
    return identity.radius.container.attrs["NetworkSettings"]["Networks"][identity.network]["IPAddress"]


def test_identity_check_against_the_test_directory_and_radius(env, identity) -> None:
    """The broker joins the test directory's network namespace: ldaps://127.0.0.1:636 (its
    certificate names 127.0.0.1) and the RADIUS server on their private network."""
    cli, prefix, tmp_path = env
    require_service_images(cli, "broker")
    data_dir = tmp_path / "broker"
    ldap = identity.directory
    good_directory = {
        "domain": "CORP",
        "servers": ["ldaps://127.0.0.1:636", "ldap://127.0.0.1:389"],
        "ca_cert": str(ldap.ca),
        "bind_dn": ldap.bind_dn,
        "bind_password": ldap.bind_password,
        "base_dn": ldap.people_dn,
        "group_mode": "memberof",
    }
    good_radius = {
        "method": "radius",
        "radius_servers": [radius_address(identity) + ":1812"],
        "radius_secret": identity.radius.secret,
    }
    secrets = (ldap.bind_password, identity.radius.secret)

    def args(**options) -> dict:
        options.update(network_mode=f"container:{ldap.container.name}")
        return base_args(prefix, tmp_path, **options)

    # Wrong service account password: refused before anything exists.
    wrong = no_secret(
        run_module("broker", args(directories=[dict(good_directory, bind_password="not-" + BIND_PW)])),
        (*SECRETS, *secrets),
    )
    assert wrong.failed, wrong.result
    assert f"invalid credentials for {ldap.bind_dn}" in wrong.result["msg"]
    assert not data_dir.exists() and objects_named(cli, prefix) == []

    good = no_secret(
        run_module("broker", args(directories=[good_directory], second_factor=good_radius)),
        (*SECRETS, *secrets),
    )
    assert good.changed and not good.failed, good.result
    assert good.result["identity_check"]["exit_code"] == 0
    assert all(line.startswith("ok") for line in good.result["identity_check"]["output"])
    for name in ("ldap-CORP.password", "radius.secret"):
        assert mode(data_dir / "secrets" / name) == 0o600
    assert (data_dir / "secrets" / "ldap-CORP.password").read_text() == ldap.bind_password + "\n"
    container = cli.containers.get(f"{prefix}-broker")
    again = no_secret(
        run_module("broker", args(directories=[good_directory], second_factor=good_radius)),
        (*SECRETS, *secrets),
    )
    assert not again.changed and "identity_check" not in again.result, again.result

    # Wrong shared secret: the RADIUS server does not answer; the running broker stays.
    bad_radius = dict(good_radius, radius_secret="wrong-" + RADIUS_SECRET, radius_timeout=1, radius_retries=0)
    refused = no_secret(
        run_module("broker", args(directories=[good_directory], second_factor=bad_radius)),
        (*SECRETS, *secrets),
    )
    assert refused.failed and not refused.changed, refused.result
    assert radius_address(identity) in refused.result["msg"]
    assert cli.containers.get(f"{prefix}-broker").id == container.id
    assert (data_dir / "secrets" / "radius.secret").read_text() == identity.radius.secret + "\n"
    assert stages(data_dir) == []

    # The directory removed again: its password and CA files go once the new container runs.
    removed = no_secret(run_module("broker", args(second_factor=good_radius)), (*SECRETS, *secrets))
    assert removed.changed and not removed.failed, removed.result
    assert not (data_dir / "secrets" / "ldap-CORP.password").exists()
    assert not (data_dir / "certs" / "ldap-CORP.pem").exists()
    assert str(data_dir / "secrets" / "ldap-CORP.password") in removed.result["changed_files"]
