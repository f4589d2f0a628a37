"""SecurityGateway.conf (and GatehouseGrantSecret from cmsg.env), validated once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.config import Config, ConfigError, env_name
from gatehouse.grant import decode_secret

# Not configuration keys: bounds that keep an idle or slow peer from pinning a slot.
HANDSHAKE_TIMEOUT = 5.0  # TLS handshake from the client
LINE_TIMEOUT = 5.0  # the CONNECT line after the handshake
AGENT_TIMEOUT = 10.0  # TCP + TLS + "200 OK" from the agent
SHUTDOWN_GRACE = 5.0  # seconds given to closing transports on SIGTERM


@dataclass(frozen=True)
class SgSettings:
    listen_address: str
    port: int
    agent_udp_source_port: int
    max_connections: int
    ssl_cert: str
    ssl_key: str
    admin_address: str
    admin_port: int
    log_level: str
    grant_secret: bytes = field(repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> SgSettings:
        secret_text = cfg.str("GrantSecret", required=True)
        try:
            secret = decode_secret(secret_text)
        except ValueError as exc:
            raise ConfigError(f"GrantSecret ({env_name('GrantSecret')} in cmsg.env): {exc}") from None
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            port=cfg.int("Port", 4172, minimum=1, maximum=65535),
            agent_udp_source_port=cfg.int("AgentUdpSourcePort", 55000, minimum=1, maximum=65535),
            max_connections=cfg.int("MaxConnections", 5000, minimum=1),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            admin_address=cfg.str("AdminAddress", "0.0.0.0"),
            admin_port=cfg.int("AdminPort", 9172, minimum=0, maximum=65535),
            log_level=cfg.log_level(),
            grant_secret=secret,
        )
