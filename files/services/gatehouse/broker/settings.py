"""broker.properties: the broker's configuration keys, read and checked once at start.

Internal callers authenticate with certificates from the deployment CA (``ClientCaCert``): the
broker protocol only from role ``cm``, load reports only from role ``agent``. The admin API keeps
its bearer token (``AdminToken``): the collection's modules call it without a certificate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gatehouse.broker.db import check_url
from gatehouse.broker.throttle import ThrottlePolicy
from gatehouse.config import Config, ConfigError
from gatehouse.web import HttpLimits

MIN_TOKEN_LEN = 16
# RequestTimeout, KeepAliveTimeout, MaxConnections, MaxConnectionsPerSource, AdminAddress, AdminPort:
# the broker's defaults. Its callers are a few CMs (pooled connections), agents and the modules.
HTTP_DEFAULTS = {"max_connections": 1024, "max_connections_per_source": 256, "admin_port": 9181}


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
        check_url(database)
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            listen_port=cfg.int("ListenPort", 8443, minimum=1, maximum=65535),
            ssl_cert=cfg.str("SslCert", "/certs/cert.pem"),
            ssl_key=cfg.str("SslKey", "/certs/key.pem"),
            database=database,
            admin_token=admin_token,
            client_ca_cert=client_ca_cert,
            client_tls_verify=client_tls_verify,
            domains=domains,
            log_level=cfg.log_level(),
            agent_stale_after=cfg.float("AgentStaleAfter", 30.0, minimum=1.0),
            session_idle_timeout=cfg.float("SessionIdleTimeout", 900.0, minimum=1.0),
            max_sessions=cfg.int("MaxSessions", 10000, minimum=1),
            hostname=cfg.str("Hostname", ""),
            login=throttle,
            password_hash_workers=cfg.int(
                "PasswordHashWorkers", default_hash_workers(), minimum=1, maximum=64
            ),
            password_hash_queue=cfg.int("PasswordHashQueue", 32, minimum=0),
            http=HttpLimits.from_config(cfg, **HTTP_DEFAULTS),
        )
