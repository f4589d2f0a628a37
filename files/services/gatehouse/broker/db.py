"""The broker's SQLite store: connection set-up and versioned schema migrations.

One connection in autocommit mode; writes go through :meth:`Database.transaction` (``BEGIN
IMMEDIATE`` … ``COMMIT``), which can also roll back on purpose for the admin API's check mode.
The schema version lives in ``schema_version``; :data:`MIGRATIONS` are applied in order, each in
its own transaction, so an older database is brought forward on open and a newer one is refused.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
]
SCHEMA_VERSION = len(MIGRATIONS)


def check_url(database: str) -> Path:
    """The SQLite path named by the ``Database`` key; other URL schemes are refused."""
    lowered = database.strip().lower()
    if lowered.startswith(("postgresql:", "postgres:")):
        # Never echo the URL: it may carry a password.
        raise DatabaseError(
            "Database: PostgreSQL URLs are not supported in this version; use a SQLite file path"
        )
    if "://" in lowered:
        raise DatabaseError("Database: only a SQLite file path is supported")
    if not database.strip():
        raise DatabaseError("Database is required (a SQLite file path)")
    return Path(database.strip())


class Database:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._in_tx = False

    @classmethod
    def open(cls, database: str | os.PathLike[str], *, upto: int = SCHEMA_VERSION) -> Database:
        """Open (creating if needed) and migrate to ``upto`` (tests use a lower one to build old DBs)."""
        path = check_url(os.fspath(database))
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
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DatabaseError(f"Database: cannot open {path}: {exc}") from None
        db = cls(conn, path)
        try:
            db.migrate(upto)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DatabaseError(f"Database: {path} is not a usable SQLite database: {exc}") from None
        except DatabaseError:
            conn.close()
            raise
        return db

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ schema

    def schema_version(self) -> int:
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not exists:
            return 0
        row = self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self, upto: int = SCHEMA_VERSION) -> list[int]:
        """Apply the missing steps; returns the versions applied."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise DatabaseError(
                f"Database: {self.path} has schema version {current}, newer than this broker "
                f"understands ({SCHEMA_VERSION}); run a newer broker or restore a backup"
            )
        applied = []
        with self.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        for version in range(current + 1, upto + 1):
            with self.transaction():
                for statement in MIGRATIONS[version - 1]:
                    self.conn.execute(statement)
                self.conn.execute("DELETE FROM schema_version")
                self.conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            applied.append(version)
        return applied

    def ready(self) -> bool:
        try:
            return self.schema_version() == SCHEMA_VERSION
        except sqlite3.Error:
            return False

    # ------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, *, rollback: bool = False) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; ``rollback=True`` runs the same work and undoes it."""
        if self._in_tx:
            raise RuntimeError("nested transaction")
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self.conn
            if rollback:
                raise _Rollback
        except _Rollback:
            self.conn.execute("ROLLBACK")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._in_tx = False

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()
