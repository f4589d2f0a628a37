"""Password hashing with scrypt (stdlib): per-user salt, parameters stored with the hash.

Stored form: ``scrypt$<n>$<r>$<p>$<salt b64>$<key b64>``. Verification reads the parameters from
the stored value, so raising the cost later does not invalidate existing hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N = 2**14
R = 8
P = 1
KEY_LEN = 32
SALT_LEN = 16
# 128 * r * n bytes are needed (16 MiB for the defaults); allow headroom for stronger stored parameters.
_MAXMEM = 128 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = secrets.token_bytes(SALT_LEN)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=KEY_LEN)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches ``stored``; a missing or unreadable hash never matches."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt_b64, key_b64 = stored.split("$")
        if scheme != SCHEME:
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(key_b64, validate=True)
        key = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(key, expected)


def dummy_hash() -> str:
    """A hash of a random password, verified for unknown users so they cost the same as known ones."""
    return hash_password(secrets.token_urlsafe(24))
