"""broker.properties: the broker's configuration keys, read and checked once at start.

Internal callers authenticate with certificates from the deployment CA (``ClientCaCert``): the
broker protocol only from role ``cm``, load reports only from role ``agent``. The admin API keeps
its bearer token (``AdminToken``): the collection's modules call it without a certificate.

Enterprise identity: ``Domain.<D>.*`` says where the users of domain ``<D>`` are checked
(:class:`DirectorySettings`, local broker users or an LDAP directory), ``SecondFactor*``,
``Totp*`` and ``Radius*`` the second-level authentication (:class:`FactorSettings`). Secret files
(bind passwords, the RADIUS shared secret, the TOTP key) are read here, once: a missing or empty
file is a ConfigError naming the key and the file, and no secret appears in a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gatehouse.broker.db import POSTGRESQL, engine_of
from gatehouse.broker.throttle import ThrottlePolicy
from gatehouse.config import Config, ConfigError
from gatehouse.protocol import DNS_NAME as _DNS_NAME
from gatehouse.web import HttpLimits

MIN_TOKEN_LEN = 16
# RequestTimeout, KeepAliveTimeout, MaxConnections, MaxConnectionsPerSource, AdminAddress, AdminPort:
# the broker's defaults. Its callers are a few CMs (pooled connections), agents and the modules.
HTTP_DEFAULTS = {"max_connections": 1024, "max_connections_per_source": 256, "admin_port": 9181}


SOURCE_LOCAL = "local"
SOURCE_LDAP = "ldap"
SOURCES = (SOURCE_LOCAL, SOURCE_LDAP)
GROUP_MODES = ("ad-nested", "memberof", "search")
FACTOR_NONE = "none"
FACTOR_TOTP = "totp"
FACTOR_RADIUS = "radius"
FACTORS = (FACTOR_NONE, FACTOR_TOTP, FACTOR_RADIUS)
TOTP_KEY_BYTES = 32
RADIUS_PORT = 1812
# An LDAP attribute description: a name or a numeric OID (RFC 4512 section 2.5).
_ATTRIBUTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")


def read_secret_file(key: str, path: str) -> str:
    """The first line of the file ``key`` names; a ConfigError naming both (never the value)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    value = lines[0].strip() if lines else ""
    if not value:
        raise ConfigError(f"{key}: {path} is empty (the secret is its first line)")
    return value


def _readable(key: str, path: str) -> str:
    if not os.access(path, os.R_OK) or not Path(path).is_file():
        raise ConfigError(f"{key}: {path} is not a readable file")
    return path


@dataclass(frozen=True)
class LdapServer:
    """One entry of ``Domain.<D>.LdapServers``: ``ldaps://`` = LDAPS, ``ldap://`` = StartTLS or plain."""

    scheme: str
    host: str
    port: int

    @property
    def use_ssl(self) -> bool:
        return self.scheme == "ldaps"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _ldap_server(key: str, item: str) -> LdapServer:
    try:
        parts = urlsplit(item)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: {item!r} is not an ldap:// or ldaps:// URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ConfigError(f"{key}: {item!r} is not an ldap:// or ldaps:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{key}: {item!r} must be scheme://host[:port] only")
    return LdapServer(scheme, parts.hostname, port or (636 if scheme == "ldaps" else 389))


def _balanced_filter(key: str, value: str) -> str:
    depth = 0
    for ch in value:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            break
    if not (value.startswith("(") and value.endswith(")")) or depth != 0:
        raise ConfigError(f"{key}: {value!r} is not an LDAP filter in parentheses")
    return value


@dataclass(frozen=True)
class DirectorySettings:
    """``Domain.<D>.*`` of one domain whose users are checked in an LDAP directory.

    Invariants: at least one server; an ``ldap://`` server uses StartTLS unless ``allow_plain``;
    certificates and host names are always verified (``ca_cert`` empty = the system trust store).
    """

    domain: str
    servers: tuple[LdapServer, ...]
    bind_dn: str
    bind_password: str = field(repr=False)
    base_dn: str
    bind_password_file: str = ""
    ca_cert: str = ""
    allow_plain: bool = False
    user_attribute: str = "uid"
    user_filter: str = "(objectClass=*)"
    group_mode: str = "memberof"
    group_base_dn: str = ""
    timeout: int = 5
    pool_size: int = 4

    @classmethod
    def from_config(cls, cfg: Config, domain: str) -> DirectorySettings:
        def key(name: str) -> str:
            return f"Domain.{domain}.{name}"

        servers = tuple(_ldap_server(key("LdapServers"), item) for item in cfg.list(key("LdapServers")))
        if not servers:
            raise ConfigError(f"{key('LdapServers')} is required when {key('Source')} is ldap")
        allow_plain = cfg.bool(key("LdapAllowPlain"), False)
        ca_cert = cfg.str(key("LdapCaCert"))
        password_file = cfg.str(key("LdapBindPasswordFile"), required=True)
        user_attribute = cfg.str(key("LdapUserAttribute"), "uid")
        if not _ATTRIBUTE.match(user_attribute):
            raise ConfigError(f"{key('LdapUserAttribute')}: {user_attribute!r} is not an attribute name")
        group_mode = cfg.str(key("LdapGroupMode"), "memberof").lower()
        if group_mode not in GROUP_MODES:
            raise ConfigError(
                f"{key('LdapGroupMode')} must be one of {', '.join(GROUP_MODES)}, got {group_mode!r}"
            )
        base_dn = cfg.str(key("LdapBaseDn"), required=True)
        return cls(
            domain=domain,
            servers=servers,
            bind_dn=cfg.str(key("LdapBindDn"), required=True),
            bind_password=read_secret_file(key("LdapBindPasswordFile"), password_file),
            base_dn=base_dn,
            bind_password_file=password_file,
            ca_cert=_readable(key("LdapCaCert"), ca_cert) if ca_cert else "",
            allow_plain=allow_plain,
            user_attribute=user_attribute,
            user_filter=_balanced_filter(
                key("LdapUserFilter"), cfg.str(key("LdapUserFilter"), "(objectClass=*)")
            ),
            group_mode=group_mode,
            group_base_dn=cfg.str(key("LdapGroupBaseDn"), base_dn),
            # Whole seconds: ldap3 sets the receive timeout as an integer socket option.
            timeout=cfg.int(key("LdapTimeout"), 5, minimum=1, maximum=300),
            pool_size=cfg.int(key("LdapPoolSize"), 4, minimum=1, maximum=64),
        )

    @property
    def plain_servers(self) -> list[LdapServer]:
        """Servers spoken to without TLS (``ldap://`` with ``LdapAllowPlain``): warned about at start."""
        return [s for s in self.servers if not s.use_ssl and self.allow_plain]


def _radius_server(key: str, item: str) -> tuple[str, int]:
    host, port = item, RADIUS_PORT
    if item.startswith("["):
        host, _sep, rest = item[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{key}: {item!r} is not host[:port]")
            port = _radius_port(key, item, rest[1:])
    elif item.count(":") == 1:
        host, _sep, number = item.partition(":")
        port = _radius_port(key, item, number)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _DNS_NAME.match(host):
            raise ConfigError(f"{key}: {item!r} is not host[:port]") from None
    return host, port


def _radius_port(key: str, item: str, number: str) -> int:
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ConfigError(f"{key}: {item!r} has no valid port")
    return int(number)


@dataclass(frozen=True)
class FactorSettings:
    """``SecondFactor*``, ``Totp*`` and ``Radius*``: the second-level authentication.

    ``totp_key`` is loaded whenever ``TotpKeyFile`` is set (required with ``SecondFactor = totp``);
    the RADIUS keys are read only with ``SecondFactor = radius``.
    """

    kind: str = FACTOR_NONE
    first: bool = False
    domains: tuple[str, ...] = ()
    totp_key_file: str = ""
    totp_key: bytes = field(default=b"", repr=False)
    totp_issuer: str = "Gatehouse"
    radius_servers: tuple[tuple[str, int], ...] = ()
    radius_secret_file: str = ""
    radius_secret: bytes = field(default=b"", repr=False)
    radius_timeout: float = 3.0
    radius_retries: int = 1
    radius_nas_identifier: str = ""

    @property
    def enabled(self) -> bool:
        return self.kind != FACTOR_NONE

    def applies(self, domain: str) -> bool:
        """Whether users of ``domain`` (as spelled in Domains) need the second factor."""
        return self.enabled and domain in self.domains

    @classmethod
    def from_config(cls, cfg: Config, domains: tuple[str, ...], hostname: str) -> FactorSettings:
        kind = cfg.str("SecondFactor", FACTOR_NONE).lower()
        if kind not in FACTORS:
            raise ConfigError(f"SecondFactor must be one of {', '.join(FACTORS)}, got {kind!r}")
        chosen: list[str] = []
        for item in cfg.list("SecondFactorDomains") or list(domains):
            match = next((d for d in domains if d.lower() == item.lower()), None)
            if match is None:
                raise ConfigError(
                    f"SecondFactorDomains: {item!r} is not one of Domains ({', '.join(domains)})"
                )
            if match not in chosen:
                chosen.append(match)
        key_file = cfg.str("TotpKeyFile")
        if kind == FACTOR_TOTP and not key_file:
            raise ConfigError("TotpKeyFile is required when SecondFactor is totp")
        totp_key = _totp_key(key_file) if key_file else b""
        issuer = cfg.str("TotpIssuer", "Gatehouse")
        if len(issuer) > 64 or ":" in issuer or any(ord(ch) < 32 for ch in issuer):
            raise ConfigError("TotpIssuer must be at most 64 printable characters without ':'")
        fields: dict[str, object] = {}
        if kind == FACTOR_RADIUS:
            servers = tuple(_radius_server("RadiusServers", item) for item in cfg.list("RadiusServers"))
            if not servers:
                raise ConfigError("RadiusServers is required when SecondFactor is radius")
            secret_file = cfg.str("RadiusSecretFile", required=True)
            nas = cfg.str("RadiusNasIdentifier", hostname or socket.gethostname())
            if not nas or len(nas) > 253:
                raise ConfigError("RadiusNasIdentifier must be 1-253 characters")
            fields = {
                "radius_servers": servers,
                "radius_secret_file": secret_file,
                "radius_secret": read_secret_file("RadiusSecretFile", secret_file).encode(),
                "radius_timeout": cfg.float("RadiusTimeout", 3.0, minimum=0.1),
                "radius_retries": cfg.int("RadiusRetries", 1, minimum=0, maximum=10),
                "radius_nas_identifier": nas,
            }
        return cls(
            kind=kind,
            first=cfg.bool("SecondFactorFirst", False),
            domains=tuple(chosen),
            totp_key_file=key_file,
            totp_key=totp_key,
            totp_issuer=issuer,
            **fields,  # type: ignore[arg-type]
        )


def _totp_key(path: str) -> bytes:
    value = read_secret_file("TotpKeyFile", path)
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"TotpKeyFile: {path} does not hold base64 text") from None
    if len(key) != TOTP_KEY_BYTES:
        raise ConfigError(
            f"TotpKeyFile: {path} must hold base64 of {TOTP_KEY_BYTES} random bytes, got {len(key)}"
        )
    return key


def default_hash_workers() -> int:
    """One scrypt worker per CPU, at most 4 (32 MiB each)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class BrokerSettings:
    listen_address: str = "0.0.0.0"
    listen_port: int = 8443
    ssl_cert: str = "/certs/cert.pem"
    ssl_key: str = "/certs/key.pem"
    database: str = "/data/broker.db"
    database_password: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    client_ca_cert: str = ""
    client_tls_verify: bool = True
    domains: tuple[str, ...] = ("CORP",)
    log_level: str = "info"
    agent_stale_after: float = 30.0
    session_idle_timeout: float = 900.0
    max_sessions: int = 10000
    hostname: str = ""
    login: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    password_hash_workers: int = field(default_factory=default_hash_workers)
    password_hash_queue: int = 32
    http: HttpLimits = field(default_factory=lambda: HttpLimits(**HTTP_DEFAULTS))
    # Domain name -> source (local | ldap), and the directory of every ldap domain.
    sources: dict[str, str] = field(default_factory=dict)
    directories: dict[str, DirectorySettings] = field(default_factory=dict)
    factor: FactorSettings = field(default_factory=FactorSettings)

    def source(self, domain: str) -> str:
        """``Domain.<D>.Source`` of a configured domain (local when not set)."""
        return self.sources.get(domain, SOURCE_LOCAL)

    def secrets(self) -> list[str | bytes]:
        """Every secret this configuration holds, to be scrubbed from logs."""
        found: list[str | bytes] = [self.admin_token, self.factor.radius_secret, self.database_password]
        found += [d.bind_password for d in self.directories.values()]
        if self.factor.totp_key:
            found.append(base64.b64encode(self.factor.totp_key).decode())
        return found

    @classmethod
    def from_config(cls, cfg: Config) -> BrokerSettings:
        admin_token = cfg.str("AdminToken", required=True)
        if len(admin_token) < MIN_TOKEN_LEN:
            raise ConfigError(f"AdminToken must be at least {MIN_TOKEN_LEN} characters long")
        client_ca_cert, client_tls_verify = cfg.client_ca("the CM and agent certificates")
        throttle = ThrottlePolicy(
            delay_after_failures=cfg.int("LoginDelayAfterFailures", 3, minimum=1),
            max_delay=cfg.float("LoginMaxDelay", 8.0, minimum=0.0),
            lockout_after_failures=cfg.int("LoginLockoutAfterFailures", 10, minimum=1),
            source_lockout_after_failures=cfg.int("LoginSourceLockoutAfterFailures", 50, minimum=1),
            account_lockout_after_failures=cfg.int("LoginAccountLockoutAfterFailures", 100, minimum=1),
            lockout_seconds=cfg.float("LoginLockoutSeconds", 900.0, minimum=1.0),
            failure_window=cfg.float("LoginFailureWindow", 900.0, minimum=1.0),
        )
        if throttle.account_lockout_after_failures < throttle.lockout_after_failures:
            raise ConfigError(
                "LoginAccountLockoutAfterFailures must be at least LoginLockoutAfterFailures "
                "(otherwise guesses from anywhere lock the account before the guessing source)"
            )
        domains = tuple(cfg.list("Domains")) or ("CORP",)
        lowered = [d.lower() for d in domains]
        if len(set(lowered)) != len(lowered):
            raise ConfigError("Domains lists a domain twice")
        for domain in domains:
            if any(ch in domain for ch in "/\\@") or len(domain) > 64:
                raise ConfigError(f"Domains: {domain!r} is not a valid domain name")
        database = cfg.str("Database", "/data/broker.db")
        # A postgresql:// URL (libpq, several hosts: the writable primary is used) holds no
        # password: DatabasePasswordFile does (or libpq's PGPASSWORD / PGPASSFILE).
        engine = engine_of(database)
        password_file = cfg.str("DatabasePasswordFile")
        if password_file and engine != POSTGRESQL:
            raise ConfigError("DatabasePasswordFile is only for a postgresql:// Database")
        database_password = read_secret_file("DatabasePasswordFile", password_file) if password_file else ""
        hostname = cfg.str("Hostname", "")
        sources: dict[str, str] = {}
        directories: dict[str, DirectorySettings] = {}
        for domain in domains:
            source = cfg.str(f"Domain.{domain}.Source", SOURCE_LOCAL).lower()
            if source not in SOURCES:
                raise ConfigError(f"Domain.{domain}.Source must be local or ldap, got {source!r}")
            sources[domain] = source
            if source == SOURCE_LDAP:
                directories[domain] = DirectorySettings.from_config(cfg, domain)
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            listen_port=cfg.int("ListenPort", 8443, minimum=1, maximum=65535),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            database=database,
            database_password=database_password,
            admin_token=admin_token,
            client_ca_cert=client_ca_cert,
            client_tls_verify=client_tls_verify,
            domains=domains,
            log_level=cfg.log_level(),
            agent_stale_after=cfg.float("AgentStaleAfter", 30.0, minimum=1.0),
            session_idle_timeout=cfg.float("SessionIdleTimeout", 900.0, minimum=1.0),
            max_sessions=cfg.int("MaxSessions", 10000, minimum=1),
            hostname=hostname,
            login=throttle,
            password_hash_workers=cfg.int(
                "PasswordHashWorkers", default_hash_workers(), minimum=1, maximum=64
            ),
            password_hash_queue=cfg.int("PasswordHashQueue", 32, minimum=0),
            http=HttpLimits.from_config(cfg, **HTTP_DEFAULTS),
            sources=sources,
            directories=directories,
            factor=FactorSettings.from_config(cfg, domains, hostname),
        )
