# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""TLS material rules of the connection manager and security gateway, and generation of keys,
requests and self-signed certificates (private to the collection).

The one implementation of both: the certificate module and the deployment modules' self-signed
pairs (_deploy.common.tls_files) use it. Reading and writing files as a module (check mode,
diffs, results) is the certificate module's own business, not this file's.

The rules come from the product documentation of the CM/SG:
- only RSA keys, at least 2048 bits; 3072 bits recommended (warning below);
- DSA (and any other non-RSA) keys refused;
- MD5 signatures refused; SHA-1 refused as well because current TLS stacks reject it;
- base64 PEM files only; DER is converted to PEM when asked to, refused otherwise;
- the key must match the certificate; the chain is leaf first, each certificate followed by its issuer;
- expired or not yet valid certificates are refused, a warning is given close to expiry;
- wildcard certificates are supported and reported.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import traceback

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import file_mode, read_bytes

try:
    import cryptography
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None

MIN_CRYPTOGRAPHY_VERSION = (42, 0)
MIN_RSA_BITS = 2048
RECOMMENDED_RSA_BITS = 3072
MAX_RSA_BITS = 16384
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
REFUSED_SIGNATURE_HASHES = {"md5": "MD5", "sha1": "SHA-1"}
DIGESTS = ("sha256", "sha384", "sha512")
# Characters the product documentation forbids in the organization and organizational unit fields.
FORBIDDEN_ORG_CHARS = "<>~!@#$%^*/\\()?.,&"
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class CertificateError(Exception):
    """Input that cannot be handled at all (unreadable file, wrong format, bad option)."""


def cryptography_too_old() -> bool:
    parts = []
    for piece in cryptography.__version__.split(".")[:2]:
        match = re.match(r"\d+", piece)
        parts.append(int(match.group(0)) if match else 0)
    return tuple(parts) < MIN_CRYPTOGRAPHY_VERSION


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------- loading


def pem_block_types(data: bytes) -> list[str]:
    return [m.group(1).decode("ascii") for m in _PEM_RE.finditer(data)]


def load_certificates(data: bytes, label: str) -> tuple[list, str]:
    """Certificates in ``data`` (PEM: all of them in order; DER: exactly one) and the format."""
    if b"-----BEGIN" in data:
        if "CERTIFICATE" not in pem_block_types(data):
            raise CertificateError("%s is PEM but contains no CERTIFICATE block" % label)
        try:
            return list(x509.load_pem_x509_certificates(data)), "pem"
        except ValueError as exc:
            raise CertificateError("%s holds a malformed PEM certificate: %s" % (label, exc)) from None
    try:
        return [x509.load_der_x509_certificate(data)], "der"
    except ValueError:
        raise CertificateError(
            "%s is neither a PEM nor a DER certificate (a PEM file starts with "
            "-----BEGIN CERTIFICATE-----)" % label
        ) from None


def load_private_key(data: bytes, label: str) -> tuple[object, str]:
    """The private key in ``data`` and its format; encrypted keys are refused."""
    blocks = pem_block_types(data)
    if b"-----BEGIN" in data:
        if "ENCRYPTED PRIVATE KEY" in blocks or b"Proc-Type: 4,ENCRYPTED" in data:
            raise CertificateError(
                "%s is encrypted; the connection manager and security gateway need an "
                "unencrypted key (openssl req -nodes)" % label
            )
        if not any(block.endswith("PRIVATE KEY") for block in blocks):
            raise CertificateError("%s is PEM but contains no PRIVATE KEY block" % label)
        loader, fmt = serialization.load_pem_private_key, "pem"
    else:
        loader, fmt = serialization.load_der_private_key, "der"
    try:
        return loader(data, password=None), fmt
    except TypeError:
        raise CertificateError(
            "%s is encrypted; the connection manager and security gateway need an unencrypted key" % label
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError("%s is not a readable private key: %s" % (label, exc)) from None


def key_kind(public_key) -> tuple[str, int]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size
    if isinstance(public_key, dsa.DSAPublicKey):
        return "DSA", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC (%s)" % public_key.curve.name, public_key.curve.key_size
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448", 456
    return type(public_key).__name__, 0


# ---------------------------------------------------------------- facts


def colon_hex(digest: bytes) -> str:
    return ":".join("%02X" % b for b in digest)


def public_key_fingerprint(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return colon_hex(digest.finalize())


def same_public_key(a, b) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cn(name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def general_names(extensions) -> list[str]:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = []
    for entry in san:
        if isinstance(entry, x509.DNSName):
            names.append("DNS:%s" % entry.value)
        elif isinstance(entry, x509.IPAddress):
            names.append("IP:%s" % entry.value)
        elif isinstance(entry, x509.RFC822Name):
            names.append("email:%s" % entry.value)
        elif isinstance(entry, x509.UniformResourceIdentifier):
            names.append("URI:%s" % entry.value)
        else:
            names.append("other:%s" % entry.value)
    return names


def signature_hash(cert_or_csr) -> str | None:
    try:
        algorithm = cert_or_csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    return algorithm.name if algorithm is not None else None


def signature_algorithm_name(cert_or_csr) -> str:
    oid = cert_or_csr.signature_algorithm_oid
    return getattr(oid, "_name", None) or oid.dotted_string


def wildcard_names(cert) -> list[str]:
    names = [n[4:] for n in general_names(cert.extensions) if n.startswith("DNS:")]
    cn = _cn(cert.subject)
    if cn:
        names.append(cn)
    seen = []
    for name in names:
        if name.startswith("*.") and name not in seen:
            seen.append(name)
    return seen


def is_issued_by(child, parent) -> bool:
    """True when ``parent`` signed ``child`` (names and signature)."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except InvalidSignature:
        return False
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # A signature we cannot verify (e.g. MD5) is judged by the names; the hash rule refuses it anyway.
        return True
    return True


def is_self_signed(cert) -> bool:
    return is_issued_by(cert, cert)


def certificate_facts(cert, fmt: str = "pem", now: datetime.datetime | None = None) -> dict:
    now = now or utcnow()
    kind, bits = key_kind(cert.public_key())
    not_after = cert.not_valid_after_utc
    wildcards = wildcard_names(cert)
    return {
        "subject": cert.subject.rfc4514_string(),
        "common_name": _cn(cert.subject),
        "issuer": cert.issuer.rfc4514_string(),
        "subject_alt_names": general_names(cert.extensions),
        "serial_number": "%X" % cert.serial_number,
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(not_after),
        "days_remaining": int((not_after - now).total_seconds() // 86400),
        "signature_algorithm": signature_algorithm_name(cert),
        "signature_hash": signature_hash(cert),
        "key_type": kind,
        "key_size": bits,
        "is_wildcard": bool(wildcards),
        "wildcard_names": wildcards,
        "self_signed": is_self_signed(cert),
        "fingerprint_sha256": colon_hex(cert.fingerprint(hashes.SHA256())),
        "public_key_fingerprint_sha256": public_key_fingerprint(cert.public_key()),
        "format": fmt,
    }


def mode_text(mode: int | None) -> str | None:
    return "%04o" % mode if mode is not None else None


def private_key_facts(key, path: str | None = None, fmt: str = "pem") -> dict:
    kind, bits = key_kind(key.public_key())
    mode = file_mode(path) if path else None
    return {
        "path": path,
        "key_type": kind,
        "key_size": bits,
        "public_key_fingerprint_sha256": public_key_fingerprint(key.public_key()),
        "mode": mode_text(mode),
        "format": fmt,
    }


# ---------------------------------------------------------------- rules


class Findings:
    """Errors (refuse) and warnings (accept, tell) found while checking TLS material."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def check_key_rules(public_key, what: str, findings: Findings, leaf: bool = True) -> None:
    """The key rules: RSA only, >= 2048 bits, 3072 recommended. CA keys may also be EC."""
    kind, bits = key_kind(public_key)
    if kind == "DSA":
        findings.error(
            "%s has a DSA key: DSA keys are not supported; use an RSA key of at least %d bits (%d recommended)"
            % (what, MIN_RSA_BITS, RECOMMENDED_RSA_BITS)
        )
    elif kind != "RSA":
        if leaf:
            findings.error(
                "%s has a %s key: only RSA keys are supported by the connection manager and security "
                "gateway; use an RSA key of at least %d bits (%d recommended)"
                % (what, kind, MIN_RSA_BITS, RECOMMENDED_RSA_BITS)
            )
    elif bits < MIN_RSA_BITS:
        findings.error(
            "%s has a %d-bit RSA key: at least %d bits are required (%d recommended)"
            % (what, bits, MIN_RSA_BITS, RECOMMENDED_RSA_BITS)
        )
    elif leaf and bits < RECOMMENDED_RSA_BITS:
        findings.warn(
            "%s has a %d-bit RSA key: accepted (minimum %d) but %d bits or more are recommended"
            % (what, bits, MIN_RSA_BITS, RECOMMENDED_RSA_BITS)
        )


def check_signature_rules(cert, what: str, findings: Findings) -> None:
    name = signature_hash(cert)
    if name in REFUSED_SIGNATURE_HASHES:
        findings.error(
            "%s is signed with %s (%s): %s-based signatures are not supported; have it re-issued with SHA-256 or "
            "stronger"
            % (
                what,
                REFUSED_SIGNATURE_HASHES[name],
                signature_algorithm_name(cert),
                REFUSED_SIGNATURE_HASHES[name],
            )
        )


def check_validity(cert, what: str, findings: Findings, warn_days: int, now: datetime.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        findings.error("%s expired on %s" % (what, _iso(cert.not_valid_after_utc)))
    elif cert.not_valid_before_utc > now:
        findings.error("%s is not valid before %s" % (what, _iso(cert.not_valid_before_utc)))
    elif cert.not_valid_after_utc - now < datetime.timedelta(days=warn_days):
        days = (cert.not_valid_after_utc - now).days
        findings.warn(
            "%s expires on %s (in %d days, less than %d)"
            % (what, _iso(cert.not_valid_after_utc), days, warn_days)
        )


def _describe(index: int, cert) -> str:
    return "certificate #%d (%s)" % (index + 1, cert.subject.rfc4514_string() or "empty subject")


def check_chain_order(certs: list, findings: Findings) -> None:
    """Leaf first, each certificate directly followed by its issuer."""
    for index in range(len(certs) - 1):
        child, parent = certs[index], certs[index + 1]
        if is_issued_by(child, parent):
            continue
        issuer_at = [j for j, cand in enumerate(certs) if j != index and is_issued_by(child, cand)]
        if issuer_at:
            findings.error(
                "chain order is wrong: %s is issued by certificate #%d, not by the next one (%s); order the "
                "certificates leaf first, each followed by its issuer"
                % (_describe(index, child), issuer_at[0] + 1, _describe(index + 1, parent))
            )
        else:
            findings.error(
                "chain is broken: %s is not issued by the next one (%s) and its issuer (%s) is not in the chain"
                % (_describe(index, child), _describe(index + 1, parent), child.issuer.rfc4514_string())
            )
        # One broken link explains the following ones; do not repeat it for every position.
        return


class Material:
    """TLS material read from disk, with the rule findings and pending DER -> PEM conversions."""

    def __init__(self) -> None:
        self.findings = Findings()
        self.leaf = None
        self.leaf_format = "pem"
        self.chain: list = []
        self.key = None
        self.key_format = "pem"
        self.conversions: list[tuple[str, bytes, int]] = []

    def facts(self, now: datetime.datetime, key_path: str | None) -> dict:
        result: dict = {}
        if self.leaf is not None:
            result["certificate"] = certificate_facts(self.leaf, self.leaf_format, now)
            result["chain"] = [certificate_facts(c, "pem", now) for c in self.chain]
        if self.key is not None:
            result["privatekey"] = private_key_facts(self.key, key_path, self.key_format)
        return result


def _read(path: str, label: str) -> bytes:
    data = read_bytes(path)
    if data is None:
        raise CertificateError("%s %s does not exist" % (label, path))
    if not data.strip():
        raise CertificateError("%s %s is empty" % (label, path))
    return data


def _der_refused(label: str, path: str) -> str:
    return (
        "%s %s is in DER format; the connection manager and security gateway require base64 PEM. Set "
        "convert_der: true to convert it in place, or run openssl x509 -inform der -in %s -out %s.pem"
        % (label, path, path, os.path.splitext(path)[0])
    )


def inspect_material(
    certificate_path: str,
    privatekey_path: str | None = None,
    chain_path: str | None = None,
    convert_der: bool = False,
    expiry_warn_days: int = 30,
    now: datetime.datetime | None = None,
) -> Material:
    """Read and check certificate, key and chain; every rule violation is collected, nothing is written."""
    now = now or utcnow()
    material = Material()
    findings = material.findings

    data = _read(certificate_path, "certificate")
    certs, fmt = load_certificates(data, "certificate %s" % certificate_path)
    material.leaf, material.leaf_format = certs[0], fmt
    material.chain = certs[1:]
    if fmt == "der":
        if convert_der:
            pem = certs[0].public_bytes(serialization.Encoding.PEM)
            material.conversions.append((certificate_path, pem, file_mode(certificate_path) or PUBLIC_MODE))
        else:
            findings.error(_der_refused("certificate", certificate_path))
    if "PRIVATE KEY" in " ".join(pem_block_types(data)):
        findings.warn(
            "certificate file %s also holds a private key; keep the key in its own file with mode 0600"
            % certificate_path
        )

    if chain_path:
        chain_data = _read(chain_path, "chain")
        chain_certs, chain_fmt = load_certificates(chain_data, "chain %s" % chain_path)
        if chain_fmt == "der":
            if convert_der:
                pem = chain_certs[0].public_bytes(serialization.Encoding.PEM)
                material.conversions.append((chain_path, pem, file_mode(chain_path) or PUBLIC_MODE))
            else:
                findings.error(_der_refused("chain", chain_path))
        # A CA's "certificate with chain" file often starts with the leaf itself.
        if chain_certs and chain_certs[0].fingerprint(hashes.SHA256()) == certs[0].fingerprint(
            hashes.SHA256()
        ):
            chain_certs = chain_certs[1:]
        material.chain.extend(chain_certs)

    ordered = [material.leaf, *material.chain]
    check_key_rules(material.leaf.public_key(), "certificate %s" % certificate_path, findings)
    check_signature_rules(material.leaf, "certificate %s" % certificate_path, findings)
    check_validity(material.leaf, "certificate %s" % certificate_path, findings, expiry_warn_days, now)
    for index, ca_cert in enumerate(material.chain, start=1):
        what = "chain %s" % _describe(index, ca_cert)
        check_key_rules(ca_cert.public_key(), what, findings, leaf=False)
        # The self-signature of a root is never verified by clients, so its hash does not matter.
        if not (index == len(material.chain) and is_self_signed(ca_cert)):
            check_signature_rules(ca_cert, what, findings)
        check_validity(ca_cert, what, findings, expiry_warn_days, now)
    check_chain_order(ordered, findings)

    if privatekey_path:
        key_data = _read(privatekey_path, "private key")
        key, key_fmt = load_private_key(key_data, "private key %s" % privatekey_path)
        material.key, material.key_format = key, key_fmt
        if key_fmt == "der":
            if convert_der:
                pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                material.conversions.append((privatekey_path, pem, KEY_MODE))
            else:
                findings.error(
                    "private key %s is in DER format; the connection manager and security gateway require "
                    "base64 PEM. Set convert_der: true to convert it in place" % privatekey_path
                )
        if key_kind(key.public_key())[0] == "RSA" or key_kind(material.leaf.public_key())[0] == "RSA":
            if not same_public_key(key.public_key(), material.leaf.public_key()):
                findings.error(
                    "private key %s does not match certificate %s (public key %s versus %s)"
                    % (
                        privatekey_path,
                        certificate_path,
                        public_key_fingerprint(key.public_key()),
                        public_key_fingerprint(material.leaf.public_key()),
                    )
                )
        mode = file_mode(privatekey_path)
        if mode is not None and mode & 0o077:
            findings.warn(
                "private key %s has mode %04o; it should be readable by its owner only (0600)"
                % (privatekey_path, mode)
            )
    return material


# ---------------------------------------------------------------- generation


def validate_key_size(bits: int) -> None:
    if bits < MIN_RSA_BITS:
        raise CertificateError(
            "key_size %d is too small: at least %d bits are required (%d recommended)"
            % (bits, MIN_RSA_BITS, RECOMMENDED_RSA_BITS)
        )
    if bits > MAX_RSA_BITS:
        raise CertificateError("key_size %d is larger than %d" % (bits, MAX_RSA_BITS))


def _valid_dns_name(name: str) -> bool:
    if len(name) > 253 or not name:
        return False
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            return False
    return all(_LABEL_RE.match(label) for label in labels)


def parse_subject_alt_names(entries: list[str], common_name: str) -> list:
    """``DNS:name``, ``IP:address`` or bare names/addresses; the common name is always included."""
    result: list = []
    seen: set[str] = set()

    def add(text: str) -> None:
        text = text.strip()
        if not text:
            raise CertificateError("empty subject_alt_names entry")
        kind, colon, value = text.partition(":")
        if colon and kind.upper() in ("DNS", "IP"):
            kind = kind.upper()
        else:
            value = text
            kind = "IP" if _is_ip(text) else "DNS"
        if kind == "IP":
            try:
                general = x509.IPAddress(ipaddress.ip_address(value))
            except ValueError:
                raise CertificateError("subject_alt_names entry %r is not an IP address" % text) from None
            key = "IP:%s" % general.value
        else:
            value = value.rstrip(".").lower()
            if not _valid_dns_name(value):
                raise CertificateError(
                    "subject_alt_names entry %r is not a valid DNS name (a wildcard is allowed only as the "
                    "whole left-most label, e.g. *.example.com)" % text
                )
            general = x509.DNSName(value)
            key = "DNS:%s" % value
        if key not in seen:
            seen.add(key)
            result.append(general)

    add(common_name)
    for entry in entries or []:
        add(entry)
    return result


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build_name(params: dict) -> object:
    common_name = (params.get("common_name") or "").strip()
    if not common_name:
        raise CertificateError("common_name is required")
    if not _is_ip(common_name) and not _valid_dns_name(common_name.rstrip(".").lower()):
        raise CertificateError(
            "common_name %r is not a fully qualified domain name, a wildcard (*.example.com) or an IP address"
            % common_name
        )
    attributes = []
    country = params.get("country_name")
    if country:
        if not re.match(r"^[A-Za-z]{2}$", country):
            raise CertificateError("country_name must be a two-letter ISO code, got %r" % country)
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country.upper()))
    for option, oid in (
        ("state_or_province_name", NameOID.STATE_OR_PROVINCE_NAME),
        ("locality_name", NameOID.LOCALITY_NAME),
        ("organization_name", NameOID.ORGANIZATION_NAME),
        ("organizational_unit_name", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ):
        value = params.get(option)
        if not value:
            continue
        if option.startswith("organization"):
            bad = sorted({c for c in value if c in FORBIDDEN_ORG_CHARS})
            if bad:
                raise CertificateError(
                    "%s %r contains characters that are not allowed (%s)" % (option, value, " ".join(bad))
                )
        attributes.append(x509.NameAttribute(oid, value))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name.rstrip(".")))
    return x509.Name(attributes)


def validate_digest(name: str) -> None:
    if name not in DIGESTS:
        raise CertificateError("digest must be one of %s" % ", ".join(DIGESTS))


def _hash(name: str):
    validate_digest(name)
    return getattr(hashes, name.upper())()


def generate_key(bits: int):
    validate_key_size(bits)
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def service_key_usage():
    """The key usage of a service's certificate: TLS server and client with an RSA key."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def service_extended_key_usage():
    """A service's certificate serves both ends of TLS (its listeners and its calls to others)."""
    return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def private_key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def build_csr(key, name, sans: list, digest: str):
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, _hash(digest))
    )


def build_selfsigned(
    key, name, sans: list, digest: str, valid_days: int, now: datetime.datetime | None = None
):
    now = now or utcnow()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # Backdate a little so clocks that are slightly behind still accept it.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(service_key_usage(), critical=True)
        .add_extension(service_extended_key_usage(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _hash(digest))
    )


def _san_keys(sans: list) -> list[str]:
    return sorted(("IP:%s" % g.value) if isinstance(g, x509.IPAddress) else "DNS:%s" % g.value for g in sans)


def csr_facts(csr) -> dict:
    kind, bits = key_kind(csr.public_key())
    return {
        "subject": csr.subject.rfc4514_string(),
        "common_name": _cn(csr.subject),
        "subject_alt_names": general_names(csr.extensions),
        "signature_algorithm": signature_algorithm_name(csr),
        "signature_hash": signature_hash(csr),
        "key_type": kind,
        "key_size": bits,
        "public_key_fingerprint_sha256": public_key_fingerprint(csr.public_key()),
    }


def load_pem_csr(data: bytes | None):
    """The certificate signing request in ``data``, or None when there is none or it is unreadable."""
    if data is None:
        return None
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        return None


def load_pem_certificate(data: bytes | None):
    """The first certificate in ``data``, or None when there is none or it is unreadable."""
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return None


def to_pem(cert_or_csr) -> bytes:
    return cert_or_csr.public_bytes(serialization.Encoding.PEM)


def summary(cert_or_csr) -> dict:
    """Short description of a certificate or request, for diffs: names and hashes, never key material."""
    result = {
        "subject": cert_or_csr.subject.rfc4514_string(),
        "subject_alt_names": general_names(cert_or_csr.extensions),
        "signature_hash": signature_hash(cert_or_csr),
    }
    if hasattr(cert_or_csr, "not_valid_after_utc"):
        result["not_after"] = _iso(cert_or_csr.not_valid_after_utc)
        result["fingerprint_sha256"] = colon_hex(cert_or_csr.fingerprint(hashes.SHA256()))
    return result


def csr_is_current(csr, key, name, sans: list, digest: str) -> bool:
    """Whether ``csr`` (or None) is a valid request of ``key`` for exactly this subject, SANs and digest."""
    return (
        csr is not None
        and csr.is_signature_valid
        and same_public_key(csr.public_key(), key.public_key())
        and csr.subject == name
        and sorted(general_names(csr.extensions)) == _san_keys(sans)
        and signature_hash(csr) == digest
    )


def selfsigned_is_current(
    cert, key, name, sans: list, digest: str, renew_days: int, now: datetime.datetime
) -> bool:
    """Whether ``cert`` (or None) is the self-signed certificate of ``key`` for exactly this subject,
    SANs and digest, valid now and for at least ``renew_days`` more days."""
    return (
        cert is not None
        and same_public_key(cert.public_key(), key.public_key())
        and cert.subject == name
        and cert.issuer == name
        and sorted(general_names(cert.extensions)) == _san_keys(sans)
        and signature_hash(cert) == digest
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc - now >= datetime.timedelta(days=renew_days)
    )


def selfsigned_pem(
    common_name: str, sans: list[str], bits: int, digest: str, valid_days: int
) -> tuple[bytes, bytes]:
    """A new RSA key and a self-signed server certificate for it: (certificate PEM, PKCS#8 key PEM).

    ``common_name`` and ``sans`` follow the rules of build_name() and parse_subject_alt_names();
    CertificateError when they do not.
    """
    name = build_name({"common_name": common_name})
    alt = parse_subject_alt_names(sans, common_name)
    key = generate_key(bits)
    return to_pem(build_selfsigned(key, name, alt, digest, valid_days)), private_key_pem(key)
