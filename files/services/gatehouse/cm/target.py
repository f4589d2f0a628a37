"""Where a client goes after allocate-resource: the SG with a grant, or the agent itself.

Multi-site (docs/multisite.md): a desktop of this CM's own site, or of no site, is reached as
before (this host's SG, or directly); a desktop of another site through that site's gateway
(``SiteGateways``), with a grant sealed for that site's key. A desktop of a site without a
configured gateway is refused before the agent is asked to launch anything.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from gatehouse import protocol as p
from gatehouse.cm.settings import CmSettings
from gatehouse.grant import GrantSealer
from gatehouse.sites import Gateway

GRANT_TTL = 30.0


class NoSiteGateway(Exception):
    """The desktop belongs to another site whose gateway this CM does not know."""

    def __init__(self, site: str) -> None:
        super().__init__(f"no gateway is configured for site {site!r} (SiteGateways)")
        self.site = site


def site_gateway(settings: CmSettings, site: str) -> Gateway | None:
    """The other site's gateway for a desktop of ``site``, or None: this CM's own way serves it.

    Raises NoSiteGateway for another site that SiteGateways does not name.
    """
    if not site or site == settings.site:
        return None
    gateway = settings.site_gateway(site)
    if gateway is None:
        raise NoSiteGateway(site)
    return gateway


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def gateway_name(host_address: tuple[str, ...], cert_path: str | Path | None) -> str:
    """The SG's TLS name for clients: the first FQDN of HostAddress, else the shared certificate's."""
    for item in host_address:
        if not _is_ip(item):
            return item
    if not cert_path:
        return ""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return ""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sans.get_values_for_type(x509.DNSName)
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def build_target(
    settings: CmSettings,
    sealer: GrantSealer | None,
    session_id: str,
    client_ip: str,
    agent: p.AgentInfo,
    info: p.SessionInfo,
    gateway_sni: str = "",
    remote: tuple[Gateway, GrantSealer] | None = None,
) -> p.Target:
    """Gateway mode: the SG's external address and a grant; direct mode: the agent and its session-tag.

    ``remote``: another site's gateway and the sealer of its site's key (:func:`site_gateway`),
    in either mode; the TLS name is the gateway's DNS name, if it has one.
    """
    if remote is not None:
        gateway, site_sealer = remote
        connect_tag = site_sealer.mint(
            session_id, info.ip_address, info.port, info.session_tag, client_ip, ttl=GRANT_TTL
        )
        name = "" if gateway.is_ip else gateway.host
        return p.Target(
            ip_address=gateway.host,
            port=gateway.port,
            session_id=session_id,
            connect_tag=connect_tag,
            hostname=name,
            sni=name,
        )
    if settings.enable_security_gateway:
        if sealer is None:
            raise ValueError("the security gateway is enabled but no grant secret is configured")
        connect_tag = sealer.mint(
            session_id, info.ip_address, info.port, info.session_tag, client_ip, ttl=GRANT_TTL
        )
        return p.Target(
            ip_address=settings.external_pcoip_ip_of(4) or settings.external_pcoip_ip_of(6),
            port=settings.pcoip_port,
            session_id=session_id,
            connect_tag=connect_tag,
            hostname=gateway_sni,
            sni=gateway_sni,
            ipv6_address=settings.external_pcoip_ip_of(6),
        )
    return p.Target(
        ip_address=info.ip_address,
        port=info.port,
        session_id=session_id,
        connect_tag=info.session_tag,
        hostname=agent.hostname,
        sni=info.sni,
    )
