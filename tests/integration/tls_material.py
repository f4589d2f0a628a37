"""Good and bad TLS material for the certificate checks, made with `cryptography`.

`cryptography` refuses to sign with MD5 or SHA-1, so `resign_legacy()` re-signs a certificate the
way an old CA did: the signature algorithm identifier in the to-be-signed part is swapped for
md5WithRSAEncryption / sha1WithRSAEncryption (same encoded length) and signed with that hash.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, padding, rsa
from cryptography.x509.oid import NameOID

_SHA256_RSA_OID = bytes.fromhex("06092a864886f70d01010b")
_LEGACY_OIDS = {
    "md5": (bytes.fromhex("06092a864886f70d010104"), hashes.MD5()),
    "sha1": (bytes.fromhex("06092a864886f70d010105"), hashes.SHA1()),
}
_KEY_CACHE: dict[tuple[str, int], object] = {}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rsa_key(bits: int = 3072, slot: int = 0) -> rsa.RSAPrivateKey:
    """RSA keys are slow to make; tests share them by (size, slot)."""
    cache_key = (f"rsa{bits}", slot)
    if cache_key not in _KEY_CACHE:
        _KEY_CACHE[cache_key] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEY_CACHE[cache_key]  # type: ignore[return-value]


def dsa_key() -> dsa.DSAPrivateKey:
    return dsa.generate_private_key(key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(
    subject_key,
    cn: str = "cmsg.example.test",
    issuer_key=None,
    issuer_cn: str | None = None,
    sans: list[str] | None = None,
    ca: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    digest=None,
) -> x509.Certificate:
    issuer_key = issuer_key or subject_key
    issuer_cn = issuer_cn or cn
    start = not_before or now() - datetime.timedelta(days=1)
    end = not_after or now() + datetime.timedelta(days=365)
    names: list[x509.GeneralName] = []
    for entry in sans if sans is not None else [cn]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(issuer_cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if digest is None and isinstance(
        issuer_key, (rsa.RSAPrivateKey, dsa.DSAPrivateKey, ec.EllipticCurvePrivateKey)
    ):
        digest = hashes.SHA256()
    return builder.sign(issuer_key, digest)


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(body)) + body


def resign_legacy(cert: x509.Certificate, issuer_key: rsa.RSAPrivateKey, algorithm: str) -> x509.Certificate:
    """The same certificate signed with md5WithRSAEncryption or sha1WithRSAEncryption."""
    oid, hash_algorithm = _LEGACY_OIDS[algorithm]
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(_SHA256_RSA_OID) == 1, "certificate must be signed with sha256WithRSAEncryption"
    tbs = tbs.replace(_SHA256_RSA_OID, oid)
    signature = issuer_key.sign(tbs, padding.PKCS1v15(), hash_algorithm)
    algorithm_identifier = _tlv(0x30, oid + b"\x05\x00")
    der = _tlv(0x30, tbs + algorithm_identifier + _tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(der)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def key_pem(key, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def key_der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


class Chain:
    """root CA -> intermediate CA -> leaf, all RSA."""

    def __init__(self, leaf_cn: str = "cmsg.example.test", leaf_sans: list[str] | None = None) -> None:
        self.root_key = rsa_key(2048, slot=10)
        self.intermediate_key = rsa_key(2048, slot=11)
        self.leaf_key = rsa_key(3072, slot=12)
        self.root = certificate(self.root_key, "Test Root CA", ca=True)
        self.intermediate = certificate(
            self.intermediate_key,
            "Test Intermediate CA",
            issuer_key=self.root_key,
            issuer_cn="Test Root CA",
            ca=True,
        )
        self.leaf = certificate(
            self.leaf_key,
            leaf_cn,
            issuer_key=self.intermediate_key,
            issuer_cn="Test Intermediate CA",
            sans=leaf_sans,
        )
