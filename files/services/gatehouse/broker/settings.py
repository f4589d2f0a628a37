"""broker.properties: the broker's configuration keys, read and checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.broker.db import check_url
from gatehouse.config import Config, ConfigError

MIN_TOKEN_LEN = 16


@dataclass(frozen=True)
class BrokerSettings:
    listen_address: str = "0.0.0.0"
    listen_port: int = 8443
    ssl_cert: str = "/certs/cert.pem"
    ssl_key: str = "/certs/key.pem"
    database: str = "/data/broker.db"
    admin_token: str = field(default="", repr=False)
    agent_token: str = field(default="", repr=False)
    domains: tuple[str, ...] = ("CORP",)
    log_level: str = "info"
    agent_stale_after: float = 30.0
    session_idle_timeout: float = 900.0
    max_sessions: int = 10000
    hostname: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> BrokerSettings:
        admin_token = cfg.str("AdminToken", required=True)
        agent_token = cfg.str("AgentToken", required=True)
        for key, token in (("AdminToken", admin_token), ("AgentToken", agent_token)):
            if len(token) < MIN_TOKEN_LEN:
                raise ConfigError(f"{key} must be at least {MIN_TOKEN_LEN} characters long")
        if admin_token == agent_token:
            raise ConfigError("AdminToken and AgentToken must differ (agents must not get admin rights)")
        domains = tuple(cfg.list("Domains")) or ("CORP",)
        lowered = [d.lower() for d in domains]
        if len(set(lowered)) != len(lowered):
            raise ConfigError("Domains lists a domain twice")
        for domain in domains:
            if any(ch in domain for ch in "/\\@") or len(domain) > 64:
                raise ConfigError(f"Domains: {domain!r} is not a valid domain name")
        database = cfg.str("Database", "/data/broker.db")
        check_url(database)
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            listen_port=cfg.int("ListenPort", 8443, minimum=1, maximum=65535),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            database=database,
            admin_token=admin_token,
            agent_token=agent_token,
            domains=domains,
            log_level=cfg.log_level(),
            agent_stale_after=cfg.float("AgentStaleAfter", 30.0, minimum=1.0),
            session_idle_timeout=cfg.float("SessionIdleTimeout", 900.0, minimum=1.0),
            max_sessions=cfg.int("MaxSessions", 10000, minimum=1),
            hostname=cfg.str("Hostname", ""),
        )
