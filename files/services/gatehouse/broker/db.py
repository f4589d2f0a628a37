"""The broker's store: connection set-up and versioned schema migrations, SQLite or PostgreSQL.

The ``Database`` key selects the engine: a file path is SQLite (the embedded default of a one-host
install), a ``postgresql://`` URL is PostgreSQL (several broker nodes on one database, behind a
primary that may fail over; :mod:`gatehouse.broker.pg`). Both engines offer the same API:
``conn.execute`` (SQLite's SQL, ``?`` placeholders; rows read by position, by name and as
``dict``), :meth:`Database.query`, :meth:`Database.one` and :meth:`Database.transaction`.

One connection in autocommit mode; writes go through :meth:`Database.transaction`, which lets one
writer at a time in (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``BEGIN`` and an advisory lock shared
by all broker nodes) and can also roll back on purpose for the admin API's check mode.

One schema: :data:`MIGRATIONS` is the single list for both engines, written in SQLite's dialect;
PostgreSQL gets it through the small, fixed translation :func:`gatehouse.broker.pg.translate`
documents (identity ids, ``COLLATE NOCASE`` columns as citext, REAL as DOUBLE PRECISION, BLOB as
BYTEA, ``INSERT OR IGNORE`` as ``ON CONFLICT DO NOTHING``). A step must be written so that the
translation gives the same meaning: no other SQLite-only construct. The schema version lives in
``schema_version``; the steps are applied in order, each in its own transaction (holding the
writers' lock, so two nodes starting together migrate once), so an older database is brought
forward on open and a newer one is refused.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gatehouse.config import ConfigError


class DatabaseError(ConfigError):
    """The database cannot be used (unsupported URL, newer schema, unreadable file)."""


class _Rollback(Exception):
    """Raised inside a transaction to undo it (check mode)."""


# Each step moves the schema from version i to i + 1. Never edit a released step: append a new one.
MIGRATIONS: list[list[str]] = [
    # 1: identities, desktops, pools and entitlements
    [
        """CREATE TABLE domains (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE)""",
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE RESTRICT,
            name TEXT NOT NULL COLLATE NOCASE,
            display_name TEXT NOT NULL DEFAULT '',
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            password_hash TEXT,
            UNIQUE (domain_id, name))""",
        """CREATE TABLE groups (
            id INTEGER PRIMARY KEY,
            domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE RESTRICT,
            name TEXT NOT NULL COLLATE NOCASE,
            description TEXT NOT NULL DEFAULT '',
            UNIQUE (domain_id, name))""",
        """CREATE TABLE group_members (
            group_id INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            PRIMARY KEY (group_id, user_id))""",
        """CREATE TABLE pools (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            persistent INTEGER NOT NULL DEFAULT 0 CHECK (persistent IN (0, 1)),
            description TEXT NOT NULL DEFAULT '')""",
        """CREATE TABLE desktops (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            address TEXT NOT NULL,
            hostname TEXT NOT NULL DEFAULT '',
            agent_port INTEGER NOT NULL DEFAULT 60443,
            session_port INTEGER NOT NULL DEFAULT 4172,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            pool_id INTEGER REFERENCES pools(id) ON DELETE SET NULL)""",
        """CREATE TABLE entitlements (
            id INTEGER PRIMARY KEY,
            user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
            group_id INTEGER REFERENCES groups(id) ON DELETE CASCADE,
            desktop_id INTEGER REFERENCES desktops(id) ON DELETE CASCADE,
            pool_id INTEGER REFERENCES pools(id) ON DELETE CASCADE,
            CHECK ((user_id IS NULL) <> (group_id IS NULL)),
            CHECK ((desktop_id IS NULL) <> (pool_id IS NULL)))""",
        """CREATE UNIQUE INDEX entitlements_unique ON entitlements (
            COALESCE(user_id, 0), COALESCE(group_id, 0), COALESCE(desktop_id, 0), COALESCE(pool_id, 0))""",
        "CREATE INDEX desktops_pool ON desktops (pool_id)",
    ],
    # 2: placement state: persistent assignments, agent load reports, placements since a report
    [
        """CREATE TABLE assignments (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
            desktop_id INTEGER NOT NULL REFERENCES desktops(id) ON DELETE CASCADE,
            assigned_at REAL NOT NULL,
            PRIMARY KEY (user_id, pool_id))""",
        """CREATE TABLE agent_reports (
            address TEXT NOT NULL COLLATE NOCASE,
            agent_port INTEGER NOT NULL,
            hostname TEXT NOT NULL DEFAULT '',
            session_port INTEGER NOT NULL,
            active_sessions INTEGER NOT NULL,
            capacity INTEGER NOT NULL,
            reported_at REAL NOT NULL,
            PRIMARY KEY (address, agent_port))""",
        """CREATE TABLE desktop_load (
            desktop_id INTEGER PRIMARY KEY REFERENCES desktops(id) ON DELETE CASCADE,
            placed_since_report INTEGER NOT NULL DEFAULT 0,
            placed_total INTEGER NOT NULL DEFAULT 0)""",
    ],
    # 3: load reports only for registered desktops, one row each, gone with the desktop. Reports are
    # refreshed every few seconds, so the old rows (keyed by whatever address was reported) go.
    [
        "DROP TABLE agent_reports",
        """CREATE TABLE agent_reports (
            desktop_id INTEGER PRIMARY KEY REFERENCES desktops(id) ON DELETE CASCADE,
            address TEXT NOT NULL COLLATE NOCASE,
            agent_port INTEGER NOT NULL,
            hostname TEXT NOT NULL DEFAULT '',
            session_port INTEGER NOT NULL,
            active_sessions INTEGER NOT NULL,
            capacity INTEGER NOT NULL,
            reported_at REAL NOT NULL)""",
    ],
    # 4: how the CM logs the user on at the agent and verifies that agent's certificate
    [
        "ALTER TABLE desktops ADD COLUMN logon TEXT NOT NULL DEFAULT 'windows-password' "
        "CHECK (logon IN ('windows-password', 'none'))",
        "ALTER TABLE desktops ADD COLUMN agent_ca_pem TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE desktops ADD COLUMN agent_cert_sha256 TEXT NOT NULL DEFAULT ''",
    ],
    # 5: enterprise identity: where a user is checked, TOTP secrets (encrypted, with the last
    # accepted time step so a code works once), entitlements of directory groups by CN or DN
    [
        "ALTER TABLE users ADD COLUMN source TEXT NOT NULL DEFAULT 'local' CHECK (source IN ('local', 'ldap'))",
        """CREATE TABLE totp (
            user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            secret BLOB NOT NULL,
            last_step INTEGER NOT NULL DEFAULT 0,
            enrolled_at REAL NOT NULL)""",
        """CREATE TABLE directory_entitlements (
            id INTEGER PRIMARY KEY,
            domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE RESTRICT,
            principal TEXT NOT NULL COLLATE NOCASE,
            desktop_id INTEGER REFERENCES desktops(id) ON DELETE CASCADE,
            pool_id INTEGER REFERENCES pools(id) ON DELETE CASCADE,
            CHECK ((desktop_id IS NULL) <> (pool_id IS NULL)))""",
        """CREATE UNIQUE INDEX directory_entitlements_unique ON directory_entitlements (
            domain_id, principal, COALESCE(desktop_id, 0), COALESCE(pool_id, 0))""",
    ],
    # 6: multi-site: the site a desktop belongs to ('' = none); a site whose agents all went
    # silent is down and its desktops are not offered (placement.py)
    [
        "ALTER TABLE desktops ADD COLUMN site TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX desktops_site ON desktops (site)",
    ],
    # 7: login throttling shared by the broker nodes of one database (throttle._DbTable, _DbKnown):
    # failure counters per scope (account_source, source, account; '' for the part a scope has
    # not) and the sources each account logged in from. Times are wall-clock seconds.
    [
        """CREATE TABLE login_failures (
            scope TEXT NOT NULL,
            account TEXT NOT NULL,
            source TEXT NOT NULL,
            failures INTEGER NOT NULL,
            first_at REAL NOT NULL,
            blocked_until REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, account, source))""",
        "CREATE INDEX login_failures_first ON login_failures (first_at)",
        """CREATE TABLE login_known_sources (
            account TEXT NOT NULL,
            source TEXT NOT NULL,
            seen_at REAL NOT NULL,
            PRIMARY KEY (account, source))""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def engine_of(database: str) -> str:
    """The engine the ``Database`` key selects; an unusable value is a DatabaseError."""
    check_url(database)
    return POSTGRESQL if _is_postgresql(database) else SQLITE


def _is_postgresql(database: str) -> bool:
    return database.strip().lower().startswith(("postgresql://", "postgres://"))


def check_url(database: str) -> str:
    """The ``Database`` key checked: a SQLite file path or a libpq ``postgresql://`` URL (no
    password in it); returns what may be shown of it. Messages never echo a URL."""
    value = database.strip()
    if _is_postgresql(value):
        from gatehouse.broker import pg

        try:
            return pg.parse_url(value)[1]
        except ValueError as exc:
            raise DatabaseError(f"Database: {exc}") from None
    if "://" in value.lower():
        raise DatabaseError("Database: a SQLite file path or a postgresql:// URL is required")
    if not value:
        raise DatabaseError("Database is required (a SQLite file path or a postgresql:// URL)")
    return value


def _set_wal(conn: sqlite3.Connection, wait: float = 5.0) -> None:
    """WAL mode, waiting for another connection that is switching the same new file at once.

    Changing the journal mode needs an exclusive lock, and SQLite reports "database is locked"
    at once instead of calling the busy handler (two brokers, or a tool, opening a new file
    together); the change is idempotent, so it is tried again for up to ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class Database:
    """The broker's database on either engine (``engine``: :data:`SQLITE` or :data:`POSTGRESQL`).

    ``conn`` is the engine's connection (``sqlite3.Connection`` or ``pg.PgConnection``);
    ``errors`` the engine's error classes (``ready`` and callers catch them), ``integrity_errors``
    those of a violated constraint (the admin API answers 409). ``name`` is what may be logged.
    """

    def __init__(self, conn: Any, path: Path | None, *, engine: str = SQLITE, name: str = "") -> None:
        self.conn = conn
        self.path = path
        self.engine = engine
        self.name = name or str(path)
        self._in_tx = False
        if engine == POSTGRESQL:
            from gatehouse.broker import pg

            self.errors: tuple[type[BaseException], ...] = (pg.Error,)
            self.integrity_errors: tuple[type[BaseException], ...] = (pg.IntegrityError,)
        else:
            self.errors = (sqlite3.Error,)
            self.integrity_errors = (sqlite3.IntegrityError,)

    @classmethod
    def open(
        cls, database: str | os.PathLike[str], *, upto: int = SCHEMA_VERSION, password: str = ""
    ) -> Database:
        """Open (creating if needed) and migrate to ``upto`` (tests use a lower one to build old DBs).

        ``password``: PostgreSQL's (from ``DatabasePasswordFile``); SQLite has none.
        """
        if isinstance(database, str) and _is_postgresql(database):
            return cls._open_postgresql(database, upto, password)
        path = Path(check_url(os.fspath(database)))
        if not path.parent.is_dir():
            raise DatabaseError(f"Database: directory {path.parent} does not exist")
        if not path.exists():
            # The file holds password hashes: create it private before SQLite touches it.
            try:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise DatabaseError(f"Database: cannot create {path}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"Database: cannot open {path}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            _set_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DatabaseError(f"Database: cannot open {path}: {exc}") from None
        return cls(conn, path)._migrated(
            upto, sqlite3.DatabaseError, f"Database: {path} is not a usable SQLite database"
        )

    @classmethod
    def _open_postgresql(cls, url: str, upto: int, password: str) -> Database:
        from gatehouse.broker import pg

        try:
            params, shown = pg.parse_url(url)
        except ValueError as exc:
            raise DatabaseError(f"Database: {exc}") from None
        try:
            conn = pg.PgConnection(params, password)
        except pg.Error as exc:
            # libpq's message names hosts and users, never the password.
            raise DatabaseError(f"Database: cannot connect to {shown}: {exc}") from None
        return cls(conn, None, engine=POSTGRESQL, name=shown)._migrated(
            upto, pg.Error, f"Database: {shown} is not usable"
        )

    def _migrated(self, upto: int, engine_error: type[Exception], unusable: str) -> Database:
        """This database migrated to ``upto``; on any failure the connection is closed and the
        error is a DatabaseError (``unusable`` + the engine's message)."""
        try:
            self.migrate(upto)
        except DatabaseError:
            self.conn.close()
            raise
        except engine_error as exc:
            self.conn.close()
            raise DatabaseError(f"{unusable}: {exc}") from None
        return self

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ schema

    def _has_table(self, name: str) -> bool:
        if self.engine == POSTGRESQL:
            return bool(self.conn.table_exists(name))
        return (
            self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
            is not None
        )

    def schema_version(self) -> int:
        if not self._has_table("schema_version"):
            return 0
        row = self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _refuse_newer(self, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise DatabaseError(
                f"Database: {self.name} has schema version {current}, newer than this broker "
                f"understands ({SCHEMA_VERSION}); run a newer broker or restore a backup"
            )

    def migrate(self, upto: int = SCHEMA_VERSION) -> list[int]:
        """Apply the missing steps; returns the versions applied.

        Each step re-reads the version under the writers' lock: of two nodes starting together,
        one applies a step and the other finds it applied.
        """
        self._refuse_newer(self.schema_version())
        applied = []
        with self.transaction() as conn:
            if self.engine == POSTGRESQL:
                # citext: the COLLATE NOCASE columns (a trusted extension: the database owner may).
                conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        while True:
            with self.transaction() as conn:
                current = self.schema_version()
                self._refuse_newer(current)
                if current >= upto:
                    break
                for statement in MIGRATIONS[current]:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (current + 1,))
            applied.append(current + 1)
        return applied

    def ready(self) -> bool:
        try:
            return self.schema_version() == SCHEMA_VERSION
        except self.errors:
            return False

    # ------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, *, rollback: bool = False) -> Iterator[Any]:
        """One writer at a time … ``COMMIT``; ``rollback=True`` runs the same work and undoes it."""
        if self._in_tx:
            raise RuntimeError("nested transaction")
        postgresql = self.engine == POSTGRESQL
        if postgresql:
            self.conn.begin()
        else:
            self.conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self.conn
            if rollback:
                raise _Rollback
        except _Rollback:
            self._end(commit=False)
        except BaseException:
            self._end(commit=False)
            raise
        else:
            self._end(commit=True)
        finally:
            self._in_tx = False

    def _end(self, *, commit: bool) -> None:
        if self.engine == POSTGRESQL:
            self.conn.end(commit)
        else:
            self.conn.execute("COMMIT" if commit else "ROLLBACK")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()
