# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Certificates of a node from the deployment CA (private to the collection).

The node_certificates action and module share this file: the module makes the keys and the
requests on the node (a key never leaves it), the action signs on the controller, where the CA's
key is. One implementation of what a node certificate holds:

- the subject's common name is the first DNS name, or the first IP address without one;
- the subject alternative names are the DNS names, the IP addresses and the URI
  ``urn:gatehouse:role:<role>`` (the services accept a peer by that role);
- key usage digitalSignature and keyEncipherment, extended key usage serverAuth and clientAuth;
- an RSA key of KEY_BITS bits.

A current certificate is kept when it was issued by the CA, holds the request's key, subject and
names, and is still valid ``renew_days`` from now; otherwise the request is signed again.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets

from ansible_collections.gatehouse.access.plugins.module_utils._crypto.certificate import (
    is_issued_by,
    same_public_key,
    service_extended_key_usage,
    service_key_usage,
    utcnow,
)

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
except ImportError:  # reported by the callers (certificate.HAS_CRYPTOGRAPHY)
    pass

KEY_BITS = 3072
ROLES = ("broker", "cm", "sg", "agent", "halb", "database")
ROLE_URI = "urn:gatehouse:role:"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Issued certificates start this long ago: a node whose clock is a little behind accepts them.
BACKDATE = datetime.timedelta(minutes=5)


# The module's options; the action plugin validates the task's arguments with the same spec.
ARGUMENT_SPEC = {
    "ca_dir": {"type": "path", "required": True},
    "directory": {"type": "path", "required": True},
    "certificates": {
        "type": "list",
        "elements": "dict",
        "required": True,
        "options": {
            "name": {"type": "str", "required": True},
            "role": {"type": "str", "required": True, "choices": list(ROLES)},
            "names": {"type": "list", "elements": "str", "default": []},
            "dns": {"type": "list", "elements": "str", "default": []},
            "ips": {"type": "list", "elements": "str", "default": []},
            "cert_path": {"type": "path"},
            "key_path": {"type": "path"},
        },
    },
    "owner": {"type": "str", "default": "10001"},
    "group": {"type": "str", "default": "10001"},
    "cert_days": {"type": "int", "default": 825},
    "renew_days": {"type": "int", "default": 30},
    "ca_certificate": {"type": "str"},
    "issued": {"type": "dict"},
}


def told_apart(entry: dict) -> dict:
    """``entry`` with its ``names`` told apart into ``dns`` and ``ips`` (each in the order given)."""
    dns, ips = list(entry.get("dns") or []), list(entry.get("ips") or [])
    for name in entry.get("names") or []:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
        else:
            ips.append(name)
    return dict(entry, names=[], dns=dns, ips=ips)


def entry_paths(directory: str, entry: dict) -> tuple[str, str]:
    """The certificate's and the key's file of ``entry`` on the node."""
    cert = entry.get("cert_path") or "%s/%s.pem" % (directory, entry["name"])
    key = entry.get("key_path") or "%s/%s.key" % (directory, entry["name"])
    return cert, key


def alt_names(entry: dict) -> list:
    names: list = [x509.DNSName(name) for name in entry["dns"]]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in entry["ips"]]
    names.append(x509.UniformResourceIdentifier(ROLE_URI + entry["role"]))
    return names


def request_for(entry: dict, key) -> bytes:
    """The PEM certificate request of ``entry`` (name, role, dns, ips) signed with ``key``."""
    common_name = (entry["dns"] + entry["ips"])[0]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName(alt_names(entry)), critical=False)
        .add_extension(service_key_usage(), critical=False)
        .add_extension(service_extended_key_usage(), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _san(obj) -> list:
    try:
        return list(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def keeps(current_pem: str | None, csr_pem: str, ca_cert, renew_days: int) -> bool:
    """Whether the current certificate still serves the request (see the module docstring)."""
    if not current_pem:
        return False
    try:
        current = x509.load_pem_x509_certificate(current_pem.encode("ascii"))
    except ValueError:
        return False
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    return (
        is_issued_by(current, ca_cert)
        and same_public_key(current.public_key(), csr.public_key())
        and current.subject == csr.subject
        and _san(current) == _san(csr)
        and current.not_valid_after_utc > utcnow() + datetime.timedelta(days=renew_days)
    )


def issue(csr_pem: str, ca_cert, ca_key, days: int) -> str:
    """The PEM certificate for the request, signed by the CA, valid ``days`` days."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    if not csr.is_signature_valid:
        raise ValueError("the certificate request's signature does not verify")
    now = utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
