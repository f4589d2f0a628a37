"""Second-level authentication (``SecondFactor``): TOTP codes and RADIUS passcodes.

TOTP (RFC 6238, pyotp): SHA-1, 30-second steps, 6 digits; a code of the current step or of one
step either side is accepted (pyotp's ``valid_window=1``). Secrets are stored encrypted with
AES-GCM under the ``TotpKeyFile`` key (:func:`encrypt_secret`), the associated data binding the
ciphertext to the user's id, so a row copied to another user does not decrypt. A code works once:
the last accepted time step is stored per user and a code whose step is not later is refused
(:meth:`Store.accept_totp_step` is one atomic UPDATE, so two requests with one code cannot both
pass).

RADIUS (RFC 2865, pyrad): a PAP Access-Request with User-Name, User-Password (hidden with the
shared secret), NAS-Identifier and Message-Authenticator; a reply must carry a valid Response
Authenticator and Message-Authenticator (BlastRADIUS, CVE-2024-3596), anything else is ignored
like no reply. Servers are tried in the order of ``RadiusServers``, each ``1 + RadiusRetries``
times with ``RadiusTimeout`` seconds per try. A server that answers only with replies that fail
verification most likely has another shared secret: that is said in the result's detail (never
the secret). An Access-Challenge becomes :data:`CHALLENGE` with its Reply-Message and State; the
next passcode step sends the State back. pyrad's client blocks: requests run on
:data:`RADIUS_WORKERS` threads with a bounded queue (:class:`FactorBusy` beyond it).

Public functions (the integration tests call them against a real FreeRADIUS):
:func:`encrypt_secret`, :func:`decrypt_secret`, :func:`new_secret`, :func:`provisioning_uri`,
:func:`totp_step`, :class:`Totp`, :func:`radius_authenticate`, :class:`Radius`, :func:`radius_check`.
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyotp.exceptions import OTPVerificationError
from pyrad import client as radius_client
from pyrad import packet as radius_packet
from pyrad.dictionary import Dictionary

from gatehouse.broker.directory import CheckLine
from gatehouse.broker.settings import FactorSettings
from gatehouse.broker.store import Store
from gatehouse.broker.workers import BoundedPool, Busy

ACCEPT = "accept"
REJECT = "reject"
CHALLENGE = "challenge"
UNAVAILABLE = "unavailable"
TOTP_STEP = 30
TOTP_DIGITS = 6
TOTP_WINDOW = 1  # steps either side of the current one
_CODE = re.compile(r"^[0-9]{6}$")
_SECRET_VERSION = b"\x01"
_NONCE = 12
RADIUS_WORKERS = 8
RADIUS_QUEUE = 32
MAX_REPLY_MESSAGE = 256
# The attributes Gatehouse sends or reads (RFC 2865, RFC 2869); pyrad needs them by name.
RADIUS_DICTIONARY = """
ATTRIBUTE User-Name 1 string
ATTRIBUTE User-Password 2 string encrypt=1
ATTRIBUTE Reply-Message 18 string
ATTRIBUTE State 24 octets
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Proxy-State 33 octets
ATTRIBUTE Message-Authenticator 80 octets
"""


@dataclass(frozen=True)
class FactorResult:
    """The outcome of one passcode: ACCEPT, REJECT, CHALLENGE (``message``, ``state`` for the next
    step) or UNAVAILABLE (no server could check it). ``detail`` is for the log only."""

    kind: str
    message: str = ""
    state: bytes = field(default=b"", repr=False)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == ACCEPT


class FactorBusy(Busy):
    """Every RADIUS worker is busy and the queue is full: answer 'busy' now."""


# ---------------------------------------------------------------- TOTP


def _aad(user_id: int) -> bytes:
    return b"gatehouse-totp-v1:user:%d" % user_id


def encrypt_secret(key: bytes, user_id: int, secret: str) -> bytes:
    """The stored form of a TOTP secret: version byte, random 96-bit nonce, AES-GCM ciphertext."""
    nonce = os.urandom(_NONCE)
    return _SECRET_VERSION + nonce + AESGCM(key).encrypt(nonce, secret.encode("ascii"), _aad(user_id))


def decrypt_secret(key: bytes, user_id: int, stored: bytes) -> str | None:
    """The secret, or None when ``stored`` was not encrypted with ``key`` for ``user_id``."""
    if not stored.startswith(_SECRET_VERSION) or len(stored) < 1 + _NONCE + 16:
        return None
    nonce, body = stored[1 : 1 + _NONCE], stored[1 + _NONCE :]
    try:
        return AESGCM(key).decrypt(nonce, body, _aad(user_id)).decode("ascii")
    except (InvalidTag, UnicodeDecodeError):
        return None


def new_secret() -> str:
    """A new random TOTP secret: 32 base32 characters (160 bits, RFC 4226's recommended size)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The ``otpauth://totp/...`` URI an authenticator app imports (usually as a QR code)."""
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP).provisioning_uri(
        name=account, issuer_name=issuer
    )


def totp_step(secret: str, code: str, last_step: int, now: float | None = None) -> int | None:
    """The time step ``code`` belongs to (now, or one step either side), if later than ``last_step``.

    pyotp compares in constant time; a malformed code matches nothing.
    """
    if not _CODE.match(code):
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP)
    try:
        step = totp.verify_and_get_timecode(
            code, for_time=time.time() if now is None else now, valid_window=TOTP_WINDOW
        )
    except OTPVerificationError:
        return None
    return step if step > last_step else None


class Totp:
    """TOTP checks against the secrets in the store."""

    def __init__(self, store: Store, key: bytes) -> None:
        self.store = store
        self.key = key

    def check(self, user_id: int | None, code: str, now: float | None = None) -> FactorResult:
        row = self.store.totp(user_id) if user_id is not None else None
        if row is None:
            return FactorResult(REJECT, detail="no TOTP secret enrolled")
        stored, last_step = row
        secret = decrypt_secret(self.key, user_id or 0, stored)
        if secret is None:
            return FactorResult(REJECT, detail="the stored TOTP secret does not decrypt with TotpKeyFile")
        step = totp_step(secret, code, last_step, now)
        if step is None:
            return FactorResult(REJECT, detail="wrong, expired or already used TOTP code")
        with self.store.db.transaction():
            accepted = self.store.accept_totp_step(user_id or 0, step)
        if not accepted:
            return FactorResult(REJECT, detail="TOTP code already used")
        return FactorResult(ACCEPT)


# ---------------------------------------------------------------- RADIUS

_DICTIONARY = Dictionary(io.StringIO(RADIUS_DICTIONARY))


class _Client(radius_client.Client):
    """pyrad's client, counting replies that arrive but fail verification (a shared-secret mismatch)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.invalid_replies = 0

    def _VerifyReply(self, pkt: Any, reply: Any, rawreply: Any, authenticators: Any) -> Any:
        valid, authenticator = super()._VerifyReply(pkt, reply, rawreply, authenticators)
        if not valid:
            self.invalid_replies += 1
        return valid, authenticator


def _client(settings: FactorSettings, host: str, port: int) -> _Client:
    return _Client(
        server=host,
        authport=port,
        secret=settings.radius_secret,
        dict=_DICTIONARY,
        retries=1 + settings.radius_retries,
        timeout=settings.radius_timeout,
        enforce_ma=True,
    )


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_reply(c: _Client, where: str) -> str:
    if c.invalid_replies:
        return (
            f"{where}: replies failed verification (Response Authenticator or Message-Authenticator): "
            "most likely RadiusSecretFile does not match the server's shared secret"
        )
    return f"{where}: no answer"


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:MAX_REPLY_MESSAGE]


def _send(settings: FactorSettings, build: Any) -> tuple[Any, list[str]]:
    """Send the packet ``build(client)`` makes to each server in order; (reply or None, reasons)."""
    reasons: list[str] = []
    for host, port in settings.radius_servers:
        where = _where(host, port)
        c = _client(settings, host, port)
        try:
            return c.SendPacket(build(c)), reasons
        except radius_client.Timeout:
            reasons.append(_no_reply(c, where))
        except (OSError, ValueError, radius_packet.PacketError) as exc:
            reasons.append(f"{where}: {type(exc).__name__}: {exc}")
        finally:
            c._CloseSocket()
    return None, reasons


def radius_authenticate(
    settings: FactorSettings, username: str, passcode: str, state: bytes = b""
) -> FactorResult:
    """One PAP Access-Request (blocking): ACCEPT, REJECT, CHALLENGE or UNAVAILABLE."""
    if not passcode:
        return FactorResult(REJECT, detail="empty passcode")

    def build(c: _Client) -> Any:
        pkt = c.CreateAuthPacket(code=radius_packet.AccessRequest)
        pkt["User-Name"] = username[:253]
        pkt["NAS-Identifier"] = settings.radius_nas_identifier
        pkt["User-Password"] = pkt.PwCrypt(passcode)
        if state:
            pkt["State"] = state
        return pkt

    reply, reasons = _send(settings, build)
    if reply is None:
        return FactorResult(UNAVAILABLE, detail="; ".join(reasons))
    message = _printable(" ".join(str(m) for m in reply.get("Reply-Message", [])))
    if reply.code == radius_packet.AccessAccept:
        return FactorResult(ACCEPT, message)
    if reply.code == radius_packet.AccessReject:
        return FactorResult(REJECT, message, detail="Access-Reject")
    if reply.code == radius_packet.AccessChallenge:
        states = reply.get("State", [])
        return FactorResult(CHALLENGE, message or "Enter the next passcode", states[0] if states else b"")
    return FactorResult(UNAVAILABLE, detail=f"unexpected RADIUS reply code {reply.code}")


class Radius(BoundedPool):
    """RADIUS checks on RADIUS_WORKERS threads; at most RADIUS_QUEUE more wait (then FactorBusy)."""

    def __init__(self, settings: FactorSettings) -> None:
        super().__init__(RADIUS_WORKERS, RADIUS_QUEUE, "radius", FactorBusy)
        self.settings = settings

    async def check(self, username: str, passcode: str, state: bytes = b"") -> FactorResult:
        return await self.run(radius_authenticate, self.settings, username, passcode, state)


def radius_check(settings: FactorSettings) -> list[CheckLine]:
    """A Status-Server (RFC 5997, with Message-Authenticator) to every RADIUS server; one line each."""
    lines = []
    for host, port in settings.radius_servers:
        where = f"radius {_where(host, port)}"
        c = _client(settings, host, port)
        try:
            reply = c.SendPacket(c.CreateAuthPacket(code=radius_packet.StatusServer))
        except radius_client.Timeout:
            lines.append(CheckLine(False, f"radius {_no_reply(c, _where(host, port))}"))
            continue
        except (OSError, ValueError, radius_packet.PacketError) as exc:
            lines.append(CheckLine(False, f"{where}: {type(exc).__name__}: {exc}"))
            continue
        finally:
            c._CloseSocket()
        if reply.code == radius_packet.AccessAccept:
            lines.append(CheckLine(True, f"{where}: Status-Server answered, shared secret verified"))
        else:
            lines.append(CheckLine(False, f"{where}: Status-Server answered with code {reply.code}"))
    return lines
