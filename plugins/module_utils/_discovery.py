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
"""

from __future__ import annotations

import re

MAX_FQDN_LENGTH = 253
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


def discovery_fqdns(prefix: str, domain: str | None = None, hostname: str | None = None) -> list[str]:
    """One cycle of attempts: the domain (DHCP option 15) variations, then the host name (option 12) ones."""
    clean_prefix = normalise(prefix, "prefix")
    if not clean_prefix:
        raise DiscoveryError("prefix must not be empty: DNS-based discovery is off when the prefix is blank")
    clean_domain = normalise(domain, "domain (DHCP option 15)")
    clean_hostname = normalise(hostname, "hostname (DHCP option 12)")
    if not clean_domain and not clean_hostname:
        raise DiscoveryError(
            "domain (DHCP option 15) and hostname (DHCP option 12) are both empty: nothing to try"
        )
    attempts = []
    for base in variations(clean_domain) + variations(clean_hostname):
        fqdn = "%s.%s" % (clean_prefix, base)
        if len(fqdn) > MAX_FQDN_LENGTH:
            raise DiscoveryError("%s is longer than %d characters" % (fqdn, MAX_FQDN_LENGTH))
        attempts.append(fqdn)
    if not attempts:
        raise DiscoveryError(
            "no name to try: neither domain %r nor hostname %r has a dot, and the last name attempted must "
            "have one" % (clean_domain, clean_hostname)
        )
    return attempts
