# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the broker module: deploy, configure and remove a connection broker.

The broker keeps its SQLite database in ``data/broker.db``; it survives upgrades and
``state=absent`` unless ``purge`` is set. With ``database_url`` it keeps its state in PostgreSQL
instead (``Database`` is that libpq URL, never with a password in it): the password
(``database_password``) is a 0600 file in ``secrets/`` named by ``DatabasePasswordFile``, and
``database_ca_cert`` is copied to ``certs/database-ca.pem`` and named by the URL's
``sslrootcert``. Without ``database_url`` nothing of this is rendered: broker.properties stays
byte for byte what it was before these options, so an upgrade does not recreate the container. The admin token comes in as a (no_log) option and is
written to ``data/broker.env`` (0600), which the broker reads with ``--env-file``. Connection
managers and agents authenticate with their certificates from the deployment CA
(``client_ca_cert``, copied to ``certs/client-ca.pem``), not with a token.

Enterprise identity: ``directories`` makes domains log in against LDAP/Active Directory and
``second_factor`` adds TOTP or RADIUS. Their secrets (bind passwords, the RADIUS shared secret,
the TOTP key) are files of mode 0600 in ``secrets/``, mounted read-only at ``/secrets``; the
properties name only their paths. The TOTP key encrypts the enrolled TOTP secrets in the
database, so, like the database, it is generated once, kept across runs and deleted only by
``purge``. Before a container with directories or RADIUS is created or replaced, the new image
checks the new configuration (``--check-identity``) against the real servers; the files are
staged for that check, so a failing check leaves the running broker and its files untouched.
"""

from __future__ import annotations

import base64
import binascii
import glob
import os
import re
import shutil
import tempfile
from urllib.parse import parse_qsl, unquote, urlsplit

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    MASK,
    SECRET_TEXT,
    PlannedDir,
    PlannedFile,
    mask_env_values,
    read_bytes,
    write_atomic,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

TOKEN_KEYS = {"GATEHOUSE_ADMINTOKEN"}
# The broker's management listener (/health, /metrics), inside its container (its settings' admin_port).
ADMIN_PORT = 9181
CLIENT_CA = "client-ca.pem"
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ATTRIBUTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

# Enterprise identity (the broker's Domain.<D>.Ldap*, SecondFactor, Totp* and Radius* keys).
LDAP_PORTS = {"ldaps": 636, "ldap": 389}
RADIUS_PORT = 1812
GROUP_MODES = ["ad-nested", "memberof", "search"]
SECOND_FACTORS = ["none", "totp", "radius"]
SECRETS = "secrets"
TOTP_KEY = "totp.key"
TOTP_KEY_BYTES = 32
RADIUS_SECRET = "radius.secret"  # noqa: S105 - a file name
DATABASE_PASSWORD = "database.password"  # noqa: S105 - a file name
DATABASE_CA = "database-ca.pem"
DATABASE_SCHEMES = ("postgresql", "postgres")
POSTGRES_PORT = 5432
# sslmode values that verify the server's certificate against database_ca_cert.
VERIFYING_SSLMODES = ("verify-full", "verify-ca")
CHECK_IDENTITY = "--check-identity"
STAGE_PREFIX = ".identity-check-"

DIRECTORY_SPEC = dict(
    domain=dict(type="str", required=True),
    servers=dict(type="list", elements="str", required=True),
    ca_cert=dict(type="path"),
    bind_dn=dict(type="str", required=True),
    bind_password=dict(type="str", required=True, no_log=True),
    base_dn=dict(type="str", required=True),
    user_attribute=dict(type="str", default="uid"),
    user_filter=dict(type="str"),
    group_mode=dict(type="str", choices=GROUP_MODES, default="memberof"),
    group_base_dn=dict(type="str"),
    allow_plain=dict(type="bool", default=False),
    timeout=dict(type="int", default=5),
    pool_size=dict(type="int", default=4),
)
SECOND_FACTOR_SPEC = dict(
    method=dict(type="str", choices=SECOND_FACTORS, default="none"),
    first=dict(type="bool", default=False),
    domains=dict(type="list", elements="str"),
    totp_key=dict(type="str", no_log=True),
    totp_issuer=dict(type="str", default="Gatehouse"),
    radius_servers=dict(type="list", elements="str"),
    radius_secret=dict(type="str", no_log=True),
    radius_timeout=dict(type="int", default=3),
    radius_retries=dict(type="int", default=1),
    radius_nas_identifier=dict(type="str"),
)
# Options of second_factor that only one method uses (those without a default, so that setting
# them for another method can be told apart and refused).
_TOTP_ONLY = ("totp_key",)
_RADIUS_ONLY = ("radius_servers", "radius_secret", "radius_nas_identifier")

ARGUMENT_SPEC: dict = dict(
    dep.COMMON_ARGUMENT_SPEC,
    admin_token={"type": "str", "no_log": True},
    client_ca_cert={"type": "path"},
    client_tls_verify={"type": "bool", "default": True},
    domains={"type": "list", "elements": "str", "default": ["CORP"]},
    data_dir={"type": "path", "default": "/opt/gatehouse/broker"},
    https_port={"type": "int", "default": 443},
    admin_address={"type": "str"},
    admin_host_port={"type": "int", "default": 0},
    purge={"type": "bool", "default": False},
    database_url={"type": "str"},
    database_password={"type": "str", "no_log": True},
    database_ca_cert={"type": "path"},
    directories={"type": "list", "elements": "dict", "options": DIRECTORY_SPEC, "default": []},
    second_factor={
        "type": "dict",
        "options": SECOND_FACTOR_SPEC,
        "required_if": [("method", "radius", ("radius_servers", "radius_secret"))],
    },
)
REQUIRED_IF = [*dep.COMMON_REQUIRED_IF, ("state", "present", ["admin_token"])]
DATA_MOUNT = "/data"  # data/ in the container: the database, broker.properties, broker.env
DATABASE = "broker.db"
# The database and SQLite's journal files beside it.
DB_FILES = (DATABASE, DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal")


def container_name(name_prefix: str) -> str:
    return "%s-broker" % name_prefix


def validate(params: dict) -> list[str]:
    """Check every option; returns the warnings or raises dep.ValidationError listing all problems."""
    errors: list[str] = []
    warnings: list[str] = []
    dep.check_common(params, errors)
    if params["state"] == "present":
        dep.check_token(params["admin_token"], "admin_token", errors)
        if params["client_tls_verify"] and not params["client_ca_cert"]:
            errors.append(
                "client_ca_cert is required with client_tls_verify=true: give the CA that issued the connection "
                "managers' and agents' certificates (the deployment CA), or set client_tls_verify=false "
                "(tests only)"
            )
        if not params["client_tls_verify"]:
            warnings.append(
                "client_tls_verify=false: the broker does not check the certificates of connection managers "
                "and agents; anyone who reaches its port can send load reports and use the broker protocol"
            )
        if not params["domains"]:
            errors.append("domains needs at least one domain (the first one is the default)")
        for domain in params["domains"]:
            if not _DOMAIN_RE.match(domain):
                errors.append("domain %r may only hold letters, digits, '.', '_' and '-'" % domain)
        if len(set(d.upper() for d in params["domains"])) != len(params["domains"]):
            errors.append("domains lists a domain twice")
        dep.port_option(params["https_port"], "https_port", errors)
        if params["admin_address"] is not None and dep.parse_ip(params["admin_address"].strip()) is None:
            errors.append(
                "admin_address %r must be an IP address (0.0.0.0 = every address of the container or host)"
                % params["admin_address"]
            )
        if params["admin_host_port"]:
            dep.port_option(params["admin_host_port"], "admin_host_port", errors)
            if params["network_mode"] != "bridge":
                errors.append(
                    "admin_host_port is only used with network_mode=bridge (otherwise the listener is on the "
                    "host or container network already: set admin_address)"
                )
            elif params["admin_host_port"] == params["https_port"]:
                errors.append(
                    "admin_host_port %d is https_port as well; choose another" % params["https_port"]
                )
        if params["domains"]:
            validate_directories(params, errors, warnings)
            validate_second_factor(params, errors)
        validate_database(params, errors)
    if params["purge"] and params["state"] != "absent":
        errors.append("purge is only used with state=absent (it deletes the broker database)")
    if errors:
        raise dep.ValidationError(errors)
    return warnings


# ------------------------------------------------------------------ database


def uses_postgresql(params: dict) -> bool:
    return bool(params.get("database_url"))


def url_passwords(url: str | None) -> list[str]:
    """Passwords a (wrong) database_url carries, to be masked wherever the URL would be shown."""
    if not url or "://" not in url:
        return []
    rest = url.split("://", 1)[1]
    found = []
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo = authority.rpartition("@")[0] if "@" in authority else ""
    if ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    query = rest.split("?", 1)[1] if "?" in rest else ""
    found += [v for k, v in parse_qsl(query.split("#", 1)[0], keep_blank_values=True) if k == "password"]
    found = [v for v in found if v]
    return found + [unquote(v) for v in found if unquote(v) != v]


def parse_database_url(url: str) -> dict:
    """The parts of a libpq ``postgresql://`` URL: {user, hosts: [(host, port)], dbname, query: dict}.

    ValueError says what is wrong without repeating the URL (it may hold a password). Checked:
    the scheme, at least one valid host (and port), a database name, no password anywhere, no
    fragment and no character the properties file cannot carry.
    """
    if _CONTROL_RE.search(url) or url != url.strip() or " " in url:
        raise ValueError("must not contain spaces, line breaks or other control characters")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in DATABASE_SCHEMES:
        raise ValueError(
            "must be a libpq URL postgresql://user@host[:port][,host2[:port]...]/database[?param=value&...]"
        )
    if "#" in rest:
        raise ValueError("must not have a fragment (#...)")
    authority, _sep, tail = rest.partition("/")
    if "?" in authority:
        authority, _sep, query_text = authority.partition("?")
        path = ""
    else:
        path, _sep, query_text = tail.partition("?")
    user = ""
    if "@" in authority:
        userinfo, _sep, authority = authority.rpartition("@")
        if ":" in userinfo:
            raise ValueError(
                "holds a password: give it in database_password (the URL is written to broker.properties "
                "and logged)"
            )
        user = unquote(userinfo)
    query: dict[str, str] = {}
    for key, value in parse_qsl(query_text, keep_blank_values=True):
        if key == "password":
            raise ValueError("holds a password parameter: give the password in database_password")
        if key in ("host", "hostaddr", "port", "dbname"):
            raise ValueError(
                "gives %s as a parameter; write hosts, ports and the database in the URL itself" % key
            )
        if key in query:
            raise ValueError("gives the parameter %s twice" % key)
        query[key] = value
    if not authority:
        raise ValueError(
            "names no host: list the database servers, postgresql://user@db1:5432,db2:5432/database"
        )
    hosts = []
    for item in authority.split(","):
        try:
            hosts.append(_database_host(item))
        except ValueError as exc:
            raise ValueError("host %r %s" % (item, exc)) from None
    dbname = unquote(path)
    if not dbname or "/" in dbname:
        raise ValueError("names no database: end the hosts with /<database>")
    return {"user": user, "hosts": hosts, "dbname": dbname, "query": query}


def _database_host(item: str) -> tuple[str, int]:
    port_text = ""
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        address = dep.parse_ip(host)
        if not sep or address is None or address.version != 6 or (rest and not rest.startswith(":")):
            raise ValueError("is not [IPv6 address][:port]")
        port_text = rest[1:]
    else:
        host, _sep, port_text = item.partition(":")
        if not _host_ok(host):
            raise ValueError("is not a host name or address")
    port = POSTGRES_PORT
    if port_text or item.endswith(":"):
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("has an invalid port %r" % port_text)
        port = int(port_text)
    return host, port


def validate_database(params: dict, errors: list[str]) -> None:
    url = params.get("database_url")
    if not url:
        for key in ("database_password", "database_ca_cert"):
            if params.get(key):
                errors.append("%s is only used with database_url (PostgreSQL)" % key)
        return
    try:
        parts = parse_database_url(url)
    except ValueError as exc:
        errors.append("database_url %s" % exc)
        return
    if params.get("database_password") is not None:
        _text_option(params["database_password"], "database_password", errors, secret=True)
    query = parts["query"]
    if params.get("database_ca_cert"):
        if "sslrootcert" in query:
            errors.append(
                "database_url sets sslrootcert and database_ca_cert is given as well: leave sslrootcert out, the "
                "module points it at the copy of database_ca_cert"
            )
        if query.get("sslmode", "verify-full") not in VERIFYING_SSLMODES:
            errors.append(
                "database_url has sslmode=%s, which does not verify the server against database_ca_cert: use "
                "sslmode=verify-full (the default with database_ca_cert) or verify-ca" % query["sslmode"]
            )


def database_value(params: dict) -> str:
    """The broker's ``Database``: the SQLite file, or the URL (with sslrootcert for database_ca_cert)."""
    url = params.get("database_url")
    if not url:
        return DATA_MOUNT + "/" + DATABASE
    if not params.get("database_ca_cert"):
        return url
    query = parse_database_url(url)["query"]
    extra = [] if "sslmode" in query else ["sslmode=verify-full"]
    extra.append("sslrootcert=/certs/" + DATABASE_CA)
    return url + ("&" if "?" in url else "?") + "&".join(extra)


def database_properties(params: dict) -> list[tuple[str, object]]:
    """``Database`` and, with a password, ``DatabasePasswordFile``."""
    values: list[tuple[str, object]] = [("Database", database_value(params))]
    if uses_postgresql(params) and params.get("database_password"):
        values.append(("DatabasePasswordFile", "/%s/%s" % (SECRETS, DATABASE_PASSWORD)))
    return values


# ------------------------------------------------------------------ enterprise identity


def second_factor(params: dict) -> dict:
    """The second_factor option with every suboption present (method none when not set)."""
    given = params.get("second_factor") or {}
    factor = {k: spec.get("default") for k, spec in SECOND_FACTOR_SPEC.items()}
    factor.update({k: v for k, v in given.items() if v is not None})
    return factor


def uses_secrets(params: dict) -> bool:
    """Whether the configuration reads files from secrets/ (mounted at /secrets)."""
    return (
        bool(params.get("directories"))
        or second_factor(params)["method"] != "none"
        or bool(uses_postgresql(params) and params.get("database_password"))
    )


def needs_identity_check(params: dict) -> bool:
    """Directories and RADIUS servers are checked by the new image before the container is replaced."""
    return bool(params.get("directories")) or second_factor(params)["method"] == "radius"


def _text_option(value, name: str, errors: list[str], secret: bool = False) -> bool:
    """A one-line value the properties (or a secret file) can carry unchanged; False after an error."""
    if value is None or value == "":
        errors.append("%s must not be empty" % name)
        return False
    if _CONTROL_RE.search(value):
        errors.append("%s must not contain line breaks or other control characters" % name)
        return False
    if secret:
        return True
    if value != value.strip():
        errors.append("%s %r has leading or trailing spaces" % (name, value))
        return False
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        # The services' key=value reader removes one pair of outer quotes.
        errors.append("%s %r must not be wrapped in quotes" % (name, value))
        return False
    return True


def _host_ok(host: str) -> bool:
    if dep.parse_ip(host) is not None:
        return True
    name = host.rstrip(".")
    return bool(name) and len(name) <= 253 and all(_HOST_LABEL_RE.match(label) for label in name.split("."))


def parse_ldap_url(value: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an ldap:// or ldaps:// server URL; ValueError says what is wrong."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError("is not a valid URL: %s" % exc) from None
    if parts.scheme not in LDAP_PORTS:
        raise ValueError(
            "must be ldaps://host[:636] (LDAPS) or ldap://host[:389] (StartTLS, or plain LDAP with "
            "allow_plain), not %s://" % (parts.scheme or "<no scheme>")
        )
    if not parts.hostname or not _host_ok(parts.hostname):
        raise ValueError("has no valid host name or address")
    if port == 0:
        raise ValueError("has port 0")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must not carry credentials, a query or a fragment (bind_dn and bind_password do)")
    if parts.path not in ("", "/"):
        raise ValueError("must not have a path (the search base is base_dn)")
    return parts.scheme, parts.hostname, port or LDAP_PORTS[parts.scheme]


def parse_radius_server(value: str) -> tuple[str, int]:
    """(host, port) of ``host``, ``host:port``, an IPv6 address or ``[IPv6]:port``; ValueError when wrong."""
    text = value.strip()
    port_text = ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("write an IPv6 address with a port as [address]:port")
        port_text = rest[1:]
        address = dep.parse_ip(host)
        if address is None or address.version != 6:
            raise ValueError("%r in brackets is not an IPv6 address" % host)
    elif text.count(":") > 1:
        host = text
        if dep.parse_ip(host) is None:
            raise ValueError("is neither host[:port] nor an IPv6 address")
    else:
        host, _sep, port_text = text.partition(":")
        if not _host_ok(host):
            raise ValueError("has no valid host name or address")
    port = RADIUS_PORT
    if port_text or text.endswith(":"):
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError("has an invalid port %r" % port_text)
        port = int(port_text)
    return host, port


def totp_key_valid(text: str) -> bool:
    """Whether ``text`` is the base64 of exactly 32 bytes (the broker's AES-256-GCM key)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == TOTP_KEY_BYTES


def _filter_ok(value: str) -> bool:
    # Parentheses inside values are escaped as \28 and \29 in LDAP filters, so every one is structure.
    depth = 0
    for char in value:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return value.startswith("(") and value.endswith(")") and depth == 0


def validate_directories(params: dict, errors: list[str], warnings: list[str]) -> None:
    seen: set[str] = set()
    for index, directory in enumerate(params.get("directories") or []):
        domain = directory["domain"]
        label = "directories[%d] (domain %s)" % (index, domain)
        if domain not in params["domains"]:
            spelled = [d for d in params["domains"] if d.upper() == (domain or "").upper()]
            if spelled:
                errors.append("%s: write the domain as in domains (%s)" % (label, spelled[0]))
            else:
                errors.append(
                    "%s: %s is not one of domains (%s); add it there or correct the name"
                    % (label, domain, ", ".join(params["domains"]))
                )
        if domain in seen:
            errors.append(
                "%s: domain %s has a second directory; give each domain one entry" % (label, domain)
            )
        seen.add(domain)
        servers = directory["servers"] or []
        if not servers:
            errors.append("%s: servers needs at least one ldaps:// or ldap:// URL" % label)
        schemes = []
        for server in servers:
            try:
                schemes.append(parse_ldap_url(server)[0])
            except ValueError as exc:
                errors.append("%s: server %r %s" % (label, server, exc))
        if len(set(servers)) != len(servers):
            errors.append("%s: servers lists a server twice" % label)
        if directory["allow_plain"]:
            if "ldap" not in schemes:
                errors.append(
                    "%s: allow_plain only concerns ldap:// servers and there is none; remove allow_plain"
                    % label
                )
            else:
                warnings.append(
                    "%s: allow_plain=true, the ldap:// servers are used without TLS if they do not offer "
                    "StartTLS; the service account's and the users' passwords can cross the network in "
                    "clear text" % label
                )
        _text_option(directory["bind_dn"], "%s: bind_dn" % label, errors)
        _text_option(directory["bind_password"], "%s: bind_password" % label, errors, secret=True)
        for key in ("base_dn", "group_base_dn"):
            value = directory[key]
            if (value is not None or key == "base_dn") and _text_option(
                value, "%s: %s" % (label, key), errors
            ):
                if "=" not in value:
                    errors.append(
                        "%s: %s %r is not a distinguished name (like dc=corp,dc=example)"
                        % (label, key, value)
                    )
        if directory["bind_dn"] and "=" not in directory["bind_dn"] and "@" not in directory["bind_dn"]:
            errors.append(
                "%s: bind_dn %r is neither a distinguished name nor a user principal name (svc@corp.example)"
                % (label, directory["bind_dn"])
            )
        if not _ATTRIBUTE_RE.match(directory["user_attribute"] or ""):
            errors.append(
                "%s: user_attribute %r is not an attribute name (uid, sAMAccountName)"
                % (label, directory["user_attribute"])
            )
        user_filter = directory["user_filter"]
        if user_filter is not None and _text_option(user_filter, "%s: user_filter" % label, errors):
            if not _filter_ok(user_filter):
                errors.append(
                    "%s: user_filter %r is not one LDAP filter in parentheses, like (objectClass=person)"
                    % (label, user_filter)
                )
        if not 1 <= directory["timeout"] <= 300:
            errors.append(
                "%s: timeout must be between 1 and 300 seconds, got %d" % (label, directory["timeout"])
            )
        if not 1 <= directory["pool_size"] <= 64:
            errors.append("%s: pool_size must be between 1 and 64, got %d" % (label, directory["pool_size"]))


def validate_second_factor(params: dict, errors: list[str]) -> None:
    factor = second_factor(params)
    method = factor["method"]
    if method == "none":
        unused = [k for k in _TOTP_ONLY + _RADIUS_ONLY + ("domains",) if factor[k] is not None]
        unused += ["first"] if factor["first"] else []
        if unused:
            errors.append(
                "second_factor: %s only apply with method totp or radius (method is none)" % ", ".join(unused)
            )
        return
    for domain in factor["domains"] or []:
        if domain not in params["domains"]:
            errors.append(
                "second_factor.domains: %s is not one of domains (%s)"
                % (domain, ", ".join(params["domains"]))
            )
    if factor["domains"] is not None and not factor["domains"]:
        errors.append(
            "second_factor.domains is empty; leave it out to ask every domain for the second factor"
        )
    other = _RADIUS_ONLY if method == "totp" else _TOTP_ONLY
    unused = [k for k in other if factor[k] is not None]
    if unused:
        errors.append("second_factor: %s do not apply with method %s" % (", ".join(unused), method))
    if method == "totp":
        if factor["totp_key"] is not None and not totp_key_valid(factor["totp_key"]):
            errors.append(
                "second_factor.totp_key must be the base64 of 32 random bytes (for example the output of "
                "'openssl rand -base64 32'); leave it out to have one generated on the host"
            )
        issuer = factor["totp_issuer"]
        if _text_option(issuer, "second_factor.totp_issuer", errors) and (":" in issuer or len(issuer) > 64):
            errors.append(
                "second_factor.totp_issuer must be at most 64 characters without ':' (it separates issuer and "
                "account in the authenticator app)"
            )
        return
    servers = factor["radius_servers"] or []
    if not servers:
        errors.append("second_factor.radius_servers needs at least one server (host or host:port)")
    for server in servers:
        try:
            parse_radius_server(server)
        except ValueError as exc:
            errors.append("second_factor.radius_servers: %r %s" % (server, exc))
    if len(set(servers)) != len(servers):
        errors.append("second_factor.radius_servers lists a server twice")
    _text_option(factor["radius_secret"], "second_factor.radius_secret", errors, secret=True)
    if not 1 <= factor["radius_timeout"] <= 60:
        errors.append(
            "second_factor.radius_timeout must be between 1 and 60 seconds, got %d" % factor["radius_timeout"]
        )
    if not 0 <= factor["radius_retries"] <= 10:
        errors.append(
            "second_factor.radius_retries must be between 0 and 10, got %d" % factor["radius_retries"]
        )
    nas = factor["radius_nas_identifier"]
    if (
        nas is not None
        and _text_option(nas, "second_factor.radius_nas_identifier", errors)
        and len(nas) > 253
    ):
        errors.append("second_factor.radius_nas_identifier must be at most 253 characters")


def identity_properties(params: dict) -> list[tuple[str, object]]:
    """The Domain.<D>.* and second factor keys; none at all without directories and second factor.

    Nothing is written for a broker without enterprise identity, so its broker.properties (and
    so its container) stays as it was before these options existed.
    """
    values: list[tuple[str, object]] = []
    for directory in params.get("directories") or []:
        key = "Domain.%s." % directory["domain"]
        values += [
            (key + "Source", "ldap"),
            (key + "LdapServers", directory["servers"]),
            (key + "LdapAllowPlain", directory["allow_plain"]),
            (
                key + "LdapCaCert",
                "/certs/" + ldap_ca_name(directory["domain"]) if directory["ca_cert"] else "",
            ),
            (key + "LdapBindDn", directory["bind_dn"]),
            (key + "LdapBindPasswordFile", "/%s/%s" % (SECRETS, ldap_password_name(directory["domain"]))),
            (key + "LdapBaseDn", directory["base_dn"]),
            (key + "LdapUserAttribute", directory["user_attribute"]),
            (key + "LdapUserFilter", directory["user_filter"] or "(objectClass=*)"),
            (key + "LdapGroupMode", directory["group_mode"]),
            (key + "LdapGroupBaseDn", directory["group_base_dn"] or directory["base_dn"]),
            (key + "LdapTimeout", directory["timeout"]),
            (key + "LdapPoolSize", directory["pool_size"]),
        ]
    factor = second_factor(params)
    if factor["method"] == "none":
        return values
    values += [("SecondFactor", factor["method"]), ("SecondFactorFirst", factor["first"])]
    if factor["domains"]:
        values.append(("SecondFactorDomains", factor["domains"]))
    if factor["method"] == "totp":
        values += [("TotpKeyFile", "/%s/%s" % (SECRETS, TOTP_KEY)), ("TotpIssuer", factor["totp_issuer"])]
    else:
        values += [
            ("RadiusServers", factor["radius_servers"]),
            ("RadiusSecretFile", "/%s/%s" % (SECRETS, RADIUS_SECRET)),
            ("RadiusTimeout", factor["radius_timeout"]),
            ("RadiusRetries", factor["radius_retries"]),
        ]
        if factor["radius_nas_identifier"]:
            values.append(("RadiusNasIdentifier", factor["radius_nas_identifier"]))
    return values


def ldap_ca_name(domain: str) -> str:
    return "ldap-%s.pem" % domain


def ldap_password_name(domain: str) -> str:
    return "ldap-%s.password" % domain


def secret_values(params: dict, extra: tuple = ()) -> list[str]:
    """Every secret of the configuration (to scrub from the output of the identity check)."""
    values = [params.get("admin_token") or ""]
    values += [d["bind_password"] for d in params.get("directories") or []]
    factor = second_factor(params)
    values += [factor["totp_key"] or "", factor["radius_secret"] or "", *extra]
    values += [params.get("database_password") or "", *url_passwords(params.get("database_url"))]
    return sorted({v for v in values if v}, key=len, reverse=True)


def identity_files(
    params: dict, certs_dir: str, secrets_dir: str, uid, gid, errors: list[str], warnings: list[str]
):
    """(planned files, generated secrets) of the directories' CAs and the identity secrets.

    Secret files hold the value on their first line, mode 0600, owned by the service user; their
    diff never shows the value or a hash of it. The TOTP key is taken from the option, else kept
    from secrets/totp.key, else generated once (32 random bytes) and kept from then on.
    """
    planned: list[PlannedFile] = []
    generated: list[str] = []
    for index, directory in enumerate(params.get("directories") or []):
        domain = directory["domain"]
        ca = dep.extra_file(
            directory["ca_cert"],
            os.path.join(certs_dir, ldap_ca_name(domain)),
            "directories[%d] (domain %s): ca_cert" % (index, domain),
            errors,
        )
        if ca is not None:
            planned.append(ca)
        planned.append(
            _secret_file(
                os.path.join(secrets_dir, ldap_password_name(domain)), directory["bind_password"], uid, gid
            )
        )
    factor = second_factor(params)
    if factor["method"] == "radius":
        planned.append(
            _secret_file(os.path.join(secrets_dir, RADIUS_SECRET), factor["radius_secret"], uid, gid)
        )
    elif factor["method"] == "totp":
        path = os.path.join(secrets_dir, TOTP_KEY)
        existing = (read_bytes(path) or b"").decode("ascii", "replace").strip()
        key = factor["totp_key"]
        if key is None:
            if existing and not totp_key_valid(existing):
                errors.append(
                    "%s is not the base64 of 32 bytes; restore it from a backup, or set second_factor.totp_key "
                    "(the TOTP secrets enrolled with the lost key cannot be decrypted: users must enroll again)"
                    % path
                )
                return planned, generated
            if not existing:
                existing = base64.b64encode(os.urandom(TOTP_KEY_BYTES)).decode("ascii")
                generated.append(existing)
            key = existing
        elif existing and existing != key.strip():
            warnings.append(
                "second_factor.totp_key differs from the key in %s: TOTP secrets enrolled with the earlier key "
                "can no longer be decrypted, those users must enroll again" % path
            )
        planned.append(_secret_file(path, key.strip(), uid, gid))
    return planned, generated


def database_files(
    params: dict, certs_dir: str, secrets_dir: str, uid, gid, errors: list[str]
) -> list[PlannedFile]:
    """The PostgreSQL password (a secret file, 0600) and the copy of database_ca_cert; none for SQLite."""
    planned: list[PlannedFile] = []
    if not uses_postgresql(params):
        return planned
    if params.get("database_password"):
        planned.append(
            _secret_file(os.path.join(secrets_dir, DATABASE_PASSWORD), params["database_password"], uid, gid)
        )
    ca = dep.extra_file(
        params.get("database_ca_cert"), os.path.join(certs_dir, DATABASE_CA), "database_ca_cert", errors
    )
    if ca is not None:
        planned.append(ca)
    return planned


def _secret_file(path: str, value: str, uid, gid) -> PlannedFile:
    return PlannedFile(path, (value + "\n").encode("utf-8"), 0o600, uid, gid, secret=True)


def stale_identity_files(
    certs_dir: str, secrets_dir: str, planned: list[PlannedFile], purge_key: bool
) -> list[str]:
    """Identity files of earlier runs that the configuration no longer names (the TOTP key only with ``purge_key``)."""
    wanted = {f.path for f in planned}
    found = glob.glob(os.path.join(certs_dir, "ldap-*.pem"))
    found += glob.glob(os.path.join(secrets_dir, "ldap-*.password"))
    found += [os.path.join(secrets_dir, RADIUS_SECRET), os.path.join(secrets_dir, DATABASE_PASSWORD)]
    found += [os.path.join(certs_dir, DATABASE_CA)]
    if purge_key:
        found.append(os.path.join(secrets_dir, TOTP_KEY))
    return sorted(p for p in found if p not in wanted and os.path.lexists(p))


def scrub(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, MASK)
    return text


def check_timeout(params: dict) -> int:
    """Seconds the identity check may take: every directory server and every RADIUS try, plus start-up."""
    seconds = 30
    for directory in params.get("directories") or []:
        seconds += 2 * directory["timeout"] * len(directory["servers"])
    factor = second_factor(params)
    if factor["method"] == "radius":
        seconds += (
            factor["radius_timeout"] * (factor["radius_retries"] + 1) * len(factor["radius_servers"] or [])
        )
    return seconds


def identity_check(
    cli,
    params: dict,
    spec: dict,
    files: list[PlannedFile],
    dirs: list[PlannedDir],
    owner: tuple,
    secrets: list[str],
) -> dict:
    """Run ``--check-identity`` of the new image on the new files; returns {exit_code, output}.

    The files are staged in a fresh directory inside data_dir (bind mounts are resolved on the
    Docker host, where data_dir is) with the modes and owners they will have, and mounted where
    the broker finds them. The live files are not touched, so a failing check leaves the running
    broker, and what it would read on a restart, as it was. The stage is removed afterwards.
    """
    data_dir = params["data_dir"]
    created = not os.path.isdir(data_dir)
    if created:
        os.makedirs(data_dir, 0o755)
    for leftover in glob.glob(os.path.join(data_dir, STAGE_PREFIX + "*")):
        # A stage of an interrupted run still holds secrets.
        shutil.rmtree(leftover, ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=data_dir)
    passed = False
    try:
        if owner[0] is not None:
            os.chown(stage, owner[0], owner[1])
        mounted = {m["source"] for m in spec["mounts"]}
        for d in dirs:
            if d.path in mounted:
                staged = os.path.join(stage, os.path.relpath(d.path, data_dir))
                os.mkdir(staged, d.mode)
                os.chmod(staged, d.mode)
                if d.uid is not None:
                    os.chown(staged, d.uid, d.gid)
        for f in files:
            if os.path.dirname(f.path) in mounted:
                write_atomic(
                    os.path.join(stage, os.path.relpath(f.path, data_dir)), f.data, f.mode, f.uid, f.gid
                )
        check_spec = dict(
            spec,
            mounts=[
                dict(m, source=os.path.join(stage, os.path.relpath(m["source"], data_dir)))
                for m in spec["mounts"]
            ],
        )
        status, output = ctr.run_once(
            cli,
            check_spec,
            spec["name"] + "-identity-check",
            [*spec["command"], CHECK_IDENTITY],
            check_timeout(params),
        )
        passed = status == 0
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not passed:
            # A first deployment whose check failed leaves no trace.
            shutil.rmtree(data_dir, ignore_errors=True)
    lines = [line for line in scrub(output, secrets).splitlines() if line.strip()]
    return {"exit_code": status, "output": lines}


def broker_properties(params: dict) -> bytes:
    return dep.render_properties(
        "Connection broker configuration; AdminToken comes from broker.env",
        [
            ("ListenAddress", "0.0.0.0"),
            ("ListenPort", 8443),
            ("SslCert", "/certs/cert.pem"),
            ("SslKey", "/certs/key.pem"),
            ("ClientCaCert", "/certs/" + CLIENT_CA if params["client_ca_cert"] else ""),
            ("ClientTlsVerify", params["client_tls_verify"]),
            *database_properties(params),
            ("Domains", params["domains"]),
            ("LogLevel", params["log_level"]),
            *identity_properties(params),
            # Unset keeps the service's default, 127.0.0.1 (and the file of earlier versions unchanged).
            *([("AdminAddress", admin_address(params))] if admin_address(params) else []),
        ],
    )


def admin_address(params: dict) -> str:
    """AdminAddress of the broker.properties, or "" for the service's default (127.0.0.1).

    A port published from a bridge network reaches the container's own address, never its
    loopback: with admin_host_port the listener takes every address of the container's namespace.
    """
    if params["admin_address"]:
        return params["admin_address"].strip()
    return "0.0.0.0" if params["admin_host_port"] and params["network_mode"] == "bridge" else ""


def broker_env(params: dict) -> bytes:
    return (
        "GATEHOUSE_ADMINTOKEN=%s\nGATEHOUSE_LOGLEVEL=%s\n" % (params["admin_token"], params["log_level"])
    ).encode("utf-8")


def container_spec(params: dict, image: str, host_label: str) -> dict:
    data_dir = params["data_dir"]
    mode = params["network_mode"]
    return {
        "service": "broker",
        "name": container_name(params["name_prefix"]),
        "image": image,
        "command": ["--config", "/data/broker.properties", "--env-file", "/data/broker.env"],
        "labels": {
            ctr.LABEL_ROLE: "broker",
            ctr.LABEL_HOST: host_label,
            ctr.LABEL_MANAGED: "gatehouse.access.broker",
        },
        # data/ is writable: the SQLite database lives there.
        "mounts": [
            {"source": os.path.join(data_dir, "data"), "target": DATA_MOUNT, "read_only": False},
            {"source": os.path.join(data_dir, "certs"), "target": "/certs", "read_only": True},
        ]
        + (
            [{"source": os.path.join(data_dir, SECRETS), "target": "/" + SECRETS, "read_only": True}]
            if uses_secrets(params)
            else []
        ),
        "network_mode": mode,
        "network": None,
        "ports": (
            [{"host": params["https_port"], "container": 8443, "protocol": "tcp"}]
            + (
                # The management listener on the host's loopback only, for a Prometheus on this host.
                [
                    {
                        "host": params["admin_host_port"],
                        "container": ADMIN_PORT,
                        "protocol": "tcp",
                        "host_ip": "127.0.0.1",
                    }
                ]
                if params.get("admin_host_port")
                else []
            )
        )
        if mode == "bridge"
        else [],
        "restart_policy": "unless-stopped",
        "container_limits": params.get("container_limits"),
    }


def run(module) -> dict:
    params = module.params
    for value in url_passwords(params.get("database_url")):
        # A password written into the URL by mistake is refused; it must not be shown either.
        module.no_log_values.add(value)
    warnings = validate(params)
    cli = ctr.client(params["docker_host"])
    if params["state"] == "absent":
        return uninstall(cli, params, module.check_mode)
    return install(module, cli, params, warnings)


def uninstall(cli, params: dict, check_mode: bool) -> dict:
    data_dir = params["data_dir"]
    data, certs_dir = os.path.join(data_dir, engine.DATA), os.path.join(data_dir, engine.CERTS)
    secrets_dir = os.path.join(data_dir, SECRETS)
    # The TOTP key belongs to the database (it decrypts the enrolled secrets): both go with purge only.
    more_files = stale_identity_files(certs_dir, secrets_dir, [], params["purge"])
    if params["purge"]:
        more_files += [os.path.join(data, n) for n in DB_FILES]
    result = engine.uninstall(
        cli,
        check_mode,
        data_dir,
        [container_name(params["name_prefix"])],
        data_files=("broker.properties", "broker.env"),
        cert_files=(CLIENT_CA,),
        managed_by="gatehouse.access.broker",
        more_files=more_files,
        more_dirs=[secrets_dir],
    )
    left = result["left_behind"]
    kept_db = [p for p in left if os.path.basename(p) in (*DB_FILES, TOTP_KEY) or p in (data, secrets_dir)]
    if kept_db and not params["purge"]:
        result["warnings_list"] = [
            "kept the broker database in %s (users, desktops, entitlements%s); set purge=true to delete it"
            % (data, ", and the key of its TOTP secrets in %s" % secrets_dir if secrets_dir in left else "")
        ]
    return result


def check_identity_first(cli, params: dict, deployment, owner: tuple, generated: list[str]) -> dict:
    """{identity_check} when the broker container is about to be created or replaced, else {}.

    Runs before anything is written; a failing check raises Failure (changed=False) and leaves
    the running broker and its files as they were.
    """
    container = deployment.containers[0]
    if container.action not in ("create", "recreate"):
        return {}
    check = identity_check(
        cli,
        params,
        container.spec,
        deployment.files,
        deployment.dirs,
        owner,
        secret_values(params, tuple(generated)),
    )
    if check["exit_code"] != 0:
        reason = (
            "did not finish within %d s" % check_timeout(params)
            if check["exit_code"] is None
            else "failed (exit code %d)" % check["exit_code"]
        )
        # The check prints "ok ..." and "FAIL ..." lines; the failures say what to fix.
        failures = [line for line in check["output"] if line.startswith("FAIL")] or check["output"]
        kept = (
            "nothing was deployed"
            if container.action == "create"
            else "the running broker and its files were left unchanged"
        )
        raise Failure(
            "the identity check of the new configuration %s; %s: %s"
            % (reason, kept, "; ".join(failures) or "no output"),
            identity_check=check,
            changed=False,
        )
    return {"identity_check": check}


def install(module, cli, params: dict, warnings: list[str]) -> dict:
    """Deploy the broker; ``warnings`` (of validate()) start the list of warnings.

    Before a container with directories or RADIUS is created or replaced, the new image checks
    the new configuration (identity_check()); only then does the engine write and converge.
    """
    check_mode = module.check_mode
    data_dir = params["data_dir"]
    data, certs_dir = os.path.join(data_dir, engine.DATA), os.path.join(data_dir, engine.CERTS)
    secrets_dir = os.path.join(data_dir, SECRETS)
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings = list(warnings)
    common_name = dep.certificate_name(host_label)
    tls, tls_info = dep.tls_files(params, certs_dir, common_name, [], errors, warnings)
    client_ca = dep.extra_file(
        params["client_ca_cert"], os.path.join(certs_dir, CLIENT_CA), "client_ca_cert", errors
    )
    uid, gid = engine.service_owner()
    identity, generated = identity_files(params, certs_dir, secrets_dir, uid, gid, errors, warnings)
    for value in generated:
        # Never returned; this makes Ansible mask it should it show up anywhere.
        module.no_log_values.add(value)
    database = database_files(params, certs_dir, secrets_dir, uid, gid, errors)
    engine.check_network_target(cli, params, errors)
    refs, ids, loaded = engine.resolve_images(cli, params, ["broker"], check_mode, errors)
    if errors:
        raise dep.ValidationError(errors)

    if uid is None:
        warnings.append(engine.NOT_ROOT % "the broker runs")
    spec = container_spec(params, refs["broker"], host_label)
    properties = PlannedFile(
        os.path.join(data, "broker.properties"), broker_properties(params), 0o644, uid, gid
    )
    files = [
        properties,
        PlannedFile(
            os.path.join(data, "broker.env"),
            broker_env(params),
            0o600,
            uid,
            gid,
            mask=mask_env_values(TOKEN_KEYS),
        ),
        *tls,
        *identity,
    ]
    if client_ca is not None:
        files.append(client_ca)
    files += database
    dirs = engine.data_dirs(data_dir, uid, gid)
    if uses_secrets(params):
        dirs.append(PlannedDir(secrets_dir, 0o700, uid, gid))
    stale = stale_identity_files(certs_dir, secrets_dir, files, False)
    # The broker reads every file of the deployment; a CA copy is public, the rest are secrets.
    deployment = engine.Deployment(
        data_dir,
        files,
        dirs,
        [engine.Container(spec)],
        ids,
        loaded,
        stale_files=[(path, None if path.endswith(".pem") else SECRET_TEXT) for path in stale],
    )
    deployment.plan(cli)
    result: dict = {}
    if deployment.changed and not check_mode and needs_identity_check(params):
        result.update(check_identity_first(cli, params, deployment, (uid, gid), generated))
    deployment.apply(cli, check_mode, params["wait_timeout"])
    config = {
        "broker_properties": dep.parse_properties(properties.data),
        "data_dir": data_dir,
        "database": database_value(params) if uses_postgresql(params) else os.path.join(data, DATABASE),
        "network_mode": params["network_mode"],
        "image": refs["broker"],
        "host_label": host_label,
        "tls": tls_info,
    }
    result.update(deployment.result(config, warnings))
    return result
