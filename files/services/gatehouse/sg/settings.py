"""SecurityGateway.conf (and GatehouseGrantSecret from cmsg.env), validated once at start.

Two modes (docs/dmz.md): a gateway (the default) checks grants and relays to agents; with
ForwardTo set, the SG is a forwarder for a double-hop DMZ that passes each client connection and
datagram to one of the inner SGs listed there with a PROXY v2 header naming the client, and holds
no grant secret, no TLS key and no agent settings. ProxyProtocolSources (either mode) lists the
peers whose connections and datagrams must start with a PROXY v2 header naming the client.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from gatehouse.config import MAX_WORKERS, Config, ConfigError, env_name
from gatehouse.grant import decode_secret
from gatehouse.sites import check_site
from gatehouse.tenants import Tenants, TenantsError, load_tenants

# Not configuration keys.
AGENT_TIMEOUT = 10.0  # TCP + TLS + "200 OK" from the agent
SHUTDOWN_GRACE = 5.0  # seconds given to closing transports on SIGTERM
REFUSAL_LOG_RATE = 10  # log lines per second and refusal reason; the counters keep the total
FORWARD_CONNECT_TIMEOUT = 3.0  # forwarder: TCP connect to one inner SG before trying the next
FORWARD_RETRY_AFTER = 10.0  # forwarder: an inner SG that refused a connect is tried last this long
UDP_FLOW_IDLE = 120.0  # forwarder: a client's UDP flow without datagrams either way is closed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_host_port(item: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a list entry; the error names ``key``."""
    host, sep, port_text = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not sep or not host or not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {item!r} is not host:port ([address]:port for IPv6)")
    return host, port


@dataclass(frozen=True)
class SgSettings:
    listen_address: str
    port: int
    agent_udp_source_port: int
    agent_udp_port_count: int
    max_connections: int
    max_connections_per_source: int
    request_timeout: float
    ssl_cert: str
    ssl_key: str
    agent_ca_cert: str
    agent_tls_verify: bool
    admin_address: str
    admin_port: int
    log_level: str
    grant_secret: bytes = field(repr=False)
    forward_to: tuple[tuple[str, int], ...] = ()
    proxy_protocol_sources: tuple[Network, ...] = ()
    # The site this gateway serves ("" = none): it accepts only grants sealed for this site's key
    # (gatehouse.grant, docs/multisite.md). A forwarder opens no grants: there it has no effect.
    site: str = ""
    # Tenants sharing this SG (docs/tenants.md), from TenantsFile at start and on SIGHUP: the TLS
    # server name picks the tenant whose grant key opens the grant, and the grant's agent must be
    # within the tenant's agent_networks. Empty tenants_file: no tenants (g1. grants only).
    tenants_file: str = ""
    tenants: Tenants = field(default_factory=Tenants)
    # Gateway processes serving Port (workers.py); 1 = one process, no supervisor. Workers=0 in
    # the file (the default) means the CPUs this process may run on. A forwarder runs one.
    workers: int = 1
    # A worker whose event loop answers no probe for this long is killed and forked again (0: never).
    worker_hang_timeout: float = 30.0

    @property
    def forwarding(self) -> bool:
        """A forwarder of a double-hop DMZ (ForwardTo set), not a gateway."""
        return bool(self.forward_to)

    def proxy_source(self, ip: str) -> bool:
        """Whether connections and datagrams from ``ip`` must carry a PROXY v2 header."""
        if not self.proxy_protocol_sources:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.proxy_protocol_sources)

    @property
    def agent_udp_ports(self) -> range:
        """Source ports of the per-session agent-side UDP sockets (for firewall rules)."""
        return range(self.agent_udp_source_port, self.agent_udp_source_port + self.agent_udp_port_count)

    @classmethod
    def from_config(cls, cfg: Config) -> SgSettings:
        forward_to = tuple(parse_host_port(item, "ForwardTo") for item in cfg.list("ForwardTo"))
        if len(set(forward_to)) != len(forward_to):
            raise ConfigError("ForwardTo: an inner SG is listed twice")
        if forward_to:
            if cfg.str("GrantSecret"):
                raise ConfigError(
                    f"ForwardTo: a forwarder holds no grant secret; remove GrantSecret "
                    f"({env_name('GrantSecret')} in cmsg.env) from this host"
                )
            secret = b""
        else:
            secret_text = cfg.str("GrantSecret", required=True)
            try:
                secret = decode_secret(secret_text)
            except ValueError as exc:
                raise ConfigError(f"GrantSecret ({env_name('GrantSecret')} in cmsg.env): {exc}") from None
        try:
            site = check_site(cfg.str("Site"), "Site")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        max_connections = cfg.int("MaxConnections", 5000, minimum=1)
        source_port = cfg.int("AgentUdpSourcePort", 55000, minimum=1, maximum=65535)
        # One agent-side port per relayed session; by default as many as MaxConnections allows.
        room = 65536 - source_port
        port_count = cfg.int("AgentUdpPortCount", min(max_connections, room), minimum=1, maximum=room)
        agent_tls_verify = cfg.bool("AgentTlsVerify", True)
        agent_ca_cert = cfg.str("AgentCaCert")
        if agent_tls_verify and not agent_ca_cert and not forward_to:  # a forwarder reaches no agent
            raise ConfigError(
                "AgentTlsVerify=true needs AgentCaCert (the deployment CA that signs the agents' "
                "certificates); set AgentTlsVerify=false only to accept any agent certificate"
            )
        tenants_file = cfg.str("TenantsFile")
        if tenants_file and forward_to:
            raise ConfigError(
                "TenantsFile: a forwarder checks no grant; give the tenants to the inner gateways"
            )
        tenants = read_tenants(tenants_file) if tenants_file else Tenants()
        if forward_to:
            if cfg.int("Workers", 0, minimum=0, maximum=MAX_WORKERS) > 1:
                raise ConfigError("Workers: a forwarder runs as one process; set Workers=1 or leave it out")
            workers = 1
        else:
            workers = cfg.workers()
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            port=cfg.int("Port", 4172, minimum=1, maximum=65535),
            agent_udp_source_port=source_port,
            agent_udp_port_count=port_count,
            max_connections=max_connections,
            max_connections_per_source=cfg.int("MaxConnectionsPerSource", 32, minimum=1),
            request_timeout=cfg.float("RequestTimeout", 10.0, minimum=0.1),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            agent_ca_cert=agent_ca_cert,
            agent_tls_verify=agent_tls_verify,
            admin_address=cfg.str("AdminAddress", "127.0.0.1"),
            admin_port=cfg.int("AdminPort", 9172, minimum=0, maximum=65535),
            log_level=cfg.log_level(),
            grant_secret=secret,
            forward_to=forward_to,
            proxy_protocol_sources=tuple(cfg.networks("ProxyProtocolSources")),
            site=site,
            tenants_file=tenants_file,
            tenants=tenants,
            workers=workers,
            worker_hang_timeout=cfg.worker_hang_timeout(),
        )


def read_tenants(path: str) -> Tenants:
    """The SG's tenants from the TenantsFile ``path`` (broker_url is the CM's and not needed here)."""
    try:
        return load_tenants(path, need_broker=False)
    except TenantsError as exc:
        raise ConfigError(f"TenantsFile: {exc}") from None
