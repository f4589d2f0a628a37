"""agent.properties, validated once at start.

Launch-session on the control port is accepted only from a peer whose certificate, verified
against ``ClientCaCert``, carries role ``cm`` (``ClientTlsVerify``, default true). Load reports are
authenticated by the agent's own certificate (``IdentityCert``/``IdentityKey``, by default
``SslCert``/``SslKey``: the collection issues it from the deployment CA with role ``agent`` and the
desktop's names), which the broker matches against the reported address.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gatehouse.config import Config, ConfigError
from gatehouse.web import HttpLimits

REPORT_PATH = "/api/v1/agents/report"
# RequestTimeout, KeepAliveTimeout, MaxConnections, MaxConnectionsPerSource, AdminAddress, AdminPort
# of the control port: the agent's defaults (its callers are a few CMs).
HTTP_DEFAULTS = {"max_connections": 256, "max_connections_per_source": 64, "admin_port": 9182}


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
    identity_cert: str
    identity_key: str
    client_ca_cert: str
    client_tls_verify: bool
    report_interval: float
    session_tag_ttl: float
    capacity: int
    log_level: str
    http: HttpLimits = field(default_factory=lambda: HttpLimits(**HTTP_DEFAULTS))

    @classmethod
    def from_config(cls, cfg: Config) -> AgentSettings:
        broker_url = cfg.str("BrokerUrl")
        report_url = ""
        if broker_url:
            parts = urlsplit(broker_url)
            if parts.scheme not in {"https", "http"} or not parts.netloc:
                raise ConfigError(f"BrokerUrl must be https://host[:port], got {broker_url!r}")
            report_url = f"{parts.scheme}://{parts.netloc}{REPORT_PATH}"
        ssl_cert = cfg.str("SslCert", required=True)
        ssl_key = cfg.str("SslKey", required=True)
        identity_cert = cfg.str("IdentityCert") or ssl_cert
        # A separate IdentityCert comes with its own key; the default pairs SslCert with SslKey.
        identity_key = cfg.str("IdentityKey") or (ssl_key if identity_cert == ssl_cert else identity_cert)
        client_ca_cert, client_tls_verify = cfg.client_ca("the connection managers' certificates")
        return cls(
            listen_address=cfg.str("ListenAddress", "0.0.0.0"),
            control_port=cfg.int("ControlPort", 60443, minimum=1, maximum=65535),
            session_port=cfg.int("SessionPort", 4172, minimum=1, maximum=65535),
            ssl_cert=ssl_cert,
            ssl_key=ssl_key,
            hostname=cfg.str("Hostname") or socket.gethostname(),
            advertise_address=cfg.str("AdvertiseAddress") or default_address(),
            report_url=report_url,
            broker_ca_cert=cfg.str("BrokerCaCert"),
            broker_tls_verify=cfg.bool("BrokerTlsVerify", True),
            identity_cert=identity_cert,
            identity_key=identity_key,
            client_ca_cert=client_ca_cert,
            client_tls_verify=client_tls_verify,
            report_interval=cfg.float("ReportInterval", 10.0, minimum=0.1),
            session_tag_ttl=cfg.float("SessionTagTtl", 60.0, minimum=0.1),
            capacity=cfg.int("Capacity", 10, minimum=1),
            log_level=cfg.log_level(),
            http=HttpLimits.from_config(cfg, **HTTP_DEFAULTS),
        )
