"""TLS contexts with the seed's protocol versions and cipher suites.

TLS 1.2 and 1.3 only. TLS 1.3 suites are OpenSSL's defaults, which are exactly the seed's order
(AES-256-GCM, CHACHA20-POLY1305, AES-128-GCM); Python cannot reorder them. The TLS 1.2 lists are
the seed's tables, in its order of preference, enforced with server preference.

Internal identities: every Gatehouse service certificate issued by the deployment CA carries a
role in a URI subject alternative name (``urn:gatehouse:role:cm`` and so on). A server that asks
for client certificates (``client_ca``) verifies them against that CA during the handshake and the
application then decides per route which roles it accepts (:func:`peer_roles`); a peer that sent
no certificate, or one the CA did not sign, has no role.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MIN_RSA_BITS = 2048
ROLE_URI_PREFIX = "urn:gatehouse:role:"
ROLES = frozenset({"broker", "cm", "sg", "agent", "halb"})

# Seed: PCoIP Connection Manager TLS cipher suites (TLS 1.2 part), decreasing preference.
CM_CIPHERS = ":".join(
    [
        "ECDHE-RSA-AES256-GCM-SHA384",  # TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        "ECDHE-RSA-AES128-GCM-SHA256",  # TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        "AES256-GCM-SHA384",  # TLS_RSA_WITH_AES_256_GCM_SHA384
        "AES128-GCM-SHA256",  # TLS_RSA_WITH_AES_128_GCM_SHA256
    ]
)

# Seed: PCoIP Security Gateway supported TLS cipher suites, decreasing preference.
SG_CIPHERS = ":".join(
    [
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-SHA384",  # TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384
        "ECDHE-RSA-AES128-SHA256",  # TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256
        "AES256-GCM-SHA384",
        "AES128-GCM-SHA256",
        "AES256-SHA256",  # TLS_RSA_WITH_AES_256_CBC_SHA256
        "AES128-SHA256",  # TLS_RSA_WITH_AES_128_CBC_SHA256
        "AES256-SHA",  # TLS_RSA_WITH_AES_256_CBC_SHA
        "AES128-SHA",  # TLS_RSA_WITH_AES_128_CBC_SHA
    ]
)

CIPHERS = {"cm": CM_CIPHERS, "sg": SG_CIPHERS, "broker": CM_CIPHERS, "agent": CM_CIPHERS}


class CertificateError(ValueError):
    """The certificate or key cannot be used; the message says why and what is required."""


def check_certificate_file(cert_path: str | Path) -> x509.Certificate:
    """Load the leaf certificate and refuse keys the seed does not support."""
    path = Path(cert_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate {path}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None
    check_public_key(cert, str(path))
    return cert


def check_public_key(cert: x509.Certificate, what: str) -> None:
    key = cert.public_key()
    if isinstance(key, dsa.DSAPublicKey):
        raise CertificateError(
            f"{what}: DSA keys are not supported; use an RSA key of at least {MIN_RSA_BITS} bits"
        )
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise CertificateError(
            f"{what}: RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} bits are required"
        )


class CertificateExpiry(Collector):
    """``gatehouse_tls_certificate_expiry_timestamp_seconds{certificate}``: when each certificate a
    service presents stops being valid (notAfter of the leaf, seconds since the epoch).

    The files are read once, at construction, as the service loads them at its start: the gauge
    shows what the service serves, not a file replaced behind its back (the deployment modules
    restart a service whose certificate file changed). The label is the file's base name.
    A missing or unreadable file is left out rather than failing the service's metrics.
    """

    def __init__(self, certificates: Mapping[str, str | Path]) -> None:
        self.expiry: dict[str, float] = {}
        for name, path in certificates.items():
            if not path:
                continue
            try:
                cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
            except (OSError, ValueError):
                continue
            self.expiry[name] = cert.not_valid_after_utc.timestamp()

    @classmethod
    def of_files(cls, *paths: str | Path) -> CertificateExpiry:
        """The collector of ``paths`` (empty ones are skipped), labelled by their base names."""
        return cls({Path(p).name: p for p in paths if p})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gatehouse_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificates this service presents (seconds since the epoch)",
            labels=["certificate"],
        )
        for name, timestamp in sorted(self.expiry.items()):
            family.add_metric([name], timestamp)
        yield family


def peer_key_bits(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int | None:
    """RSA key size of the peer certificate (None when not RSA or no certificate)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    key = x509.load_der_x509_certificate(der).public_key()
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, what: str) -> None:
    """Refuse a peer (broker, agent) whose certificate key is under 2048 bits, as the seed's CM does."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise CertificateError(f"{what} presented no certificate")
    check_public_key(x509.load_der_x509_certificate(der), what)


def _base(ctx: ssl.SSLContext, role: str) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(CIPHERS[role])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_identity(ctx: ssl.SSLContext, cert_path: str | Path, key_path: str | Path) -> None:
    check_certificate_file(cert_path)
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        raise CertificateError(
            f"{key_path} does not match {cert_path} or is not a PEM key ({exc.reason})"
        ) from None
    except OSError as exc:
        raise CertificateError(f"cannot read {key_path}: {exc.strerror}") from None


def _load_ca(ctx: ssl.SSLContext, ca_file: str | Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise CertificateError(f"cannot load CA certificates from {ca_file}: {reason}") from None


def server_context(
    cert_path: str | Path,
    key_path: str | Path,
    role: str = "cm",
    client_ca: str | Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context; with ``client_ca`` it asks for client certificates signed by that CA.

    Without ``require_client_cert`` a client may still connect without a certificate (the CM's
    users, the admin API's modules): the application checks :func:`peer_roles` where it matters.
    A certificate that is sent but not signed by ``client_ca`` fails the handshake either way.
    """
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), role)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(ctx, cert_path, key_path)
    if client_ca:
        _load_ca(ctx, client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: str | Path | None = None,
    verify: bool = True,
    role: str = "cm",
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca_pem: str | None = None,
) -> ssl.SSLContext:
    """A client context; ``cert``/``key`` is the identity presented to servers that ask for one.

    The CA certificates come from ``ca_file``, else from the PEM text ``ca_pem``, else the system's.
    """
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), role)
    if verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_file:
            _load_ca(ctx, ca_file)
        elif ca_pem:
            try:
                ctx.load_verify_locations(cadata=ca_pem)
            except (ValueError, ssl.SSLError) as exc:
                raise CertificateError(f"the CA certificates cannot be loaded: {exc}") from None
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        _load_identity(ctx, cert, key or cert)
    return ctx


def _verified_san(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[tuple[str, str]]:
    """The subjectAltName entries of a verified peer certificate (none when none was sent).

    ``getpeercert()`` returns the parsed certificate only after the chain was verified against the
    context's CA, so a self-made certificate yields nothing here.
    """
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    return list(cert.get("subjectAltName", ())) if cert else []


def peer_roles(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> frozenset[str]:
    """The Gatehouse roles of a verified peer certificate (empty when none was sent or verified)."""
    named = {
        value.removeprefix(ROLE_URI_PREFIX)
        for kind, value in _verified_san(ssl_object)
        if kind == "URI" and value.startswith(ROLE_URI_PREFIX)
    }
    return frozenset(named & ROLES)


def peer_addresses(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> frozenset[str]:
    """DNS names and IP addresses of a verified peer certificate (empty when none)."""
    return frozenset(
        value.lower() for kind, value in _verified_san(ssl_object) if kind in ("DNS", "IP Address")
    )
