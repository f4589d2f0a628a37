# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Management Console DNS-based discovery: the FQDNs a device tries, in order (private to the collection).

The device knows a prefix (the "MC DNS-Based Discovery Prefix") and gets a domain name from
DHCP option 15 and a host name from DHCP option 12 (assumed to include the domain name). It
tries ``<prefix>.<domain>``, then climbs one level up the hierarchy per attempt; the last name
attempted has a single dot. Then it does the same starting from the host name. Either DHCP
option may be empty: its variations are then simply absent. A name without any dot yields no
attempt (no variation of it has the single dot the last attempt must have); when neither gives
one, that is an error rather than an empty list.

Timing (the manual's algorithm): each attempt waits for its status message to time out before
the next; after the last domain-based attempt the device waits SERIES_DELAY seconds before the
host-name series, and after that series SERIES_DELAY again before the cycle starts over.
"""

from __future__ import annotations

import re
import socket

MAX_FQDN_LENGTH = 253
# "the device delays for 5 minutes" after each series (domain-based, then host-name-based).
SERIES_DELAY = 300
# DNS labels as devices and resolvers accept them; underscores appear in real prefixes (pcoip_mc1).
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


class DiscoveryError(ValueError):
    """Input that cannot produce discovery names."""


def normalise(value: object, what: str) -> str:
    """Strip blanks and one trailing dot (a fully qualified spelling), lower-case, validate labels."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DiscoveryError("%s must be a string, got %s" % (what, type(value).__name__))
    text = value.strip()
    if text.endswith("."):
        text = text[:-1]
    text = text.lower()
    if not text:
        return ""
    for label in text.split("."):
        if not label:
            raise DiscoveryError(
                "%s %r has an empty label (two dots in a row or a leading dot)" % (what, value)
            )
        if not _LABEL_RE.match(label):
            raise DiscoveryError(
                "%s %r has an invalid label %r: labels are 1-63 letters, digits, '-' or '_', "
                "not starting or ending with '-'" % (what, value, label)
            )
    if len(text) > MAX_FQDN_LENGTH:
        raise DiscoveryError("%s %r is longer than %d characters" % (what, value, MAX_FQDN_LENGTH))
    return text


def variations(name: str) -> list[str]:
    """``a.b.c.d`` -> ``a.b.c.d``, ``b.c.d``, ``c.d``: one level up each time, ending with a single dot."""
    labels = name.split(".") if name else []
    return [".".join(labels[start:]) for start in range(len(labels) - 1)]


def discovery_attempts(prefix: str, domain: str | None = None, hostname: str | None = None) -> list[dict]:
    """One cycle of attempts, in order: the domain (DHCP option 15) variations, then the host name
    (option 12) ones. Each is ``{attempt, fqdn, prefix, dhcp_option, delay}``: its number in the
    cycle (from 1), the name, the DHCP option it derives from, and the seconds the device waits
    before it beyond the previous attempt's timeout (SERIES_DELAY before the first host-name
    attempt that follows domain attempts, else 0)."""
    clean_prefix = normalise(prefix, "prefix")
    if not clean_prefix:
        raise DiscoveryError("prefix must not be empty: DNS-based discovery is off when the prefix is blank")
    clean_domain = normalise(domain, "domain (DHCP option 15)")
    clean_hostname = normalise(hostname, "hostname (DHCP option 12)")
    if not clean_domain and not clean_hostname:
        raise DiscoveryError(
            "domain (DHCP option 15) and hostname (DHCP option 12) are both empty: nothing to try"
        )
    attempts: list[dict] = []
    for option, name in ((15, clean_domain), (12, clean_hostname)):
        for index, base in enumerate(variations(name)):
            fqdn = "%s.%s" % (clean_prefix, base)
            if len(fqdn) > MAX_FQDN_LENGTH:
                raise DiscoveryError("%s is longer than %d characters" % (fqdn, MAX_FQDN_LENGTH))
            attempts.append(
                {
                    "attempt": len(attempts) + 1,
                    "fqdn": fqdn,
                    "prefix": clean_prefix,
                    "dhcp_option": option,
                    "delay": SERIES_DELAY if index == 0 and attempts else 0,
                }
            )
    if not attempts:
        raise DiscoveryError(
            "no name to try: neither domain %r nor hostname %r has a dot, and the last name attempted must "
            "have one" % (clean_domain, clean_hostname)
        )
    return attempts


def discovery_fqdns(prefix: str, domain: str | None = None, hostname: str | None = None) -> list[str]:
    """The names of :func:`discovery_attempts`, in order."""
    return [attempt["fqdn"] for attempt in discovery_attempts(prefix, domain, hostname)]


def resolve(fqdn: str, getaddrinfo=socket.getaddrinfo) -> list[str]:
    """The addresses ``fqdn`` resolves to with this host's resolver (sorted; empty when it does not)."""
    try:
        infos = getaddrinfo(fqdn, None, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError
        return []
    return sorted({info[4][0] for info in infos})
