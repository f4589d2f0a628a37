"""Login throttling: progressive delay, then lockout, per account and source, per source, per account.

Three failure counters, each over ``LoginFailureWindow`` seconds from its first failure:

* (account, source): from ``LoginDelayAfterFailures`` failures on, the next attempt is not
  checked before 1 s, 2 s, 4 s … (at most ``LoginMaxDelay``) have passed since the last failure;
  at ``LoginLockoutAfterFailures`` the pair is locked for ``LoginLockoutSeconds``. This is what
  stops guessing one password; it never affects the same account from another source, so an
  attacker cannot lock a user out from where the user logs in.
* source: ``LoginSourceLockoutAfterFailures`` failures over any accounts (password spraying)
  lock the source for ``LoginLockoutSeconds``. Only applied when the source is a client address
  an authenticated CM reported; otherwise the "source" is the CM itself and locking it would
  lock out everyone behind it.
* account: ``LoginAccountLockoutAfterFailures`` failures from all sources together (a much
  larger number: it takes many sources, each stopped at the pair limit, to reach it) lock the
  account for ``LoginLockoutSeconds`` — except from sources the account has logged in from
  successfully before (remembered for :data:`KNOWN_SOURCE_TTL`), so even a distributed attack
  does not lock the user out from a known address.

An account is the name as typed (normalised: :func:`account_key`) and, once a directory lookup
has found the entry, also the account it resolved to (``resolved``: the key of the entry's user
attribute, so every name that finds one entry — ``alice``, ``alice@corp.example`` as
userPrincipalName — counts against one (account, source) pair and one account-wide counter). A
failure counts against both (once when they are the same); an attempt is refused when either is
throttled. A name that resolves to nothing has only its typed key, so unknown names are throttled
as before. Sources known for either key are spared the account-wide lockout of that key.

Checks running at the same time for one (account, source) count against its lockout, so a burst
of parallel guesses gets no more checks than sequential ones; once the pair is delayed, its checks
run one at a time. The source and account counters do not hold checks back (several users behind
one address log in at once); their overshoot is bounded by the hashing pool (workers + queue).

An attempt refused here is answered exactly like a wrong password and costs no scrypt; it does
not count as a failure (a locked-out attacker cannot push the account-wide counter). Unknown
account names are counted like real ones, so the answers tell nothing about which exist.

Memory is bounded: each table holds at most :data:`MAX_ENTRIES` keys; the least recently
touched key is evicted first, and keys whose window and block have passed are swept.
IPv6 sources are counted per /64, the block one client usually holds.

Where the counters live: in memory (one broker: SQLite, the default) or, given a Database, in
its tables ``login_failures`` and ``login_known_sources`` (:class:`_DbTable`, :class:`_DbKnown`:
what the broker uses on PostgreSQL), so every broker node of one database counts against the same
numbers and a lockout started on one node holds on all. A failure or success is counted in one
write transaction (the writers' lock orders them across nodes); times are then wall-clock
seconds (``clock``), which all nodes share, instead of this process's monotonic clock. The
checks in flight stay per node (they only bound one node's parallel checks): with N nodes a
burst of parallel guesses gets at most N times LoginLockoutAfterFailures checks before the shared
counter locks the pair. The database tables are bounded like the memory ones (swept, and at
most :data:`MAX_ENTRIES` rows per scope, the oldest dropped first).
"""

from __future__ import annotations

import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from gatehouse.broker.db import Database

MAX_ENTRIES = 50_000
MAX_NAME = 256  # characters of a user name that count in its key
KNOWN_SOURCE_TTL = 30 * 86400.0
SWEEP_EVERY = 60.0
K = TypeVar("K")

# Reasons an attempt is refused unchecked (metric label values).
DELAY = "delay"
LOCKOUT = "lockout"
SOURCE_LOCKOUT = "source_lockout"
ACCOUNT_LOCKOUT = "account_lockout"
REASONS = (DELAY, LOCKOUT, SOURCE_LOCKOUT, ACCOUNT_LOCKOUT)
# Scopes of a lockout that starts (metric label values).
PAIR_SCOPE = "account_source"
SOURCE_SCOPE = "source"
ACCOUNT_SCOPE = "account"
SCOPES = (PAIR_SCOPE, SOURCE_SCOPE, ACCOUNT_SCOPE)


@dataclass(frozen=True)
class ThrottlePolicy:
    """The ``Login*`` keys of broker.properties (``settings.login.<field>`` is ``Login<Field>``)."""

    delay_after_failures: int = 3
    max_delay: float = 8.0
    lockout_after_failures: int = 10
    source_lockout_after_failures: int = 50
    account_lockout_after_failures: int = 100
    lockout_seconds: float = 900.0
    failure_window: float = 900.0


@dataclass
class _Count:
    failures: int
    first: float
    blocked_until: float = 0.0


class _Table(Generic[K]):
    """Failure counters by key, least recently touched first, at most MAX_ENTRIES of them."""

    def __init__(self, failure_window: float, cap: int = MAX_ENTRIES) -> None:
        self.failure_window = failure_window
        self.cap = cap
        self.items: OrderedDict[K, _Count] = OrderedDict()

    def get(self, key: K, now: float) -> _Count | None:
        count = self.items.get(key)
        if count is not None and self._expired(count, now):
            del self.items[key]
            return None
        return count

    def _expired(self, count: _Count, now: float) -> bool:
        return now - count.first > self.failure_window and now >= count.blocked_until

    def add_failure(self, key: K, now: float) -> _Count:
        count = self.get(key, now)
        if count is None:
            count = _Count(0, now)
            self.items[key] = count
            while len(self.items) > self.cap:
                self.items.popitem(last=False)
        count.failures += 1
        self.items.move_to_end(key)
        return count

    def block(self, key: K, until: float) -> None:
        count = self.items.get(key)
        if count is not None:
            count.blocked_until = until

    def forget(self, key: K) -> None:
        self.items.pop(key, None)

    def sweep(self, now: float) -> None:
        for key in [k for k, c in self.items.items() if self._expired(c, now)]:
            del self.items[key]

    def __len__(self) -> int:
        return len(self.items)


class _Known:
    """When each (account, source) last logged in successfully, at most MAX_ENTRIES of them."""

    def __init__(self) -> None:
        self.items: OrderedDict[tuple[str, str], float] = OrderedDict()

    def seen(self, account: str, source: str) -> float | None:
        return self.items.get((account, source))

    def remember(self, account: str, source: str, now: float) -> None:
        self.items[(account, source)] = now
        self.items.move_to_end((account, source))
        while len(self.items) > MAX_ENTRIES:
            self.items.popitem(last=False)

    def sweep(self, now: float) -> None:
        for key in [k for k, seen in self.items.items() if now - seen > KNOWN_SOURCE_TTL]:
            del self.items[key]

    def __len__(self) -> int:
        return len(self.items)


def _pair(key: tuple[str, str]) -> tuple[str, str]:
    return key


def _source(key: str) -> tuple[str, str]:
    return ("", key)


def _account(key: str) -> tuple[str, str]:
    return (key, "")


class _DbTable(Generic[K]):
    """A :class:`_Table` in ``login_failures``: the rows of one scope. Writes (add_failure,
    block, forget, sweep) run inside the caller's transaction."""

    def __init__(
        self, db: Database, scope: str, split: Callable[[K], tuple[str, str]], failure_window: float
    ) -> None:
        self.db = db
        self.scope = scope
        self.split = split
        self.failure_window = failure_window
        self.cap = MAX_ENTRIES

    def _where(self, key: K) -> tuple[str, str, str]:
        account, source = self.split(key)
        return (self.scope, account, source)

    def get(self, key: K, now: float) -> _Count | None:
        row = self.db.one(
            "SELECT failures, first_at, blocked_until FROM login_failures "
            "WHERE scope = ? AND account = ? AND source = ?",
            self._where(key),
        )
        if row is None:
            return None
        count = _Count(int(row[0]), float(row[1]), float(row[2]))
        expired = now - count.first > self.failure_window and now >= count.blocked_until
        return None if expired else count

    def add_failure(self, key: K, now: float) -> _Count:
        count = self.get(key, now) or _Count(0, now)
        count.failures += 1
        self.db.conn.execute(
            "INSERT INTO login_failures (scope, account, source, failures, first_at, blocked_until) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, account, source) DO UPDATE SET "
            "failures = excluded.failures, first_at = excluded.first_at, "
            "blocked_until = excluded.blocked_until",
            (*self._where(key), count.failures, count.first, count.blocked_until),
        )
        return count

    def block(self, key: K, until: float) -> None:
        self.db.conn.execute(
            "UPDATE login_failures SET blocked_until = ? WHERE scope = ? AND account = ? AND source = ?",
            (until, *self._where(key)),
        )

    def forget(self, key: K) -> None:
        self.db.conn.execute(
            "DELETE FROM login_failures WHERE scope = ? AND account = ? AND source = ?", self._where(key)
        )

    def sweep(self, now: float) -> None:
        conn = self.db.conn
        conn.execute(
            "DELETE FROM login_failures WHERE scope = ? AND first_at < ? AND blocked_until <= ?",
            (self.scope, now - self.failure_window, now),
        )
        conn.execute(
            "DELETE FROM login_failures WHERE scope = ? AND first_at <= (SELECT first_at FROM "
            "login_failures WHERE scope = ? ORDER BY first_at DESC LIMIT 1 OFFSET ?)",
            (self.scope, self.scope, self.cap),
        )

    def __len__(self) -> int:
        row = self.db.one("SELECT COUNT(*) FROM login_failures WHERE scope = ?", (self.scope,))
        return int(row[0]) if row else 0


class _DbKnown:
    """A :class:`_Known` in ``login_known_sources``; writes inside the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def seen(self, account: str, source: str) -> float | None:
        row = self.db.one(
            "SELECT seen_at FROM login_known_sources WHERE account = ? AND source = ?", (account, source)
        )
        return float(row[0]) if row else None

    def remember(self, account: str, source: str, now: float) -> None:
        self.db.conn.execute(
            "INSERT INTO login_known_sources (account, source, seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT (account, source) DO UPDATE SET seen_at = excluded.seen_at",
            (account, source, now),
        )

    def sweep(self, now: float) -> None:
        conn = self.db.conn
        conn.execute("DELETE FROM login_known_sources WHERE seen_at < ?", (now - KNOWN_SOURCE_TTL,))
        conn.execute(
            "DELETE FROM login_known_sources WHERE seen_at <= (SELECT seen_at FROM login_known_sources "
            "ORDER BY seen_at DESC LIMIT 1 OFFSET ?)",
            (MAX_ENTRIES,),
        )

    def __len__(self) -> int:
        row = self.db.one("SELECT COUNT(*) FROM login_known_sources")
        return int(row[0]) if row else 0


def account_key(domain: str, username: str) -> str:
    """The account a login attempt counts against: one key for every spelling a directory matches.

    An LDAP directory compares user names as RFC 4518 prepares them: compatibility forms unified
    (a fullwidth letter is its ASCII letter), case folded, leading and trailing spaces dropped,
    inner runs of spaces joined. Were the key the name as sent, each spelling would have counters
    of its own and "alice", "ALICE" and a fullwidth "alice" would each get the full number of
    guesses.
    """
    # The request body bounds the work (64 KiB); longer names never reach a directory anyway.
    name = " ".join(unicodedata.normalize("NFKC", username).casefold().split())[:MAX_NAME]
    return f"{domain.lower()[:64]}\\{name}"


class LoginThrottle:
    """The throttle; ``db`` given, its counters live in that database (module doc)."""

    def __init__(self, policy: ThrottlePolicy, db: Database | None = None) -> None:
        self.policy = policy
        self.db = db
        self.pairs: _Table[tuple[str, str]] | _DbTable[tuple[str, str]]
        self.sources: _Table[str] | _DbTable[str]
        self.accounts: _Table[str] | _DbTable[str]
        self.known: _Known | _DbKnown
        if db is None:
            self.clock: Callable[[], float] = time.monotonic
            self.pairs = _Table(policy.failure_window)
            self.sources = _Table(policy.failure_window)
            self.accounts = _Table(policy.failure_window)
            self.known = _Known()
        else:
            self.clock = time.time
            self.pairs = _DbTable(db, PAIR_SCOPE, _pair, policy.failure_window)
            self.sources = _DbTable(db, SOURCE_SCOPE, _source, policy.failure_window)
            self.accounts = _DbTable(db, ACCOUNT_SCOPE, _account, policy.failure_window)
            self.known = _DbKnown(db)
        # Checks running per pair. They count as failures-to-be against the lockout, so parallel
        # guesses never get more than LoginLockoutAfterFailures checks; parallel logins of a pair
        # without failures (one user, several clients) are not held back.
        self.in_flight: dict[tuple[str, str], int] = {}
        self._last_sweep = 0.0

    def __len__(self) -> int:
        return len(self.pairs) + len(self.sources) + len(self.accounts) + len(self.known)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The counters' writes of one call: one transaction in the database, none in memory."""
        if self.db is None:
            yield
        else:
            with self.db.transaction():
                yield

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_EVERY:
            return
        self._last_sweep = now
        with self._writing():
            for table in (self.pairs, self.sources, self.accounts):
                table.sweep(now)
            self.known.sweep(now)

    def _known(self, account: str, source: str, now: float) -> bool:
        seen = self.known.seen(account, source)
        return seen is not None and now - seen <= KNOWN_SOURCE_TTL

    def check(
        self, account: str, source: str, now: float, *, per_source: bool = True, resolved: str = ""
    ) -> str | None:
        """Why this attempt must be refused unchecked, or None when it may be checked.

        ``resolved``: the account an earlier step of the login resolved the name to. None marks
        the pairs in flight until :meth:`failure`, :meth:`success` or :meth:`release`.
        """
        self._sweep(now)
        reason = self._refusal(account, source, now, per_source)
        if reason is None:
            reason = self.check_resolved(account, resolved, source, now)
            if reason is None:
                self._enter(account, source)
        return reason

    def check_resolved(self, account: str, resolved: str, source: str, now: float) -> str | None:
        """During a check admitted for ``account``: why it must end unchecked now that its name
        resolved to ``resolved``, or None (then that pair is in flight too, released with it)."""
        if not resolved or resolved == account:
            return None
        reason = self._refusal(resolved, source, now, per_source=False)
        if reason is None:
            self._enter(resolved, source)
        return reason

    def _enter(self, account: str, source: str) -> None:
        key = (account, source)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1

    def release(self, account: str, source: str, resolved: str = "") -> None:
        """The check ended (also: did not run to a result, e.g. a busy hashing pool)."""
        for name in _keys(account, resolved):
            key = (name, source)
            left = self.in_flight.get(key, 0) - 1
            if left > 0:
                self.in_flight[key] = left
            else:
                self.in_flight.pop(key, None)

    def _refusal(self, account: str, source: str, now: float, per_source: bool) -> str | None:
        p = self.policy
        pair = self.pairs.get((account, source), now)
        failures = pair.failures if pair is not None else 0
        if pair is not None and now < pair.blocked_until:
            return LOCKOUT if failures >= p.lockout_after_failures else DELAY
        running = self.in_flight.get((account, source), 0)
        if running and (failures >= p.delay_after_failures or failures + running >= p.lockout_after_failures):
            return DELAY  # once delayed, one check at a time; never more checks than the lockout allows
        if per_source:
            src = self.sources.get(source, now)
            if src is not None and now < src.blocked_until:
                return SOURCE_LOCKOUT
        acct = self.accounts.get(account, now)
        if acct is not None and now < acct.blocked_until and not self._known(account, source, now):
            return ACCOUNT_LOCKOUT
        return None

    def failure(
        self, account: str, source: str, now: float, *, per_source: bool = True, resolved: str = ""
    ) -> list[str]:
        """Count a checked, failed attempt (against ``resolved`` too); the scopes of the lockouts
        it starts, each once."""
        self.release(account, source, resolved)
        p = self.policy
        started: list[str] = []

        def count(table: _Table[K] | _DbTable[K], key: K, lock_at: int, scope: str) -> _Count:
            entry = table.add_failure(key, now)
            if entry.failures >= lock_at:
                if entry.blocked_until <= now and scope not in started:
                    started.append(scope)
                entry.blocked_until = now + p.lockout_seconds
                table.block(key, entry.blocked_until)
            return entry

        with self._writing():
            for name in _keys(account, resolved):
                pair = count(self.pairs, (name, source), p.lockout_after_failures, PAIR_SCOPE)
                if p.delay_after_failures <= pair.failures < p.lockout_after_failures:
                    pair.blocked_until = now + min(
                        p.max_delay, 2.0 ** (pair.failures - p.delay_after_failures)
                    )
                    self.pairs.block((name, source), pair.blocked_until)
                count(self.accounts, name, p.account_lockout_after_failures, ACCOUNT_SCOPE)
            if per_source:
                count(self.sources, source, p.source_lockout_after_failures, SOURCE_SCOPE)
        return started

    def success(self, account: str, source: str, now: float, resolved: str = "") -> None:
        """A checked, successful login: the pairs start over and the source becomes known.

        The source and account counters stay: a valid login of the attacker's own must not wipe
        the evidence of spraying from that source.
        """
        self.release(account, source, resolved)
        with self._writing():
            for name in _keys(account, resolved):
                self.pairs.forget((name, source))
                self.known.remember(name, source, now)


def _keys(account: str, resolved: str) -> tuple[str, ...]:
    """The accounts an attempt counts against: the typed name's and, when other, the resolved one."""
    return (account, resolved) if resolved and resolved != account else (account,)
