"""Login throttling (per account and source, per source, per account) and the bounded hashing pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gatehouse.broker import passwords
from gatehouse.broker.throttle import (
    ACCOUNT_LOCKOUT,
    DELAY,
    LOCKOUT,
    SOURCE_LOCKOUT,
    LoginThrottle,
    ThrottlePolicy,
    _Table,
    account_key,
)
from gatehouse.web import source_key

POLICY = ThrottlePolicy(
    delay_after_failures=3,
    max_delay=8.0,
    lockout_after_failures=10,
    source_lockout_after_failures=50,
    account_lockout_after_failures=30,
    lockout_seconds=900.0,
    failure_window=900.0,
)
ALICE = account_key("CORP", "Alice")


def fail(t: LoginThrottle, account: str, source: str, now: float) -> list[str]:
    assert t.check(account, source, now) is None
    return t.failure(account, source, now)


def test_progressive_delay_then_lockout_per_account_and_source() -> None:
    t = LoginThrottle(POLICY)
    now = 1000.0
    for _n in range(2):
        fail(t, ALICE, "198.51.100.7", now)
    # The third failure starts the delay: 1 s, then 2 s, 4 s, 8 s, 8 s ...
    fail(t, ALICE, "198.51.100.7", now)
    assert t.check(ALICE, "198.51.100.7", now + 0.5) == DELAY
    delays = []
    for _n in range(7):
        wait = 0.0
        while t.check(ALICE, "198.51.100.7", now + wait) == DELAY:
            wait += 0.25
        t.release(ALICE, "198.51.100.7")
        delays.append(wait)
        now += wait
        started = fail(t, ALICE, "198.51.100.7", now)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert started == ["account_source"]  # the tenth failure
    assert t.check(ALICE, "198.51.100.7", now + 899) == LOCKOUT
    # Another source is not affected, nor is another account from this source.
    assert t.check(ALICE, "203.0.113.5", now) is None
    assert t.check(account_key("CORP", "bob"), "198.51.100.7", now) is None
    # After the lockout the pair starts over.
    assert t.check(ALICE, "198.51.100.7", now + 901) is None


def test_unknown_accounts_are_counted_like_real_ones() -> None:
    t = LoginThrottle(POLICY)
    ghost = account_key("CORP", "no-such-user")
    for _n in range(3):
        fail(t, ghost, "198.51.100.7", 0.0)
    assert t.check(ghost, "198.51.100.7", 0.1) == DELAY


def test_success_resets_the_pair_but_not_the_source_count() -> None:
    t = LoginThrottle(POLICY)
    for _n in range(2):
        fail(t, ALICE, "198.51.100.7", 0.0)
    assert t.check(ALICE, "198.51.100.7", 0.0) is None
    t.success(ALICE, "198.51.100.7", 0.0)
    for _n in range(2):
        fail(t, ALICE, "198.51.100.7", 0.0)
    assert t.check(ALICE, "198.51.100.7", 0.0) is None  # two, not four
    t.release(ALICE, "198.51.100.7")
    assert t.sources.get("198.51.100.7", 0.0).failures == 4  # type: ignore[union-attr]


def test_password_spraying_locks_the_source() -> None:
    t = LoginThrottle(POLICY)
    started: list[str] = []
    for i in range(50):
        started += fail(t, account_key("CORP", f"user{i}"), "198.51.100.7", 0.0)
    assert started == ["source"]
    assert t.check(account_key("CORP", "user99"), "198.51.100.7", 1.0) == SOURCE_LOCKOUT
    assert t.check(account_key("CORP", "user99"), "203.0.113.5", 1.0) is None
    # A source that is not a verified client address (the CM itself) is never locked as a source.
    t2 = LoginThrottle(POLICY)
    for i in range(60):
        assert t2.check(account_key("CORP", f"u{i}"), "10.0.0.2", 0.0, per_source=False) is None
        t2.failure(account_key("CORP", f"u{i}"), "10.0.0.2", 0.0, per_source=False)


def test_account_lockout_spares_sources_the_account_logged_in_from() -> None:
    t = LoginThrottle(POLICY)
    t.success(ALICE, "192.0.2.10", 0.0)  # alice's own address
    started: list[str] = []
    now = 10.0
    for n in range(3):
        for _n in range(10):
            now += 9.0  # past the longest delay
            started += fail(t, ALICE, f"198.51.100.{n}", now)
    assert started.count("account") == 1
    assert t.check(ALICE, "203.0.113.99", now + 1) == ACCOUNT_LOCKOUT
    assert t.check(ALICE, "192.0.2.10", now + 1) is None


def test_parallel_attempts_never_exceed_the_lockout() -> None:
    t = LoginThrottle(POLICY)
    # One user logging in from several clients at once is not held back...
    for _n in range(5):
        assert t.check(ALICE, "192.0.2.10", 0.0) is None
    for _n in range(5):
        t.success(ALICE, "192.0.2.10", 0.0)
    assert not t.in_flight
    # ...but a burst of guesses gets at most LoginLockoutAfterFailures checks.
    admitted = sum(t.check(ALICE, "198.51.100.7", 0.0) is None for _n in range(50))
    assert admitted == POLICY.lockout_after_failures
    for _n in range(admitted):
        t.failure(ALICE, "198.51.100.7", 0.0)
    assert t.check(ALICE, "198.51.100.7", 1.0) == LOCKOUT
    # Once delayed, one check at a time.
    for _n in range(3):
        fail(t, ALICE, "203.0.113.5", 0.0)
    assert t.check(ALICE, "203.0.113.5", 10.0) is None
    assert t.check(ALICE, "203.0.113.5", 10.0) == DELAY
    t.release(ALICE, "203.0.113.5")
    assert t.check(ALICE, "203.0.113.5", 10.0) is None


def test_tables_are_bounded_and_swept() -> None:
    table: _Table[str] = _Table(failure_window=10.0, cap=100)
    for i in range(1000):
        table.add_failure(f"k{i}", 0.0)
    assert len(table.items) == 100 and "k999" in table.items and "k0" not in table.items
    table.sweep(11.0)
    assert len(table.items) == 0


def test_source_keys() -> None:
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("x" * 500) == "x" * 64
    assert account_key("CORP", "ALICE") == account_key("corp", "alice")


def test_every_spelling_a_directory_matches_is_one_account() -> None:
    # Each of these finds uid=alice in slapd (RFC 4518 matching; tests/security/test_identity.py).
    spellings = ["alice", "ALICE", " alice", "alice ", "alice\t", "\uff41lice", "Alice\u3000"]
    assert {account_key("CORP", name) for name in spellings} == {"corp\\alice"}
    # Inner spaces are joined, not dropped: "al ice" is another name.
    assert account_key("CORP", "al  ice") == account_key("CORP", "al ice") != account_key("CORP", "alice")
    assert len(account_key("CORP", " " * 1000 + "x" * 1000)) == len("corp\\") + 256


UPN = account_key("CORP", "alice.archer@corp.example")  # a second name of alice's directory entry


def fail_as(t: LoginThrottle, typed: str, source: str, now: float) -> list[str]:
    """A failed check of ``typed`` whose lookup found alice's entry (resolved to ALICE)."""
    assert t.check(typed, source, now) is None
    assert t.check_resolved(typed, ALICE, source, now) is None
    return t.failure(typed, source, now, resolved=ALICE)


def test_every_name_of_one_directory_account_shares_its_counters() -> None:
    t = LoginThrottle(POLICY)
    started: list[str] = []
    for n in range(POLICY.lockout_after_failures):
        started += fail_as(t, (ALICE, UPN)[n % 2], "198.51.100.7", 9.0 * n)
    # The resolved pair locks at the lockout count, though neither name alone reached it...
    assert started == ["account_source"]
    now = 9.0 * POLICY.lockout_after_failures
    assert t.check(ALICE, "198.51.100.7", now) == LOCKOUT
    assert t.check(UPN, "198.51.100.7", now) is None  # the name alone is not throttled:
    assert t.check_resolved(UPN, ALICE, "198.51.100.7", now) == LOCKOUT  # its account is
    t.release(UPN, "198.51.100.7")
    assert not t.in_flight
    # ...and from another address alice's account is checked as usual.
    assert t.check(UPN, "203.0.113.5", now) is None
    assert t.check_resolved(UPN, ALICE, "203.0.113.5", now) is None
    assert set(t.in_flight) == {(UPN, "203.0.113.5"), (ALICE, "203.0.113.5")}
    t.success(UPN, "203.0.113.5", now, ALICE)
    assert not t.in_flight


def test_a_name_counts_once_when_it_is_the_account_it_resolves_to() -> None:
    t = LoginThrottle(POLICY)
    for _n in range(POLICY.delay_after_failures - 1):
        fail_as(t, ALICE, "198.51.100.7", 0.0)
    assert t.check(ALICE, "198.51.100.7", 0.0) is None  # not delayed: two failures, not four
    t.release(ALICE, "198.51.100.7", ALICE)
    assert not t.in_flight


def test_the_account_lockout_counts_every_name_and_spares_known_sources() -> None:
    t = LoginThrottle(POLICY)
    t.success(ALICE, "192.0.2.10", 0.0, ALICE)  # alice's own address, her uid typed
    started: list[str] = []
    now = 10.0
    for n in range(POLICY.account_lockout_after_failures):
        now += 9.0
        started += fail_as(t, (ALICE, UPN)[n % 2], f"198.51.100.{n // 5}", now)
    assert started.count("account") == 1
    # Refused under either name from a new address, resolved or not: the account is locked.
    assert t.check(ALICE, "203.0.113.99", now + 1) == ACCOUNT_LOCKOUT
    assert t.check(UPN, "203.0.113.99", now + 1, resolved=ALICE) == ACCOUNT_LOCKOUT
    assert t.check(UPN, "203.0.113.99", now + 1) is None
    assert t.check_resolved(UPN, ALICE, "203.0.113.99", now + 1) == ACCOUNT_LOCKOUT
    t.release(UPN, "203.0.113.99")
    # alice's address is spared under both names.
    assert t.check(UPN, "192.0.2.10", now + 1, resolved=ALICE) is None
    t.release(UPN, "192.0.2.10", ALICE)
    assert t.check(ALICE, "192.0.2.10", now + 1) is None


def test_a_name_that_resolves_to_nothing_keeps_its_own_counters() -> None:
    t = LoginThrottle(POLICY)
    ghost = account_key("CORP", "ghost@corp.example")
    for n in range(POLICY.lockout_after_failures):
        fail(t, ghost, "198.51.100.7", 9.0 * n)
    assert t.check(ghost, "198.51.100.7", 100.0) == LOCKOUT
    assert t.check(ALICE, "198.51.100.7", 100.0) is None


# ---------------------------------------------------------------- hashing


def test_current_parameters_and_rehash_detection() -> None:
    stored = passwords.hash_password("pw")
    assert stored.startswith("scrypt$32768$8$3$")
    assert not passwords.needs_rehash(stored)
    assert passwords.needs_rehash(passwords.hash_password("pw", n=2**14, r=8, p=1))
    assert not passwords.needs_rehash(None)
    # Absurd stored parameters are refused, not computed.
    assert not passwords.verify_password("pw", "scrypt$1073741824$8$1$AAAA$AAAA")


async def test_the_pool_answers_busy_instead_of_queueing() -> None:
    hasher = passwords.Hasher(workers=1, queue=1)
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(hasher.run(gate.wait, 5))
        second = asyncio.ensure_future(hasher.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        assert hasher.pending == 2
        with pytest.raises(passwords.HasherBusy):
            await hasher.verify("pw", "scrypt$x")
        gate.set()
        await asyncio.gather(first, second)
        assert hasher.pending == 0
        assert await hasher.verify("pw", passwords.hash_password("pw", n=2**10, r=8, p=1))
    finally:
        gate.set()
        hasher.close()
