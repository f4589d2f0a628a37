"""Password hashing with scrypt (stdlib): per-user salt, parameters stored with the hash.

Stored form: ``scrypt$<n>$<r>$<p>$<salt b64>$<key b64>``. Verification reads the parameters from
the stored value, so raising the cost later does not invalidate existing hashes; a hash stored
with other parameters than the current ones is replaced at the user's next successful login
(:func:`needs_rehash`).

Parameters: N=2^15, r=8, p=3, one of the equivalent scrypt configurations the OWASP Password
Storage Cheat Sheet lists next to N=2^17, r=8, p=1 ("N=2^15 (32 MiB), r=8 (1024 bytes), p=3").
Memory is 128 * r * N = 32 MiB per hash instead of 128 MiB, so a bounded pool of workers stays
small (4 workers: 128 MiB); the CPU cost is about that of the N=2^17 option (~0.25 s a hash on
one core of the test machine).

All hashing in the broker goes through :class:`Hasher`: a dedicated thread pool with a fixed
number of workers and a bounded number of waiting jobs. When both are full it raises
:class:`HasherBusy` at once instead of queueing without end, so a flood of logins cannot hold
the event loop's default executor or grow a queue past what the workers finish in time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from gatehouse.broker.workers import BoundedPool, Busy

SCHEME = "scrypt"
N = 2**15
R = 8
P = 3
KEY_LEN = 32
SALT_LEN = 16
# Stored parameters above these are refused rather than computed (a hash is only ever written by
# this broker; anything larger is damage, and would take unbounded memory or time).
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _maxmem(n: int, r: int) -> int:
    # scrypt needs 128 * r * n bytes plus a little; hashlib refuses anything above maxmem.
    return 128 * r * n + 4 * 1024 * 1024


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = secrets.token_bytes(SALT_LEN)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r), dklen=KEY_LEN
    )
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def _parse(stored: str) -> tuple[int, int, int, str, str] | None:
    """(n, r, p, salt b64, key b64) of a stored value with parameters in bounds, else None."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if not (1 < n <= _MAX_N and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        return None
    return n, r, p, parts[4], parts[5]


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches ``stored``; a missing or unreadable hash never matches."""
    parsed = _parse(stored) if stored else None
    if parsed is None:
        return False
    n, r, p, salt_b64, key_b64 = parsed
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(key_b64, validate=True)
        key = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(key, expected)


def needs_rehash(stored: str | None) -> bool:
    """True when ``stored`` was made with other parameters than the current N, r, p."""
    if not stored:
        return False
    parsed = _parse(stored)
    return parsed is None or parsed[:3] != (N, R, P)


def dummy_hash() -> str:
    """A stored-form value no password matches, verified for unknown users so they cost the same as
    known ones: the current parameters with a random salt and a random key (no scrypt to make it)."""
    return f"{SCHEME}${N}${R}${P}${_b64(secrets.token_bytes(SALT_LEN))}${_b64(secrets.token_bytes(KEY_LEN))}"


class HasherBusy(Busy):
    """Every scrypt worker is busy and the queue is full: answer 'busy' now instead of waiting."""


class Hasher(BoundedPool):
    """scrypt on ``workers`` threads, at most ``queue`` jobs waiting (see :class:`BoundedPool`)."""

    def __init__(self, workers: int, queue: int) -> None:
        super().__init__(workers, queue, "scrypt", HasherBusy)

    async def verify(self, password: str, stored: str | None) -> bool:
        return await self.run(verify_password, password, stored)

    async def hash(self, password: str) -> str:
        return await self.run(hash_password, password)
