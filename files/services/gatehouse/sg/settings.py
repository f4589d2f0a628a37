"""SecurityGateway.conf (and GatehouseGrantSecret from cmsg.env), validated once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.config import Config, ConfigError, env_name
from gatehouse.grant import decode_secret

# Not configuration keys.
AGENT_TIMEOUT = 10.0  # TCP + TLS + "200 OK" from the agent
SHUTDOWN_GRACE = 5.0  # seconds given to closing transports on SIGTERM
REFUSAL_LOG_RATE = 10  # log lines per second and refusal reason; the counters keep the total


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

    @property
    def agent_udp_ports(self) -> range:
        """Source ports of the per-session agent-side UDP sockets (for firewall rules)."""
        return range(self.agent_udp_source_port, self.agent_udp_source_port + self.agent_udp_port_count)

    @classmethod
    def from_config(cls, cfg: Config) -> SgSettings:
        secret_text = cfg.str("GrantSecret", required=True)
        try:
            secret = decode_secret(secret_text)
        except ValueError as exc:
            raise ConfigError(f"GrantSecret ({env_name('GrantSecret')} in cmsg.env): {exc}") from None
        max_connections = cfg.int("MaxConnections", 5000, minimum=1)
        source_port = cfg.int("AgentUdpSourcePort", 55000, minimum=1, maximum=65535)
        # One agent-side port per relayed session; by default as many as MaxConnections allows.
        room = 65536 - source_port
        port_count = cfg.int("AgentUdpPortCount", min(max_connections, room), minimum=1, maximum=room)
        agent_tls_verify = cfg.bool("AgentTlsVerify", True)
        agent_ca_cert = cfg.str("AgentCaCert")
        if agent_tls_verify and not agent_ca_cert:
            raise ConfigError(
                "AgentTlsVerify=true needs AgentCaCert (the deployment CA that signs the agents' "
                "certificates); set AgentTlsVerify=false only to accept any agent certificate"
            )
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
        )
