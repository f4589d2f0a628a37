"""Enterprise identity options of the broker module (directories, second_factor) without Docker.

Parameters go through Ansible's own argument spec validation (defaults of the suboptions,
required_if, choices), then through the module's validate() and rendering. The rendered
broker.properties is read back with the services' own parser. Secrets never appear in errors,
warnings, the properties or the diff.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from gatehouse.config import parse_kv

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
broker = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.broker")
dep = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._deploy.common")
files = importlib.import_module("ansible_collections.gatehouse.access.plugins.module_utils._common.files")
objects = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects"
)
tls = importlib.import_module("tls_material")

BIND_PW = "bind-Pa55word-7d1c"
RADIUS_SECRET = "radius-shared-9f2e4b"
TOTP_KEY = base64.b64encode(bytes(range(32))).decode("ascii")
SECRETS = (BIND_PW, RADIUS_SECRET, TOTP_KEY)


def ad_directory(**overrides) -> dict:
    directory = {
        "domain": "CORP",
        "servers": ["ldaps://dc1.corp.example:636", "ldap://dc2.corp.example"],
        "bind_dn": "CN=svc-gatehouse,OU=Service Accounts,DC=corp,DC=example",
        "bind_password": BIND_PW,
        "base_dn": "OU=Staff,DC=corp,DC=example",
        "user_attribute": "sAMAccountName",
        "user_filter": "(!(userAccountControl:1.2.840.113556.1.4.803:=2))",
        "group_mode": "ad-nested",
        "group_base_dn": "OU=Groups,DC=corp,DC=example",
    }
    directory.update(overrides)
    return directory


spec_check = importlib.import_module("collection_helpers").broker_spec_check
params = importlib.import_module("collection_helpers").broker_params


def errors_of(p: dict) -> list[str]:
    with pytest.raises(dep.ValidationError) as info:
        broker.validate(p)
    for error in info.value.errors:
        for secret in SECRETS:
            assert secret not in error
    return info.value.errors


def properties(p: dict) -> dict[str, str]:
    return parse_kv(broker.broker_properties(p).decode("utf-8"))


# ------------------------------------------------------------------ argument spec


def test_secrets_are_no_log_and_constraints_in_the_spec() -> None:
    directory = broker.ARGUMENT_SPEC["directories"]
    assert directory["options"]["bind_password"]["no_log"] is True
    assert directory["options"]["group_mode"]["choices"] == ["ad-nested", "memberof", "search"]
    factor = broker.ARGUMENT_SPEC["second_factor"]
    assert factor["options"]["totp_key"]["no_log"] is True
    assert factor["options"]["radius_secret"]["no_log"] is True
    assert factor["options"]["method"]["choices"] == ["none", "totp", "radius"]
    # Ansible collects every no_log value, also inside list elements, and masks it in any output.
    result = spec_check(
        directories=[ad_directory()],
        second_factor={"method": "radius", "radius_servers": ["10.0.0.5"], "radius_secret": RADIUS_SECRET},
    )
    assert {BIND_PW, RADIUS_SECRET} <= set(result._no_log_values)


def test_radius_needs_servers_and_secret_in_the_spec() -> None:
    result = spec_check(second_factor={"method": "radius", "radius_servers": ["10.0.0.5"]})
    assert any("radius_secret" in e for e in result.error_messages)
    result = spec_check(directories=[ad_directory(group_mode="nested")])
    assert any("group_mode" in e for e in result.error_messages)
    missing = ad_directory()
    del missing["bind_password"]
    assert any("bind_password" in e for e in spec_check(directories=[missing]).error_messages)


# ------------------------------------------------------------------ rendering


def test_no_identity_renders_no_identity_key() -> None:
    """A broker without the new options keeps its broker.properties (and container) as before."""
    p = params()
    props = properties(p)
    assert not [k for k in props if k.startswith(("Domain.", "SecondFactor", "Totp", "Radius"))]
    assert broker.uses_secrets(p) is False and broker.needs_identity_check(p) is False
    assert [m["target"] for m in broker.container_spec(p, "gatehouse/broker:0.1.0", "b1")["mounts"]] == [
        "/data",
        "/certs",
    ]


def test_active_directory_with_radius_first_renders_the_contract_keys() -> None:
    p = params(
        directories=[ad_directory(ca_cert="/etc/gatehouse/tls/corp-root-ca.pem", timeout=7, pool_size=8)],
        second_factor={
            "method": "radius",
            "first": True,
            "domains": ["CORP"],
            "radius_servers": ["10.0.0.5:1812", "radius2.corp.example", "[fd00::5]:1645"],
            "radius_secret": RADIUS_SECRET,
            "radius_nas_identifier": "gatehouse-broker1",
        },
    )
    warnings = broker.validate(p)
    assert len(warnings) == 1 and warnings[0].startswith("client_tls_verify=false")
    props = properties(p)
    expected = {
        "Domains": "CORP,LAB",
        "Domain.CORP.Source": "ldap",
        "Domain.CORP.LdapServers": "ldaps://dc1.corp.example:636,ldap://dc2.corp.example",
        "Domain.CORP.LdapAllowPlain": "false",
        "Domain.CORP.LdapCaCert": "/certs/ldap-CORP.pem",
        "Domain.CORP.LdapBindDn": "CN=svc-gatehouse,OU=Service Accounts,DC=corp,DC=example",
        "Domain.CORP.LdapBindPasswordFile": "/secrets/ldap-CORP.password",
        "Domain.CORP.LdapBaseDn": "OU=Staff,DC=corp,DC=example",
        "Domain.CORP.LdapUserAttribute": "sAMAccountName",
        "Domain.CORP.LdapUserFilter": "(!(userAccountControl:1.2.840.113556.1.4.803:=2))",
        "Domain.CORP.LdapGroupMode": "ad-nested",
        "Domain.CORP.LdapGroupBaseDn": "OU=Groups,DC=corp,DC=example",
        "Domain.CORP.LdapTimeout": "7",
        "Domain.CORP.LdapPoolSize": "8",
        "SecondFactor": "radius",
        "SecondFactorFirst": "true",
        "SecondFactorDomains": "CORP",
        "RadiusServers": "10.0.0.5:1812,radius2.corp.example,[fd00::5]:1645",
        "RadiusSecretFile": "/secrets/radius.secret",
        "RadiusTimeout": "3",
        "RadiusRetries": "1",
        "RadiusNasIdentifier": "gatehouse-broker1",
    }
    assert {k: props.get(k) for k in expected} == expected
    # LAB has no directory: no key at all (its source stays local), and no TOTP keys with RADIUS.
    assert not [k for k in props if k.startswith(("Domain.LAB.", "Totp"))]
    text = broker.broker_properties(p).decode()
    assert BIND_PW not in text and RADIUS_SECRET not in text
    mounts = broker.container_spec(p, "gatehouse/broker:0.1.0", "b1")["mounts"]
    assert mounts[-1] == {"source": "/opt/gatehouse/broker/secrets", "target": "/secrets", "read_only": True}
    assert broker.needs_identity_check(p)


def test_openldap_defaults_and_totp() -> None:
    p = params(
        domains=["LAB"],
        directories=[
            {
                "domain": "LAB",
                "servers": ["ldap://ldap.lab.example"],
                "bind_dn": "cn=gatehouse,ou=services,dc=lab,dc=example",
                "bind_password": BIND_PW,
                "base_dn": "ou=people,dc=lab,dc=example",
            }
        ],
        second_factor={"method": "totp"},
    )
    assert broker.validate(p)  # only the client_tls_verify warning
    props = properties(p)
    assert props["Domain.LAB.LdapUserAttribute"] == "uid"
    assert props["Domain.LAB.LdapGroupMode"] == "memberof"
    assert props["Domain.LAB.LdapUserFilter"] == "(objectClass=*)"
    assert props["Domain.LAB.LdapGroupBaseDn"] == "ou=people,dc=lab,dc=example"
    assert props["Domain.LAB.LdapCaCert"] == ""
    assert props["Domain.LAB.LdapTimeout"] == "5" and props["Domain.LAB.LdapPoolSize"] == "4"
    assert props["SecondFactor"] == "totp" and props["SecondFactorFirst"] == "false"
    assert props["TotpKeyFile"] == "/secrets/totp.key" and props["TotpIssuer"] == "Gatehouse"
    assert "SecondFactorDomains" not in props and not [k for k in props if k.startswith("Radius")]
    # TOTP alone has nothing to check against a server.
    p = params(second_factor={"method": "totp"})
    assert broker.uses_secrets(p) and not broker.needs_identity_check(p)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("directory", "needle"),
    [
        ({"domain": "SALES"}, "SALES is not one of domains (CORP, LAB)"),
        ({"domain": "corp"}, "write the domain as in domains (CORP)"),
        ({"servers": ["http://dc1.corp.example"]}, "must be ldaps://host[:636] (LDAPS) or ldap://host[:389]"),
        ({"servers": ["ldapi:///var/run/slapd"]}, "not ldapi://"),
        ({"servers": ["dc1.corp.example"]}, "not <no scheme>://"),
        ({"servers": ["ldaps://dc1.corp.example/dc=corp"]}, "must not have a path"),
        ({"servers": ["ldaps://svc:pw@dc1.corp.example"]}, "must not carry credentials"),
        ({"servers": ["ldaps://dc1.corp.example:0"]}, "has port 0"),
        ({"servers": ["ldaps://dc1.corp.example:99999"]}, "is not a valid URL"),
        ({"servers": ["ldaps://bad_host.example"]}, "has no valid host"),
        ({"servers": []}, "servers needs at least one"),
        ({"servers": ["ldaps://a.example", "ldaps://a.example"]}, "lists a server twice"),
        ({"allow_plain": True, "servers": ["ldaps://dc1.corp.example"]}, "allow_plain only concerns ldap://"),
        ({"base_dn": "corp.example"}, "is not a distinguished name"),
        ({"base_dn": " OU=Staff,DC=corp"}, "leading or trailing spaces"),
        ({"base_dn": '"DC=corp"'}, "must not be wrapped in quotes"),
        ({"bind_dn": "svc-gatehouse"}, "neither a distinguished name nor a user principal name"),
        ({"bind_password": "two\nlines"}, "bind_password must not contain line breaks"),
        ({"bind_password": ""}, "bind_password must not be empty"),
        ({"user_attribute": "sAMAccount Name"}, "is not an attribute name"),
        ({"user_filter": "objectClass=person"}, "is not one LDAP filter in parentheses"),
        ({"user_filter": "(a=b))("}, "is not one LDAP filter in parentheses"),
        ({"group_base_dn": "groups"}, "group_base_dn 'groups' is not a distinguished name"),
        ({"timeout": 0}, "timeout must be between 1 and 300"),
        ({"pool_size": 100}, "pool_size must be between 1 and 64"),
    ],
)
def test_bad_directory_is_refused(directory: dict, needle: str) -> None:
    errors = errors_of(params(directories=[ad_directory(**directory)]))
    assert any(needle in e for e in errors), errors


def test_a_domain_has_one_directory() -> None:
    errors = errors_of(params(directories=[ad_directory(), ad_directory()]))
    assert any("domain CORP has a second directory" in e for e in errors)


def test_plain_ldap_is_explicit_and_warned() -> None:
    p = params(client_tls_verify=True, client_ca_cert="/ca.pem", directories=[ad_directory(allow_plain=True)])
    warnings = broker.validate(p)
    assert len(warnings) == 1 and "allow_plain=true" in warnings[0] and "clear text" in warnings[0]
    assert properties(p)["Domain.CORP.LdapAllowPlain"] == "true"
    # ldap:// alone is StartTLS: valid without allow_plain and without a warning.
    p = params(client_tls_verify=True, client_ca_cert="/ca.pem", directories=[ad_directory()])
    assert broker.validate(p) == []


@pytest.mark.parametrize(
    ("factor", "needle"),
    [
        ({"method": "totp", "totp_key": "c2hvcnQ="}, "totp_key must be the base64 of 32 random bytes"),
        (
            {"method": "totp", "totp_key": "not base64 at all!"},
            "totp_key must be the base64 of 32 random bytes",
        ),
        ({"method": "totp", "radius_secret": RADIUS_SECRET}, "radius_secret do not apply with method totp"),
        ({"method": "totp", "totp_issuer": "Corp:VDI"}, "at most 64 characters without ':'"),
        ({"method": "totp", "totp_issuer": "x" * 65}, "at most 64 characters without ':'"),
        ({"method": "totp", "domains": ["SALES"]}, "second_factor.domains: SALES is not one of domains"),
        ({"method": "totp", "domains": []}, "second_factor.domains is empty"),
        (
            {
                "method": "radius",
                "radius_servers": ["10.0.0.5"],
                "radius_secret": RADIUS_SECRET,
                "totp_key": TOTP_KEY,
            },
            "totp_key do not apply with method radius",
        ),
        (
            {"method": "radius", "radius_servers": [], "radius_secret": RADIUS_SECRET},
            "needs at least one server",
        ),
        (
            {"method": "radius", "radius_servers": ["10.0.0.5:0"], "radius_secret": RADIUS_SECRET},
            "invalid port",
        ),
        (
            {"method": "radius", "radius_servers": ["bad host"], "radius_secret": RADIUS_SECRET},
            "no valid host",
        ),
        (
            {"method": "radius", "radius_servers": ["[10.0.0.5]:1812"], "radius_secret": RADIUS_SECRET},
            "not an IPv6",
        ),
        (
            {"method": "radius", "radius_servers": ["fd00::5::1"], "radius_secret": RADIUS_SECRET},
            "nor an IPv6",
        ),
        (
            {"method": "radius", "radius_servers": ["10.0.0.5"], "radius_secret": "a\nb"},
            "must not contain line",
        ),
        (
            {
                "method": "radius",
                "radius_servers": ["10.0.0.5"],
                "radius_secret": RADIUS_SECRET,
                "radius_timeout": 0,
            },
            "radius_timeout must be between 1 and 60",
        ),
        (
            {
                "method": "radius",
                "radius_servers": ["10.0.0.5"],
                "radius_secret": RADIUS_SECRET,
                "radius_retries": 11,
            },
            "radius_retries must be between 0 and 10",
        ),
        (
            {"method": "none", "first": True, "radius_secret": RADIUS_SECRET},
            "radius_secret, first only apply",
        ),
    ],
)
def test_bad_second_factor_is_refused(factor: dict, needle: str) -> None:
    errors = errors_of(params(second_factor=factor))
    assert any(needle in e for e in errors), errors


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of(
        params(
            directories=[ad_directory(domain="SALES", servers=["http://x.example"], timeout=0)],
            second_factor={"method": "totp", "totp_key": "short"},
        )
    )
    assert len(errors) == 4, errors


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("10.0.0.5", ("10.0.0.5", 1812)),
        ("10.0.0.5:1645", ("10.0.0.5", 1645)),
        ("radius.corp.example", ("radius.corp.example", 1812)),
        ("radius1:1812", ("radius1", 1812)),
        ("fd00::5", ("fd00::5", 1812)),
        ("[fd00::5]", ("fd00::5", 1812)),
        ("[fd00::5]:1645", ("fd00::5", 1645)),
    ],
)
def test_radius_server_forms(text: str, parsed: tuple) -> None:
    assert broker.parse_radius_server(text) == parsed


def test_totp_key_form() -> None:
    assert broker.totp_key_valid(TOTP_KEY)
    assert broker.totp_key_valid(TOTP_KEY + "\n")
    assert not broker.totp_key_valid(base64.b64encode(bytes(31)).decode())
    assert not broker.totp_key_valid(base64.b64encode(bytes(33)).decode())
    assert not broker.totp_key_valid(TOTP_KEY[:-2] + "!!")


# ------------------------------------------------------------------ files


def planned(p: dict, data_dir: Path) -> tuple[list, list[str], list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    result, generated = broker.identity_files(
        p, str(data_dir / "certs"), str(data_dir / "secrets"), None, None, errors, warnings
    )
    return result, generated, errors, warnings


def apply(planned_files) -> None:
    for f in planned_files:
        os.makedirs(os.path.dirname(f.path), exist_ok=True)
        if f.changed:
            f.apply()


def test_secret_files_are_0600_and_never_shown(tmp_path: Path) -> None:
    ca = tls.write(tmp_path / "corp-ca.pem", tls.pem(tls.Chain().root))
    p = params(
        directories=[ad_directory(ca_cert=str(ca))],
        second_factor={"method": "radius", "radius_servers": ["10.0.0.5"], "radius_secret": RADIUS_SECRET},
    )
    data_dir = tmp_path / "broker"
    result, generated, errors, _warnings = planned(p, data_dir)
    assert errors == [] and generated == []
    by_name = {os.path.basename(f.path): f for f in result}
    assert set(by_name) == {"ldap-CORP.pem", "ldap-CORP.password", "radius.secret"}
    assert by_name["ldap-CORP.password"].data == (BIND_PW + "\n").encode()
    assert by_name["radius.secret"].data == (RADIUS_SECRET + "\n").encode()
    diffs = json.dumps([f.diff() for f in result])
    for secret in SECRETS:
        assert secret not in diffs
    # Not even a hash of a password: it could be guessed offline.
    assert files.sha256(by_name["ldap-CORP.password"].data) not in diffs
    assert "<secret, not shown (changed)>" in diffs
    apply(result)
    for name in ("ldap-CORP.password", "radius.secret"):
        assert stat.S_IMODE((data_dir / "secrets" / name).stat().st_mode) == 0o600
    assert (data_dir / "certs" / "ldap-CORP.pem").read_bytes() == ca.read_bytes()
    again, _generated, _errors, _warnings = planned(p, data_dir)
    assert not any(f.changed for f in again)
    # A new password: changed, and still not shown.
    p["directories"][0]["bind_password"] = BIND_PW + "-new"
    changed = [f for f in planned(p, data_dir)[0] if f.changed]
    assert [os.path.basename(f.path) for f in changed] == ["ldap-CORP.password"]
    assert changed[0].diff()["before"] == files.SECRET_TEXT
    assert changed[0].diff()["after"] == files.SECRET_CHANGED_TEXT


def test_missing_directory_ca_is_an_error(tmp_path: Path) -> None:
    p = params(directories=[ad_directory(ca_cert=str(tmp_path / "missing.pem"))])
    _result, _generated, errors, _warnings = planned(p, tmp_path / "broker")
    assert any("ca_cert" in e and "does not exist" in e for e in errors)


def test_totp_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    p = params(second_factor={"method": "totp"})
    data_dir = tmp_path / "broker"
    first, generated, errors, _warnings = planned(p, data_dir)
    assert errors == [] and len(generated) == 1 and broker.totp_key_valid(generated[0])
    assert first[0].data == (generated[0] + "\n").encode() and first[0].secret
    apply(first)
    key_file = data_dir / "secrets" / "totp.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second, generated_again, _errors, _warnings = planned(p, data_dir)
    assert generated_again == [] and not second[0].changed
    assert key_file.read_text() == generated[0] + "\n"


def test_given_totp_key_replaces_the_file_with_a_warning(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"
    apply(planned(params(second_factor={"method": "totp"}), data_dir)[0])
    result, generated, _errors, warnings = planned(
        params(second_factor={"method": "totp", "totp_key": TOTP_KEY}), data_dir
    )
    assert generated == [] and result[0].changed and result[0].data == (TOTP_KEY + "\n").encode()
    assert any("can no longer be decrypted" in w for w in warnings)
    assert TOTP_KEY not in json.dumps(warnings) + json.dumps(result[0].diff())


def test_a_broken_totp_key_file_is_not_replaced_silently(tmp_path: Path) -> None:
    secrets = tmp_path / "broker" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "totp.key").write_text("garbage\n")
    _result, generated, errors, _warnings = planned(
        params(second_factor={"method": "totp"}), tmp_path / "broker"
    )
    assert generated == [] and any("is not the base64 of 32 bytes" in e for e in errors)


def test_stale_identity_files(tmp_path: Path) -> None:
    certs, secrets = tmp_path / "certs", tmp_path / "secrets"
    certs.mkdir()
    secrets.mkdir()
    for path in (
        certs / "ldap-OLD.pem",
        certs / "cert.pem",
        secrets / "ldap-OLD.password",
        secrets / "radius.secret",
    ):
        path.write_text("x")
    (secrets / "totp.key").write_text(TOTP_KEY)
    keep = files.PlannedFile(str(secrets / "radius.secret"), b"x", 0o600)
    stale = broker.stale_identity_files(str(certs), str(secrets), [keep], False)
    assert stale == [str(certs / "ldap-OLD.pem"), str(secrets / "ldap-OLD.password")]
    # The TOTP key belongs to the database: only purge removes it.
    assert str(secrets / "totp.key") in broker.stale_identity_files(str(certs), str(secrets), [], True)


def test_check_output_is_scrubbed_and_bounded() -> None:
    p = params(
        directories=[ad_directory(servers=["ldaps://a.example", "ldaps://b.example"], timeout=10)],
        second_factor={
            "method": "radius",
            "radius_servers": ["10.0.0.5", "10.0.0.6"],
            "radius_secret": RADIUS_SECRET,
            "radius_timeout": 4,
            "radius_retries": 2,
        },
    )
    secrets = broker.secret_values(p, ("generated-key-value",))
    assert set(secrets) >= {BIND_PW, RADIUS_SECRET, "generated-key-value", p["admin_token"]}
    text = f"bind failed for {p['directories'][0]['bind_dn']} with {BIND_PW}; radius {RADIUS_SECRET}"
    scrubbed = broker.scrub(text, secrets)
    assert BIND_PW not in scrubbed and RADIUS_SECRET not in scrubbed and "CN=svc-gatehouse" in scrubbed
    assert broker.check_timeout(p) == 30 + 2 * 10 * 2 + 4 * 3 * 2


# ------------------------------------------------------------------ object modules


def test_user_and_entitlement_specs() -> None:
    assert objects.USER_ARGSPEC["totp"] == {
        "type": "str",
        "choices": ["enrolled", "absent", "ignore"],
        "default": "ignore",
    }
    assert objects.USER_ARGSPEC["totp_reset"] == {"type": "bool", "default": False}
    assert "directory-group" in objects.ENTITLEMENT_ARGSPEC["principal_type"]["choices"]
    with pytest.raises(objects.BrokerApiError, match="totp_reset is only used with totp=enrolled"):
        objects.check_totp_options({"totp": "ignore", "totp_reset": True, "state": "present"})
    with pytest.raises(objects.BrokerApiError, match="totp=enrolled needs state=present"):
        objects.check_totp_options({"totp": "enrolled", "totp_reset": False, "state": "absent"})
