"""Sites of a multi-site deployment: their names and the gateway address of each.

A site is one location with its CMs (behind a HALB pair), SGs and desktops (docs/multisite.md).
Invariants: a site name is 1 to 63 characters of lower-case letters, digits, ``-`` and ``_``,
starting with a letter or digit, so that it compares equal byte for byte everywhere (broker
database, CM and SG configuration, the grant key); the empty name means "no site" (a
single-site deployment) and is never a key of a gateway map.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_site(name: str, what: str = "site") -> str:
    """``name`` if it is a valid site name or empty; raises ValueError naming ``what`` otherwise."""
    if name and not SITE_NAME.match(name):
        raise ValueError(
            f"{what}: {name!r} is not a site name (1 to 63 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Gateway:
    """Where the clients of a site's desktops connect: one of its SGs' external address and port.

    ``host`` is an IP address (IPv6 without brackets) or a DNS name.
    """

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_gateway(text: str) -> Gateway:
    """``host:port``, ``[v6]:port`` or ``ip-or-name`` alone (port 4172); raises ValueError."""
    text = text.strip()
    port = 4172
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _sep, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: the port must be 1 to 65535")
        port = int(port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a DNS name") from None
    return Gateway(host, port)


def parse_site_gateways(items: list[str]) -> dict[str, Gateway]:
    """``site=host:port`` items (the ``SiteGateways`` key) as a map; raises ValueError."""
    gateways: dict[str, Gateway] = {}
    for item in items:
        site, sep, address = item.partition("=")
        site = site.strip()
        if not sep or not site:
            raise ValueError(f"{item!r} is not site=host:port")
        check_site(site)
        if site in gateways:
            raise ValueError(f"site {site!r} is named twice")
        try:
            gateways[site] = parse_gateway(address)
        except ValueError as exc:
            raise ValueError(f"site {site!r}: {exc}") from None
    return gateways
