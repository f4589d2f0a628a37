"""agent.properties, validated once at start."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gatehouse.config import Config, ConfigError

REPORT_PATH = "/api/v1/agents/report"


def default_address() -> str:
    """The first non-loopback address: the source address of the default route, else the host name's."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks a route
            address = probe.getsockname()[0]
            if not address.startswith("127."):
                return address
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class AgentSettings:
    listen_address: str
    control_port: int
    session_port: int
    ssl_cert: str
    ssl_key: str
    hostname: str
    advertise_address: str
    report_url: str
    broker_ca_cert: str
    broker_tls_verify: bool
    agent_token: str = field(repr=False)
    report_interval: float
    session_tag_ttl: float
    capacity: int
    log_level: str

    @classmethod
    def from_config(cls, cfg: Config) -> AgentSettings:
        broker_url = cfg.str("BrokerUrl")
        report_url = ""
        if broker_url:
            parts = urlsplit(broker_url)
            if parts.scheme not in {"https", "http"} or not parts.netloc:
                raise ConfigError(f"BrokerUrl must be https://host[:port], got {broker_url!r}")
            report_url = f"{parts.scheme}://{parts.netloc}{REPORT_PATH}"
        token = cfg.str("AgentToken")
        if report_url and not token:
            raise ConfigError("AgentToken is required when BrokerUrl is set (load reports are authenticated)")
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            control_port=cfg.int("ControlPort", 60443, minimum=1, maximum=65535),
            session_port=cfg.int("SessionPort", 4172, minimum=1, maximum=65535),
            ssl_cert=cfg.str("SslCert", required=True),
            ssl_key=cfg.str("SslKey", required=True),
            hostname=cfg.str("Hostname") or socket.gethostname(),
            advertise_address=cfg.str("AdvertiseAddress") or default_address(),
            report_url=report_url,
            broker_ca_cert=cfg.str("BrokerCaCert"),
            broker_tls_verify=cfg.bool("BrokerTlsVerify", True),
            agent_token=token,
            report_interval=cfg.float("ReportInterval", 10.0, minimum=0.1),
            session_tag_ttl=cfg.float("SessionTagTtl", 60.0, minimum=0.1),
            capacity=cfg.int("Capacity", 10, minimum=1),
            log_level=cfg.log_level(),
        )
