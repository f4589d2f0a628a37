"""The CM's configuration (config.properties + cmsg.env), validated once at start."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from gatehouse import grant, sites
from gatehouse.config import Config, ConfigError
from gatehouse.protocol import PATH_BROKER
from gatehouse.tenants import Tenants, TenantsError, load_tenants
from gatehouse.web import HttpLimits, Network

# The CM's defaults for the shared HTTP limits (common to CM, broker and agent; see gatehouse.web).
# A person picks a desktop between two requests: the idle keep-alive is long (nginx's and aiohttp's
# 75 s), which is safe because each request still gets RequestTimeout from its first byte.
HTTP_DEFAULTS = {
    "max_connections": 4096,
    "max_connections_per_source": 64,
    "admin_port": 9180,
    "keepalive_timeout": 75.0,
}

# An invitation code is a bearer secret: it lives minutes, not hours (InvitationTtl's bounds).
MIN_INVITATION_TTL = 1.0
MAX_INVITATION_TTL = 3600.0


@dataclass(frozen=True)
class CmSettings:
    # Without tenants, the one broker of every client. With tenants (TenantsFile) each tenant's
    # own broker_url serves its clients and BrokerUrl may be left out (docs/tenants.md).
    broker_url: str
    listen_address: str = "0.0.0.0"
    listen_port: int = 8443
    redirect_port: int = 8080
    ssl_cert: str = "/certs/cert.pem"
    ssl_key: str = "/certs/key.pem"
    broker_ca_cert: str = ""
    broker_tls_verify: bool = True
    agent_ca_cert: str = ""
    agent_tls_verify: bool = True
    # The CM's own `cm` role certificate, presented to the broker and the agents (empty: none).
    identity_cert: str = ""
    identity_key: str = ""
    # Field names are the cmsg module's option names (a unit test holds them equal through
    # CM_OPTION_KEYS); the config keys are the seed-style ones.
    enable_security_gateway: bool = True
    # At most one address per IP version, IPv4 first.
    external_pcoip_ip: tuple[str, ...] = ()
    pcoip_port: int = 4172
    max_concurrent_establishments: int = 40
    max_clients: int = 400
    broker_timeout: float = 10.0
    agent_timeout: float = 10.0
    idle_timeout: float = 900.0
    # Unauthenticated sessions: absolute lifetime and their own caps (MaxClients counts only
    # authenticated sessions, so anonymous hellos can never refuse or displace a user).
    pre_auth_timeout: float = 60.0
    max_pre_auth_sessions: int = 400
    max_pre_auth_sessions_per_source: int = 16
    session_max_lifetime: float = 36000.0
    max_auth_attempts: int = 5
    # When set, the CM's /health follows the co-located SG's health (polled every 0.5 s).
    security_gateway_health_url: str = ""
    trusted_proxies: tuple[Network, ...] = ()
    enable_ipv6: bool = False
    # Collaboration (docs/protocol.md, "Collaboration"): an owner's invitation lets another
    # authenticated client join the owner's desktop session. Codes live invitation_ttl seconds
    # (bounded by MAX_INVITATION_TTL), at most max_invitations_per_session are outstanding per
    # owner session, and a session ends after max_invitation_attempts unknown codes.
    enable_collaboration: bool = True
    invitation_ttl: float = 300.0
    max_invitations_per_session: int = 5
    max_invitation_attempts: int = 5
    host_address: tuple[str, ...] = ()
    license_server_url: str = ""
    log_level: str = "info"
    # CM processes serving the ports (gatehouse/workers.py); 1 = one process, no supervisor.
    # Workers=0 in the file (the default) means the CPUs this process may run on.
    workers: int = 1
    # A worker whose event loop answers no probe for this long is killed and forked again (0: never).
    worker_hang_timeout: float = 30.0
    grant_secret: bytes = field(default=b"", repr=False)
    # Multi-site (docs/multisite.md): this CM's site ("" = none) and the gateway of each other site,
    # where the clients of that site's desktops are sent (sorted by site; this CM's own site may be
    # listed, so every CM can get the same map, and is not used: its own SG or direct mode serve it).
    site: str = ""
    site_gateways: tuple[tuple[str, sites.Gateway], ...] = ()
    # Tenants sharing this CM (docs/tenants.md): read from tenants_file at start and on SIGHUP.
    # Empty tenants_file: no tenants, the CM serves every host name with broker_url.
    tenants_file: str = ""
    tenants: Tenants = field(default_factory=Tenants)
    http: HttpLimits = field(default_factory=lambda: HttpLimits(**HTTP_DEFAULTS))

    @classmethod
    def from_config(cls, cfg: Config) -> CmSettings:
        external_pcoip_ip = split_external_pcoip_ip(cfg.list("ExternalPcoipIp"))
        gateway = cfg.bool("SecurityGatewayEnabled", True)
        secret = b""
        secret_text = cfg.str("GrantSecret")
        if gateway:
            if not external_pcoip_ip:
                raise ConfigError("ExternalPcoipIp is required when SecurityGatewayEnabled is true")
            if not secret_text:
                raise ConfigError(
                    "GrantSecret is required when SecurityGatewayEnabled is true "
                    "(set GATEHOUSE_GRANTSECRET in cmsg.env)"
                )
        if secret_text:
            try:
                secret = grant.decode_secret(secret_text)
            except ValueError as exc:
                raise ConfigError(f"GrantSecret: {exc}") from None
        try:
            site = sites.check_site(cfg.str("Site"), "Site")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            site_gateways = sites.parse_site_gateways(cfg.list("SiteGateways"))
        except ValueError as exc:
            raise ConfigError(f"SiteGateways: {exc}") from None
        if site_gateways and not secret_text:
            raise ConfigError(
                "GrantSecret is required with SiteGateways (the grants for other sites' gateways; "
                "set GATEHOUSE_GRANTSECRET in cmsg.env, the same on every site)"
            )
        identity_cert = cfg.str("IdentityCert")
        identity_key = cfg.str("IdentityKey")
        if bool(identity_cert) != bool(identity_key):
            raise ConfigError("IdentityCert and IdentityKey go together: set both or neither")
        sg_health = cfg.str("SecurityGatewayHealthUrl")
        if sg_health:
            parts = urlsplit(sg_health)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"SecurityGatewayHealthUrl must be an http(s):// URL, got {sg_health!r}")
        trusted = tuple(cfg.networks("TrustedProxies"))
        tenants_file = cfg.str("TenantsFile")
        tenants = read_tenants(tenants_file) if tenants_file else Tenants()
        broker_url = cfg.str("BrokerUrl", required=not tenants_file)
        return cls(
            broker_url=broker_endpoint(broker_url) if broker_url else "",
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            listen_port=cfg.int("ListenPort", 8443, minimum=1, maximum=65535),
            redirect_port=cfg.int("RedirectPort", 8080, minimum=0, maximum=65535),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            broker_ca_cert=cfg.str("BrokerCaCert"),
            broker_tls_verify=cfg.bool("BrokerTlsVerify", True),
            agent_ca_cert=cfg.str("AgentCaCert"),
            agent_tls_verify=cfg.bool("AgentTlsVerify", True),
            identity_cert=identity_cert,
            identity_key=identity_key,
            enable_security_gateway=gateway,
            external_pcoip_ip=external_pcoip_ip,
            pcoip_port=cfg.int("SecurityGatewayPort", 4172, minimum=1, maximum=65535),
            max_concurrent_establishments=cfg.int("MaxConcurrentEstablishments", 40, minimum=1),
            max_clients=cfg.int("MaxClients", 400, minimum=1),
            broker_timeout=cfg.float("BrokerTimeout", 10.0, minimum=0.1),
            agent_timeout=cfg.float("AgentTimeout", 10.0, minimum=0.1),
            idle_timeout=cfg.float("SessionIdleTimeout", 900.0, minimum=1.0),
            pre_auth_timeout=cfg.float("PreAuthTimeout", 60.0, minimum=1.0),
            max_pre_auth_sessions=cfg.int("MaxPreAuthSessions", 400, minimum=1),
            max_pre_auth_sessions_per_source=cfg.int("MaxPreAuthSessionsPerSource", 16, minimum=1),
            session_max_lifetime=cfg.float("SessionMaxLifetime", 36000.0, minimum=1.0),
            max_auth_attempts=cfg.int("MaxAuthAttempts", 5, minimum=1),
            security_gateway_health_url=sg_health,
            trusted_proxies=trusted,
            enable_ipv6=cfg.bool("EnableIpv6", False),
            enable_collaboration=cfg.bool("EnableCollaboration", True),
            invitation_ttl=cfg.float(
                "InvitationTtl", 300.0, minimum=MIN_INVITATION_TTL, maximum=MAX_INVITATION_TTL
            ),
            max_invitations_per_session=cfg.int("MaxInvitationsPerSession", 5, minimum=1, maximum=100),
            max_invitation_attempts=cfg.int("MaxInvitationAttempts", 5, minimum=1, maximum=100),
            host_address=tuple(cfg.list("HostAddress")),
            license_server_url=cfg.str("LicenseServerUrl"),
            log_level=cfg.log_level(),
            workers=cfg.workers(),
            worker_hang_timeout=cfg.worker_hang_timeout(),
            grant_secret=secret,
            site=site,
            site_gateways=tuple(sorted(site_gateways.items())),
            tenants_file=tenants_file,
            tenants=tenants,
            http=HttpLimits.from_config(cfg, **HTTP_DEFAULTS, trusted_proxies=trusted),
        )

    def site_gateway(self, site: str) -> sites.Gateway | None:
        """The gateway of another ``site`` (None: not configured)."""
        return dict(self.site_gateways).get(site)

    def external_pcoip_ip_of(self, version: int) -> str:
        """The external address of IP ``version`` (4 or 6), or "" when there is none."""
        for address in self.external_pcoip_ip:
            if ipaddress.ip_address(address).version == version:
                return address
        return ""


def broker_endpoint(url: str, key: str = "BrokerUrl") -> str:
    """``https://host:port[/path]`` → the full URL of the broker protocol endpoint."""
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{key} must be an https://host[:port][/path] URL, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{key} has an invalid port: {url!r}") from None
    path = parts.path if parts.path not in ("", "/") else PATH_BROKER
    return urlunsplit(("https", parts.netloc, path, "", ""))


def read_tenants(path: str) -> Tenants:
    """The CM's tenants from the TenantsFile ``path``, each broker_url made a full endpoint URL."""
    try:
        tenants = load_tenants(path, need_broker=True)
        return Tenants(
            tuple(
                replace(t, broker_url=broker_endpoint(t.broker_url, f"tenant {t.name}: broker_url"))
                for t in tenants.tenants
            )
        )
    except (TenantsError, ConfigError) as exc:
        raise ConfigError(f"TenantsFile: {exc}") from None


def split_external_pcoip_ip(items: list[str]) -> tuple[str, ...]:
    """At most one IPv4 and one IPv6 address, as the seed's external_pcoip_ip allows; IPv4 first."""
    v4 = v6 = ""
    for item in items:
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(f"ExternalPcoipIp: {item!r} is not an IP address") from None
        if addr.version == 4:
            if v4:
                raise ConfigError("ExternalPcoipIp holds more than one IPv4 address")
            v4 = str(addr)
        else:
            if v6:
                raise ConfigError("ExternalPcoipIp holds more than one IPv6 address")
            v6 = str(addr)
    return tuple(address for address in (v4, v6) if address)
