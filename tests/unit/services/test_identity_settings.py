"""broker.properties: the Domain.<D>.*, SecondFactor*, Totp* and Radius* keys and their errors."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from gatehouse.broker.settings import BrokerSettings, LdapServer
from gatehouse.config import Config, ConfigError

BIND_PW = "bind-Secret-4471"
RADIUS_SECRET = "radius-Shared-9931"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {
        "bind": tmp_path / "ldap.password",
        "ca": tmp_path / "ca.pem",
        "totp": tmp_path / "totp.key",
        "radius": tmp_path / "radius.secret",
        "empty": tmp_path / "empty",
    }
    paths["bind"].write_text(BIND_PW + "\nignored second line\n")
    paths["ca"].write_text("-----BEGIN CERTIFICATE-----\n")
    paths["totp"].write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    paths["radius"].write_text(RADIUS_SECRET + "\n")
    paths["empty"].write_text("\n")
    return {k: str(v) for k, v in paths.items()}


def settings(values: dict[str, str]) -> BrokerSettings:
    base = {"AdminToken": "admin-token-0123456789", "ClientCaCert": "/certs/ca.pem", "Domains": "CORP, LAB"}
    return BrokerSettings.from_config(Config({**base, **values}, {}))


def ldap(files: dict[str, str], **extra: str) -> dict[str, str]:
    values = {
        "Domain.CORP.Source": "ldap",
        "Domain.CORP.LdapServers": "ldaps://dc1.corp.example:636, ldap://dc2.corp.example",
        "Domain.CORP.LdapCaCert": files["ca"],
        "Domain.CORP.LdapBindDn": "cn=svc,dc=corp,dc=example",
        "Domain.CORP.LdapBindPasswordFile": files["bind"],
        "Domain.CORP.LdapBaseDn": "ou=people,dc=corp,dc=example",
    }
    values.update({f"Domain.CORP.{k}": v for k, v in extra.items()})
    return values


def test_sources_default_to_local_and_no_factor() -> None:
    s = settings({})
    assert s.source("CORP") == s.source("LAB") == "local"
    assert s.directories == {} and not s.factor.enabled
    assert s.factor.domains == ("CORP", "LAB")


def test_an_ldap_domain_is_read_with_its_defaults_and_the_password_file(files: dict[str, str]) -> None:
    s = settings(ldap(files))
    d = s.directories["CORP"]
    assert s.source("CORP") == "ldap" and s.source("LAB") == "local"
    assert d.servers == (
        LdapServer("ldaps", "dc1.corp.example", 636),
        LdapServer("ldap", "dc2.corp.example", 389),
    )
    assert d.bind_password == BIND_PW  # the first line only
    assert (d.user_attribute, d.user_filter, d.group_mode) == ("uid", "(objectClass=*)", "memberof")
    assert d.group_base_dn == d.base_dn and (d.timeout, d.pool_size) == (5, 4)
    assert not d.allow_plain and d.plain_servers == []
    assert BIND_PW not in repr(s) and BIND_PW not in repr(d)
    assert BIND_PW in s.secrets()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"LdapServers": ""}, "Domain.CORP.LdapServers is required"),
        (
            {"LdapServers": "http://dc1"},
            r"Domain.CORP.LdapServers: 'http://dc1' is not an ldap:// or ldaps:// URL",
        ),
        ({"LdapServers": "ldaps://dc1/ou=x"}, "must be scheme://host"),
        ({"LdapBaseDn": ""}, "Domain.CORP.LdapBaseDn is required"),
        ({"LdapBindDn": ""}, "Domain.CORP.LdapBindDn is required"),
        (
            {"LdapBindPasswordFile": "/nonexistent/pw"},
            "Domain.CORP.LdapBindPasswordFile: /nonexistent/pw does not exist",
        ),
        (
            {"LdapCaCert": "/nonexistent/ca.pem"},
            "Domain.CORP.LdapCaCert: /nonexistent/ca.pem is not a readable file",
        ),
        ({"LdapGroupMode": "nested"}, "Domain.CORP.LdapGroupMode must be one of ad-nested, memberof, search"),
        ({"LdapUserAttribute": "uid)(x"}, "Domain.CORP.LdapUserAttribute"),
        ({"LdapUserFilter": "objectClass=person"}, "Domain.CORP.LdapUserFilter"),
        ({"LdapUserFilter": "(&(a=b)"}, "Domain.CORP.LdapUserFilter"),
        ({"LdapTimeout": "0"}, "Domain.CORP.LdapTimeout must be at least 1"),
        ({"Source": "kerberos"}, "Domain.CORP.Source must be local or ldap"),
    ],
)
def test_ldap_errors_name_the_key(files: dict[str, str], extra: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        settings(ldap(files, **extra))
    assert BIND_PW not in str(err.value)


def test_an_empty_password_file_is_refused(files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"LdapBindPasswordFile: .*empty is empty"):
        settings(ldap(files, LdapBindPasswordFile=files["empty"]))


def test_plain_ldap_only_when_allowed(files: dict[str, str]) -> None:
    s = settings(ldap(files, LdapAllowPlain="true", LdapServers="ldap://10.0.0.7:3389"))
    d = s.directories["CORP"]
    assert d.allow_plain and [x.url for x in d.plain_servers] == ["ldap://10.0.0.7:3389"]
    assert settings(ldap(files)).directories["CORP"].plain_servers == []  # ldap:// is StartTLS


def test_totp_needs_a_32_byte_key(files: dict[str, str], tmp_path: Path) -> None:
    s = settings({"SecondFactor": "totp", "TotpKeyFile": files["totp"], "SecondFactorDomains": "corp"})
    assert s.factor.kind == "totp" and len(s.factor.totp_key) == 32 and s.factor.totp_issuer == "Gatehouse"
    assert s.factor.domains == ("CORP",) and s.factor.applies("CORP") and not s.factor.applies("LAB")
    assert s.factor.totp_key not in repr(s).encode()
    with pytest.raises(ConfigError, match="TotpKeyFile is required when SecondFactor is totp"):
        settings({"SecondFactor": "totp"})
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(os.urandom(16)).decode())
    with pytest.raises(ConfigError, match="must hold base64 of 32 random bytes, got 16"):
        settings({"SecondFactor": "totp", "TotpKeyFile": str(short)})
    short.write_text("not base64 at all!")
    with pytest.raises(ConfigError, match="does not hold base64 text"):
        settings({"SecondFactor": "totp", "TotpKeyFile": str(short)})
    with pytest.raises(ConfigError, match="SecondFactorDomains: 'OPS' is not one of Domains"):
        settings({"SecondFactor": "totp", "TotpKeyFile": files["totp"], "SecondFactorDomains": "OPS"})
    with pytest.raises(ConfigError, match="SecondFactor must be one of none, totp, radius"):
        settings({"SecondFactor": "sms"})


def test_radius_servers_secret_and_defaults(files: dict[str, str]) -> None:
    s = settings(
        {
            "SecondFactor": "radius",
            "RadiusServers": "10.0.0.5:1645, radius2.example, [2001:db8::7]:1812",
            "RadiusSecretFile": files["radius"],
            "Hostname": "broker1",
        }
    )
    f = s.factor
    assert f.radius_servers == (("10.0.0.5", 1645), ("radius2.example", 1812), ("2001:db8::7", 1812))
    assert f.radius_secret == RADIUS_SECRET.encode() and f.radius_nas_identifier == "broker1"
    assert (f.radius_timeout, f.radius_retries) == (3.0, 1)
    assert RADIUS_SECRET not in repr(s)
    for bad, message in [
        ({"RadiusServers": ""}, "RadiusServers is required"),
        ({"RadiusServers": "radius:99999"}, "RadiusServers: 'radius:99999' has no valid port"),
        ({"RadiusServers": "bad host!"}, "is not host"),
        ({"RadiusSecretFile": files["empty"]}, "RadiusSecretFile: .* is empty"),
    ]:
        values = {"SecondFactor": "radius", "RadiusServers": "r1", "RadiusSecretFile": files["radius"], **bad}
        with pytest.raises(ConfigError, match=message):
            settings(values)
