"""Copy the broker's database from one engine to the other: ``python -m gatehouse.broker.migrate``.

``--source`` and ``--target`` are ``Database`` values (an SQLite file path or a libpq
``postgresql://`` URL); each password comes from a file (``--source-password-file``,
``--target-password-file``: the first line, like ``DatabasePasswordFile``) or libpq's own
``PGPASSWORD``/``PGPASSFILE``, never from the command line. The copy moves every table of the
source's schema, keeping the ids, so a broker started on the target finds its state as it was.

Invariants:

* Nothing is copied across schema versions: the target is created at the source's version (a
  new SQLite file or an empty PostgreSQL database gets the schema of :data:`~gatehouse.broker.db.MIGRATIONS`
  up to it), and a target at another version is refused. A source newer than this broker is refused.
* A target that already holds rows is refused (exit 3), unless it holds exactly the source's rows
  (then nothing is written: a second run is a no-op, exit 0) or ``--replace`` empties it in the
  copy's own transaction.
* The source is read in one snapshot (an SQLite read transaction; PostgreSQL ``REPEATABLE READ
  READ ONLY``) and is never written. The target is written in ONE transaction (the broker's
  writers' lock: no broker node writes meanwhile), tables in dependency order, then PostgreSQL's
  identity sequences are moved past the copied ids. Before the commit the target's rows are read
  back in that transaction and compared with the source's; on any difference the transaction is
  rolled back (exit 1, nothing written). After the commit they are read again on a new connection.
* The comparison is per table: the row count and the sha256 of the rows in a normal form that both
  engines give alike: each value by its declared column type (INTEGER as an integer, REAL as a
  double, BLOB/BYTEA as hex, TEXT/CITEXT as its exact text, NULL as null), rows as JSON, sorted in
  Python (not by either engine's collation: NOCASE and citext order alike only without case).
* Passwords never reach the output: messages of the drivers name hosts and users only, and are
  scrubbed of the passwords read.

Exit codes: 0 copied (or the target already held the same rows; with ``--check``: the copy would
go ahead), 1 the rows differ (nothing committed), 2 a database cannot be used (unreachable,
unreadable, no broker schema, bad arguments), 3 refused (target holds other rows or another schema
version, source newer than this broker). ``--json`` prints the report as one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatehouse.broker.db import (
    MIGRATIONS,
    POSTGRESQL,
    SCHEMA_VERSION,
    SQLITE,
    Database,
    DatabaseError,
    check_url,
    engine_of,
)
from gatehouse.broker.settings import read_secret_file
from gatehouse.config import ConfigError

EXIT_OK = 0
EXIT_DIFFERS = 1
EXIT_UNUSABLE = 2
EXIT_REFUSED = 3

INTEGER, REAL, BLOB, TEXT = "integer", "real", "blob", "text"
VERSION_TABLE = "schema_version"


class Refused(Exception):
    """The copy is refused before anything is written (exit 3)."""


class Unusable(Exception):
    """A database cannot be used (exit 2)."""


@dataclass(frozen=True)
class Table:
    """One table of the schema: its columns with their kinds, and whether ``id`` is an identity."""

    name: str
    columns: tuple[tuple[str, str], ...]
    identity: bool  # id INTEGER PRIMARY KEY: a PostgreSQL identity column whose sequence follows the ids

    @property
    def names(self) -> list[str]:
        return [name for name, _kind in self.columns]

    def select(self) -> str:
        # Names from the schema (MIGRATIONS), never from input.
        columns = ", ".join(f'"{n}"' for n in self.names)
        return f"SELECT {columns} FROM {self.name}"  # noqa: S608

    def insert(self) -> str:
        columns = ", ".join(f'"{n}"' for n in self.names)
        marks = ", ".join("?" * len(self.columns))
        return f"INSERT INTO {self.name} ({columns}) VALUES ({marks})"  # noqa: S608


def _kind(declared: str) -> str:
    declared = declared.upper()
    if "INT" in declared:
        return INTEGER
    if "REAL" in declared or "DOUBLE" in declared:
        return REAL
    if "BLOB" in declared:
        return BLOB
    return TEXT


def schema(version: int) -> list[Table]:
    """The tables of schema ``version`` (without ``schema_version``), parents before children.

    Read from MIGRATIONS applied to an in-memory SQLite database: the one definition both engines use.
    """
    conn = sqlite3.connect(":memory:")
    try:
        for step in MIGRATIONS[:version]:
            for statement in step:
                conn.execute(statement)
        names = [
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if row[0] != VERSION_TABLE
        ]
        tables: dict[str, Table] = {}
        parents: dict[str, set[str]] = {}
        for name in names:
            info = conn.execute(f"PRAGMA table_info({name})").fetchall()
            columns = tuple((row[1], _kind(row[2])) for row in info)
            keys = [row[1] for row in info if row[5]]
            identity = keys == ["id"] and _kind(next(r[2] for r in info if r[1] == "id")) == INTEGER
            tables[name] = Table(name, columns, identity)
            parents[name] = {
                row[2] for row in conn.execute(f"PRAGMA foreign_key_list({name})") if row[2] != name
            }
    finally:
        conn.close()
    ordered: list[Table] = []
    done: set[str] = set()
    while len(ordered) < len(tables):
        ready = [n for n in sorted(tables) if n not in done and parents[n] <= done]
        if not ready:
            raise RuntimeError("the schema's foreign keys form a cycle")
        for name in ready:
            ordered.append(tables[name])
            done.add(name)
    return ordered


def normal(kind: str, value: Any) -> Any:
    """One value in the form both engines give alike (module doc)."""
    if value is None:
        return None
    if kind == INTEGER:
        return int(value)
    if kind == REAL:
        return float(value)
    if kind == BLOB:
        return (value.encode("utf-8") if isinstance(value, str) else bytes(value)).hex()
    return str(value)


def stored(kind: str, value: Any) -> Any:
    """A source value as it is written to the target (BLOB always bytes, REAL always a double)."""
    if value is None:
        return None
    if kind == BLOB:
        return value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if kind == REAL:
        return float(value)
    if kind == INTEGER:
        return int(value)
    return str(value)


@dataclass
class TableDigest:
    rows: int
    sha256: str


def digest(table: Table, rows: Iterable[Sequence[Any]]) -> TableDigest:
    lines = sorted(
        json.dumps(
            [normal(kind, row[i]) for i, (_n, kind) in enumerate(table.columns)], separators=(",", ":")
        )
        for row in rows
    )
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8") + b"\n")
    return TableDigest(len(lines), sha.hexdigest())


class Reader:
    """A read-only view of one database (no migration, never a write): its version and rows."""

    def __init__(self, database: str, password: str = "") -> None:
        self.engine = engine_of(database)
        self.shown = check_url(database)
        self.exists = True
        self._conn: Any = None
        if self.engine == POSTGRESQL:
            from gatehouse.broker import pg

            params, self.shown = pg.parse_url(database)
            if password:
                params["password"] = password
            try:
                import psycopg

                self._conn = psycopg.connect(**params, autocommit=True)
            except pg.Error as exc:
                raise Unusable(f"cannot connect to {self.shown}: {exc}") from None
        else:
            path = Path(database.strip())
            if not path.exists():
                self.exists = False
                return
            try:
                self._conn = sqlite3.connect(
                    f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, isolation_level=None
                )
                self._conn.execute("PRAGMA busy_timeout = 5000")
            except sqlite3.Error as exc:
                raise Unusable(f"cannot open {path}: {exc}") from None

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self.engine == POSTGRESQL:
            import psycopg

            return (psycopg.Error,)
        return (sqlite3.Error,)

    def snapshot(self) -> None:
        """Every later read sees one state of the database."""
        if self._conn is None:
            return
        if self.engine == POSTGRESQL:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        else:
            self._conn.execute("BEGIN")

    def version(self) -> int:
        if self._conn is None:
            return 0
        try:
            if self.engine == POSTGRESQL:
                found = self._conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()[
                    0
                ]
            else:
                found = (
                    self._conn.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSION_TABLE,)
                    ).fetchone()
                    is not None
                )
            if not found:
                return 0
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except self._errors() as exc:
            raise Unusable(f"{self.shown} cannot be read: {exc}") from None
        return int(row[0] or 0)

    def rows(self, table: Table) -> list[Sequence[Any]]:
        if self._conn is None:
            return []
        try:
            return list(self._conn.execute(table.select()).fetchall())
        except self._errors() as exc:
            raise Unusable(f"{self.shown}: table {table.name} cannot be read: {exc}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class Report:
    source: str
    target: str
    schema_version: int = 0
    status: str = ""  # copied, same, would-copy, differs, refused, unusable
    changed: bool = False
    message: str = ""
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {
            "copied": EXIT_OK,
            "same": EXIT_OK,
            "would-copy": EXIT_OK,
            "differs": EXIT_DIFFERS,
            "refused": EXIT_REFUSED,
        }.get(self.status, EXIT_UNUSABLE)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "schema_version": self.schema_version,
            "status": self.status,
            "changed": self.changed,
            "message": self.message,
            "tables": self.tables,
        }

    def text(self) -> str:
        lines = [f"{self.status}: {self.message}"]
        if self.tables:
            lines.append(f"{'table':<24} {'source':>8} {'target':>8}  content")
            for name, t in self.tables.items():
                target = "-" if t["target"] is None else str(t["target"])
                lines.append(f"{name:<24} {t['source']:>8} {target:>8}  {'same' if t['same'] else 'DIFFERS'}")
        return "\n".join(lines)


def _compare(
    report: Report, tables: list[Table], source: dict[str, TableDigest], target: dict[str, TableDigest] | None
) -> bool:
    """Fill ``report.tables``; True when every table has the same count and content."""
    same_all = True
    for table in tables:
        s = source[table.name]
        t = target.get(table.name) if target is not None else None
        same = t is not None and t.rows == s.rows and t.sha256 == s.sha256
        same_all = same_all and same
        report.tables[table.name] = {
            "source": s.rows,
            "target": None if t is None else t.rows,
            "same": same,
            "source_sha256": s.sha256,
            "target_sha256": None if t is None else t.sha256,
        }
    return same_all


def _digests(read: Any, tables: list[Table]) -> dict[str, TableDigest]:
    return {table.name: digest(table, read(table)) for table in tables}


def copy_database(
    source: str,
    target: str,
    *,
    source_password: str = "",
    target_password: str = "",
    replace: bool = False,
    check: bool = False,
    report: Report | None = None,
) -> Report:
    """Copy ``source`` to ``target`` (module doc); the report (``report``, filled in) says what happened.

    Refused and Unusable are raised with ``report`` filled in as far as the copy got.
    """
    report = report or Report(source=_shown(source), target=_shown(target))
    if engine_of(source) == engine_of(target) and source.strip() == target.strip():
        raise Unusable("the source and the target are the same database")
    reader = Reader(source, source_password)
    try:
        if not reader.exists:
            raise Unusable(f"{report.source} does not exist")
        reader.snapshot()
        version = reader.version()
        if version == 0:
            raise Unusable(f"{report.source} holds no broker database (no schema_version)")
        if version > SCHEMA_VERSION:
            raise Refused(
                f"{report.source} has schema version {version}, newer than this broker understands "
                f"({SCHEMA_VERSION}): run the copy with the broker image of that version"
            )
        report.schema_version = version
        tables = schema(version)
        rows = {table.name: reader.rows(table) for table in tables}
    finally:
        reader.close()
    source_digests = {table.name: digest(table, rows[table.name]) for table in tables}

    peek = Reader(target, target_password)
    try:
        target_version = peek.version()
        if target_version not in (0, version):
            raise Refused(
                f"{report.target} has schema version {target_version} and {report.source} {version}: both must be "
                "at one version (start the newer broker on the older database first); nothing was written"
            )
        before = _digests(peek.rows, tables) if target_version else None
    finally:
        peek.close()
    holds = before is not None and any(d.rows for d in before.values())
    if holds:
        if _compare(report, tables, source_digests, before):
            report.status, report.message = (
                "same",
                f"{report.target} already holds the same rows; nothing was written",
            )
            return report
        if not replace:
            report.tables.clear()
            _compare(report, tables, source_digests, before)
            raise Refused(
                f"{report.target} already holds other rows; nothing was written (--replace empties it in the "
                "copy's transaction)"
            )
    report.tables.clear()
    if engine_of(target) == SQLITE and not Path(target.strip()).parent.is_dir():
        raise Unusable(f"the directory of {report.target} does not exist")
    if check:
        _compare(report, tables, source_digests, before)
        report.status, report.changed = "would-copy", True
        report.message = (
            f"{sum(d.rows for d in source_digests.values())} rows would be copied to {report.target}"
        )
        if holds:
            report.message += " (replacing its rows)"
        return report

    try:
        db = Database.open(target, upto=version, password=target_password)
    except DatabaseError as exc:
        raise Unusable(str(exc)) from None
    try:
        _write(db, tables, rows, source_digests, report, replace=holds)
    except _Differs:
        report.status = "differs"
        report.message = (
            f"the rows written to {report.target} differ from the source: rolled back, nothing was written"
        )
        return report
    finally:
        db.close()
    # Read once more on a new connection: what was committed.
    after_reader = Reader(target, target_password)
    try:
        after_reader.snapshot()
        after = _digests(after_reader.rows, tables)
        committed_version = after_reader.version()
    finally:
        after_reader.close()
    report.tables.clear()
    report.changed = True
    if not _compare(report, tables, source_digests, after) or committed_version != version:
        report.status = "differs"
        report.message = f"{report.target} does not hold the source's rows after the commit"
        return report
    total = sum(d.rows for d in source_digests.values())
    report.status = "copied"
    report.message = (
        f"{total} rows of {len(tables)} tables copied to {report.target}; counts and content compared"
    )
    return report


def _write(
    db: Database,
    tables: list[Table],
    rows: dict[str, list[Sequence[Any]]],
    source_digests: dict[str, TableDigest],
    report: Report,
    *,
    replace: bool,
) -> None:
    """The copy in one transaction; its rows are read back in it and compared with the source's, and
    on a difference it is rolled back (_Differs)."""
    with db.transaction() as conn:
        if replace:
            for table in reversed(tables):
                conn.execute(f"DELETE FROM {table.name}")  # noqa: S608
        else:
            # Under the writers' lock: a broker node that wrote since the check is not overwritten.
            for table in tables:
                if conn.execute(f"SELECT 1 FROM {table.name} LIMIT 1").fetchone() is not None:  # noqa: S608
                    raise Refused(
                        f"{report.target} got rows in {table.name} since it was checked (is a broker running on "
                        "it?); rolled back, nothing was written"
                    )
        for table in tables:
            values = [
                tuple(stored(kind, row[i]) for i, (_n, kind) in enumerate(table.columns))
                for row in rows[table.name]
            ]
            if values:
                conn.executemany(table.insert(), values)
            if db.engine == POSTGRESQL and table.identity:
                sequence = f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                conn.execute(sequence + f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)")  # noqa: S608
        within = _digests(lambda t: conn.execute(t.select()).fetchall(), tables)
        if not _compare(report, tables, source_digests, within):
            raise _Differs


class _Differs(Exception):
    pass


def _shown(database: str) -> str:
    try:
        return check_url(database)
    except ConfigError:
        return "(unusable Database value)"


def _password(path: str | None, option: str) -> str:
    return read_secret_file(option, path) if path else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gatehouse.broker.migrate",
        description="Copy the broker's database to another engine (SQLite file <-> PostgreSQL), "
        "keeping ids, and compare counts and content",
    )
    parser.add_argument("--source", required=True, help="an SQLite file path or a postgresql:// URL")
    parser.add_argument("--target", required=True, help="an SQLite file path or a postgresql:// URL")
    parser.add_argument("--source-password-file", help="the source's PostgreSQL password (first line)")
    parser.add_argument("--target-password-file", help="the target's PostgreSQL password (first line)")
    parser.add_argument("--replace", action="store_true", help="empty a target that holds other rows first")
    parser.add_argument("--check", action="store_true", help="check and report, write nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = Report(source=_shown(args.source), target=_shown(args.target))
    secrets: list[str] = []
    try:
        source_password = _password(args.source_password_file, "--source-password-file")
        target_password = _password(args.target_password_file, "--target-password-file")
        secrets = [s for s in (source_password, target_password) if s]
        for option, value, given in (
            ("--source-password-file", args.source, args.source_password_file),
            ("--target-password-file", args.target, args.target_password_file),
        ):
            if given and engine_of(value) != POSTGRESQL:
                raise Unusable(f"{option} is only for a postgresql:// database")
        report = copy_database(
            args.source,
            args.target,
            source_password=source_password,
            target_password=target_password,
            replace=args.replace,
            check=args.check,
            report=report,
        )
    except Refused as exc:
        report.status, report.message = "refused", str(exc)
    except (Unusable, ConfigError) as exc:
        report.status, report.message = "unusable", str(exc)
    for secret in secrets:
        report.message = report.message.replace(secret, "********")
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
