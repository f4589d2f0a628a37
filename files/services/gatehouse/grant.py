"""Connect-tag grants: what the CM gives a client so that one SG lets it through to one agent.

A grant is sealed with AES-256-GCM under a key derived from the secret that the CM and the SG of
one host share (cmsg.env). Sealing rather than only MAC-ing keeps the agent's session-tag out of
the client's hands. A grant binds the session id, the agent address, the agent's session-tag, the
client address and an expiry of at most 60 s; the SG's :class:`ReplayCache` accepts each once.

Multi-site (docs/multisite.md): the key is derived from the secret *and the site* of the SG that
is to accept the grant, so one secret shared by the CMs and SGs of every site still gives each
site its own key: a grant minted for site B's gateway is refused as forged by site A's SGs, and
the reverse. The empty site (single-site deployments) derives the key it always did.

Tenants (docs/tenants.md): a tenant's grants are sealed under a key derived (HKDF, info naming the
tenant) from the same secret, carry the tenant's name in clear after the prefix (``g1t.<name>.``)
and in the AEAD's associated data. A sealer opens only its own tenant's grants (``wrong-tenant``
otherwise, and a grant relabelled with another name fails authentication); a sealer without a
tenant opens only tenant-less grants, so deployments without tenants keep the ``g1.`` format.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_TTL = 60.0
PREFIX = "g1."
TENANT_PREFIX = "g1t."
_AAD = b"gatehouse connect-tag v1"
MAX_TOKEN_LENGTH = 1024


class GrantError(Exception):
    """The grant is refused; ``reason`` is one of forged, expired, replayed, wrong-client, malformed,
    wrong-tenant."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    session_id: str
    agent_host: str
    agent_port: int
    session_tag: str
    client_ip: str
    expires: float
    nonce: bytes
    tenant: str = ""


def generate_secret() -> str:
    return base64.b64encode(os.urandom(32)).decode("ascii")


def decode_secret(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the grant secret must be base64") from None
    if len(raw) < 32:
        raise ValueError("the grant secret must hold at least 32 bytes of key material")
    return raw


def _key(secret: bytes, site: str = "", *, tenant: str = "") -> AESGCM:
    info = b"gatehouse grant key" + (b"\x00site=" + site.encode("ascii") if site else b"")
    info += (b"\x00tenant=" + tenant.encode("ascii")) if tenant else b""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    return AESGCM(key)


def _norm_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)


class GrantSealer:
    """Mints and opens grants with one derived key (derive once; it is on the hot path): the key of
    ``site``'s gateways (empty: no site) and of ``tenant`` (a tenant name, see gatehouse.tenants;
    empty: no tenant), which also gives the grants their label.
    """

    def __init__(self, secret: bytes, site: str = "", *, tenant: str = "") -> None:
        self.site = site
        self.tenant = tenant
        self._aead = _key(secret, site, tenant=tenant)
        self._prefix = f"{TENANT_PREFIX}{tenant}." if tenant else PREFIX
        self._aad = _AAD + (b"\x00tenant=" + tenant.encode("ascii") if tenant else b"")

    def mint(
        self,
        session_id: str,
        agent_host: str,
        agent_port: int,
        session_tag: str,
        client_ip: str,
        ttl: float = 30.0,
        now: float | None = None,
    ) -> str:
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"grant lifetime must be within (0, {MAX_TTL:.0f}] seconds")
        expires = (time.time() if now is None else now) + ttl
        payload = json.dumps(
            {
                "s": session_id,
                "a": agent_host,
                "p": agent_port,
                "t": session_tag,
                "c": _norm_ip(client_ip),
                "e": round(expires, 3),
            },
            separators=(",", ":"),
        ).encode()
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, payload, self._aad)
        return self._prefix + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str, client_ip: str, now: float | None = None) -> Grant:
        """Authenticate and check a grant; raises GrantError. Replay is the caller's ReplayCache."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise GrantError("malformed")
        if not token.startswith(self._prefix):
            if token.startswith((PREFIX, TENANT_PREFIX)):
                raise GrantError("wrong-tenant")
            raise GrantError("malformed")
        body = token[len(self._prefix) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise GrantError("malformed") from None
        if len(raw) < 12 + 16:
            raise GrantError("malformed")
        nonce, sealed = raw[:12], raw[12:]
        try:
            payload = json.loads(self._aead.decrypt(nonce, sealed, self._aad))
            grant = Grant(
                session_id=str(payload["s"]),
                agent_host=str(payload["a"]),
                agent_port=int(payload["p"]),
                session_tag=str(payload["t"]),
                client_ip=str(payload["c"]),
                expires=float(payload["e"]),
                nonce=nonce,
                tenant=self.tenant,
            )
        except InvalidTag:
            raise GrantError("forged") from None
        except (ValueError, KeyError, TypeError):
            raise GrantError("malformed") from None
        if (time.time() if now is None else now) > grant.expires:
            raise GrantError("expired")
        try:
            if _norm_ip(client_ip) != grant.client_ip:
                raise GrantError("wrong-client")
        except ValueError:
            raise GrantError("wrong-client") from None
        return grant


class ReplayCache:
    """Remembers grant nonces until they expire, so that each grant is accepted once."""

    def __init__(self) -> None:
        self._seen: dict[bytes, float] = {}
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._seen)

    def accept(self, grant: Grant, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now >= self._next_prune:
            self._seen = {n: exp for n, exp in self._seen.items() if exp >= now}
            self._next_prune = now + 5.0
        if grant.nonce in self._seen:
            return False
        self._seen[grant.nonce] = grant.expires
        return True
