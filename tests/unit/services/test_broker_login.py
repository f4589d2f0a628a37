"""The broker's authenticate step: throttling answers, busy pool, transparent rehash (no network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gatehouse import protocol as p
from gatehouse.broker import passwords
from gatehouse.broker.db import Database
from gatehouse.broker.metrics import BrokerMetrics
from gatehouse.broker.settings import BrokerSettings
from gatehouse.broker.store import Store
from gatehouse.broker.xmlapi import BrokerEndpoint, BrokerSession
from gatehouse.config import Config

PASSWORD = "Correct-Horse-7731"
WEAK = {"n": 2**10, "r": 8, "p": 1}  # an old hash, cheap for the test


@pytest.fixture
def endpoint(tmp_path: Path):
    settings = BrokerSettings.from_config(
        Config(
            {
                "AdminToken": "admin-token-0123456789",
                "ClientCaCert": "/unused/ca.pem",
                "LoginDelayAfterFailures": "2",
                "LoginLockoutAfterFailures": "3",
            },
            {},
        )
    )
    db = Database.open(tmp_path / "b.db")
    store = Store(db)
    store.sync_domains(["CORP"])
    with db.transaction():
        store.put_user("CORP", "alice", {}, passwords.hash_password(PASSWORD, **WEAK))
    hasher = passwords.Hasher(workers=1, queue=0)
    ep = BrokerEndpoint(store, settings, BrokerMetrics(), hasher)
    yield ep
    hasher.close()
    db.close()


def session(source: str = "192.0.2.10") -> BrokerSession:
    return BrokerSession("cookie", "sid", source, time.monotonic(), source=source, source_trusted=True)


async def test_a_weak_stored_hash_is_replaced_at_login(endpoint: BrokerEndpoint) -> None:
    reply = await endpoint._authenticate(session(), p.Authenticate("alice", PASSWORD, "CORP"))
    assert isinstance(reply, p.AuthenticateResp) and reply.result_id == p.AUTH_OK
    stored = endpoint.store.user_record("CORP", "alice").password_hash  # type: ignore[union-attr]
    assert stored.startswith(f"scrypt${passwords.N}${passwords.R}${passwords.P}$")
    assert passwords.verify_password(PASSWORD, stored)


async def test_throttled_answers_equal_wrong_password_answers(endpoint: BrokerEndpoint) -> None:
    answers = [
        await endpoint._authenticate(session(), p.Authenticate(user, "wrong", "CORP"))
        # alice last: her 1 s delay must still run at the check below, however slow scrypt is here.
        for user in ("ghost", "ghost", "ghost", "alice", "alice", "alice")
    ]
    assert len({(a.result_id, a.result_str) for a in answers}) == 1  # type: ignore[attr-defined]
    # The third attempt for each account came inside the delay: refused without a check.
    throttled = endpoint.metrics.login_throttled.labels("delay")._value.get()
    assert throttled == 2
    # The right password from the guessing source is refused too; from another source it works.
    blocked = await endpoint._authenticate(session(), p.Authenticate("alice", PASSWORD, "CORP"))
    assert blocked.result_id == p.AUTH_FAILED  # type: ignore[attr-defined]
    ok = await endpoint._authenticate(session("198.51.100.1"), p.Authenticate("alice", PASSWORD, "CORP"))
    assert ok.result_id == p.AUTH_OK  # type: ignore[attr-defined]


async def test_a_full_hashing_pool_answers_busy(endpoint: BrokerEndpoint, monkeypatch) -> None:
    async def full(_password: str, _stored: str | None) -> bool:
        raise passwords.HasherBusy("full")

    monkeypatch.setattr(endpoint.hasher, "verify", full)
    with pytest.raises(p.ProtocolError) as err:
        await endpoint._authenticate(session(), p.Authenticate("alice", PASSWORD, "CORP"))
    assert err.value.result_id == p.E_BUSY
    assert not endpoint.throttle.in_flight  # a busy answer holds nothing back
