# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Primary and secondary connection URLs of a user population (private to the collection).

The seed's multi-site scenario gives each user population an ordered list of connections: LAN
users of site 1 the site's own CMs first, then the HALB virtual server of site 2; WAN users the
HALB virtual server of site 1, then that of site 2. Clients try them in order and move on when
one does not answer (``gatehouse-client --url`` takes the same list).

Inputs: ``sites`` maps a site name to ``{vip, port, cms, cm_port}``: ``vip`` is the site's HALB
virtual server address (its entry point), ``cms`` its CM nodes in order. ``populations`` maps a
population to its entries, in order; an entry is ``SITE`` (the site's VIP), ``SITE:cms`` (each of
its CM nodes in order) or a literal ``https://`` URL. Invariants of the result: every URL is
``https://host[:port]`` (IPv6 in brackets, port 443 left out), and a URL appears once, at its
first place (a later duplicate would only repeat a failed attempt).
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_PORT = 443
_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
NODES = "cms"  # the entry suffix that names a site's CM nodes


class ConnectionUrlsError(ValueError):
    """Input that cannot give a population's connection list."""


def url_of(host: object, port: object, what: str) -> str:
    """``https://host[:port]`` for an IP address (v4 or v6) or a DNS name."""
    if not isinstance(host, str) or not host.strip():
        raise ConnectionUrlsError("%s: the address must be a non-empty string" % what)
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConnectionUrlsError("%s: the port must be an integer from 1 to 65535, got %r" % (what, port))
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_RE.match(host.rstrip(".")):
            raise ConnectionUrlsError(
                "%s: %r is neither an IP address nor a DNS name" % (what, host)
            ) from None
        shown = host.rstrip(".").lower()
    else:
        shown = "[%s]" % address if address.version == 6 else str(address)
    return "https://%s" % shown if port == DEFAULT_PORT else "https://%s:%d" % (shown, port)


def _literal(entry: str, population: str) -> str:
    rest = entry[len("https://") :].rstrip("/")
    host, port = rest, DEFAULT_PORT
    if rest.startswith("["):
        host, _sep, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise ConnectionUrlsError(
                    "population %s: %r is not https://host[:port]" % (population, entry)
                )
            port = int(tail[1:])
    elif ":" in rest:
        host, _sep, port_text = rest.partition(":")
        if not port_text.isdigit():
            raise ConnectionUrlsError("population %s: %r is not https://host[:port]" % (population, entry))
        port = int(port_text)
    if "/" in host:
        raise ConnectionUrlsError(
            "population %s: %r is not https://host[:port] (no path)" % (population, entry)
        )
    return url_of(host, port, "population %s" % population)


def check_sites(sites: object) -> dict:
    """The ``sites`` map, validated: ``{site: {"vip": url or None, "cms": [urls]}}``."""
    if not isinstance(sites, dict):
        raise ConnectionUrlsError("sites must be a dictionary of site name to {vip, port, cms, cm_port}")
    checked = {}
    for name, site in sites.items():
        if not isinstance(name, str) or not _SITE_RE.match(name):
            raise ConnectionUrlsError(
                "site %r: a site name is 1 to 63 lower-case letters, digits, '-' or '_'" % (name,)
            )
        if not isinstance(site, dict):
            raise ConnectionUrlsError("site %s: must be a dictionary with vip and/or cms" % name)
        unknown = sorted(set(site) - {"vip", "port", "cms", "cm_port"})
        if unknown:
            raise ConnectionUrlsError("site %s: unknown keys %s" % (name, ", ".join(unknown)))
        vip = site.get("vip")
        cms = site.get("cms") or []
        if not isinstance(cms, list):
            raise ConnectionUrlsError("site %s: cms must be a list of addresses" % name)
        if not vip and not cms:
            raise ConnectionUrlsError(
                "site %s: give its HALB address (vip), its CM nodes (cms) or both" % name
            )
        port = site.get("port", DEFAULT_PORT)
        cm_port = site.get("cm_port", DEFAULT_PORT)
        checked[name] = {
            "vip": url_of(vip, port, "site %s vip" % name) if vip else None,
            "cms": [url_of(host, cm_port, "site %s cms" % name) for host in cms],
        }
    return checked


def connection_list(population: str, populations: object, sites: object) -> list[dict]:
    """The ordered connections of ``population``: ``{url, site, kind}`` each, ``kind`` being
    ``vip``, ``cm`` or ``url`` (a literal entry, ``site`` empty)."""
    if not isinstance(populations, dict):
        raise ConnectionUrlsError("populations must be a dictionary of population to a list of entries")
    if population not in populations:
        known = ", ".join(sorted(str(p) for p in populations)) or "none"
        raise ConnectionUrlsError("unknown population %r (defined: %s)" % (population, known))
    entries = populations[population]
    if not isinstance(entries, list) or not entries:
        raise ConnectionUrlsError("population %s: must be a non-empty list of entries" % population)
    checked = check_sites(sites)
    result: list[dict] = []
    seen: set[str] = set()

    def add(url: str, site: str, kind: str) -> None:
        if url not in seen:
            seen.add(url)
            result.append({"url": url, "site": site, "kind": kind})

    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConnectionUrlsError("population %s: every entry must be a non-empty string" % population)
        entry = entry.strip()
        if entry.lower().startswith("https://"):
            add(_literal(entry, population), "", "url")
            continue
        name, sep, part = entry.partition(":")
        if name not in checked:
            raise ConnectionUrlsError(
                "population %s: %r names no site (defined: %s)"
                % (population, entry, ", ".join(sorted(checked)) or "none")
            )
        site = checked[name]
        if sep:
            if part != NODES:
                raise ConnectionUrlsError(
                    "population %s: %r: after ':' only %r (the site's CM nodes) is known"
                    % (population, entry, NODES)
                )
            if not site["cms"]:
                raise ConnectionUrlsError("population %s: site %s has no cms" % (population, name))
            for url in site["cms"]:
                add(url, name, "cm")
        else:
            if not site["vip"]:
                raise ConnectionUrlsError(
                    "population %s: site %s has no vip (name %s:%s for its CM nodes)"
                    % (population, name, name, NODES)
                )
            add(site["vip"], name, "vip")
    return result
