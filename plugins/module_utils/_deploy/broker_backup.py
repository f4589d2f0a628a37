# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the broker_backup module: back up and restore the broker's database (private to the collection).

A backup is the files in the backup directory named after the UTC time it was taken:
``broker-<time>.db`` (the database), ``broker-<time>.totp.key`` (the broker's TOTP key, when it
has one: it decrypts the enrolled TOTP secrets of the database, so a backup without it cannot be
restored into another deployment), ``broker-<time>.json`` (metadata: format, engine, time,
schema version, collection version, image, size, sha256 of each file) and
``broker-<time>.db.sha256`` (in ``sha256sum`` format, one line per file, so ``sha256sum -c``
checks them by hand). Each is written atomically, mode 0600, and the checksum file last: a backup
without it is incomplete and is neither listed, kept nor restored. The key file ends in ``.key``
so that support bundles never read it; its value is never returned, shown in a diff or a message.

The engine does the work that depends on the database, chosen by the broker's ``Database`` key:
:class:`SqliteEngine` takes the copy with SQLite's online backup API inside the running broker
container (one consistent snapshot while the broker keeps serving) and puts a copy in place while
the broker is stopped. :class:`PostgresEngine` (``Database`` a ``postgresql://`` URL) runs
pg_dump (custom format, ``broker-<time>.dump``) in a one-off container of the postgres image in
the broker's network namespace, and restores with pg_restore's SQL run in one transaction on the
emptied database. The files, checksums, retention and the stop/start of the restore are the same
for both; a backup restores only into a broker of its engine.

Invariants: nothing is kept in check mode (the snapshot is taken and compared, then deleted);
a restore verifies the checksums, the metadata and the files before it stops the broker, so a
backup that does not match changes nothing; the database and the key are replaced by renames,
and put back together when the broker does not start on them. A backup of format 1 (before the
key was part of it) restores the database only; the broker keeps its own key.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import (
    atomic_open,
    write_atomic,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (
    read_bytes,
    sha256,
    sha256_file,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker as broker_deploy
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

FORMAT = 2
# 1: the database only; 2: the database and the broker's TOTP key (when it has one).
FORMATS = (1, 2)
PREFIX = "broker-"
# broker-<UTC time>[-<n>].db (SQLite) or .dump (PostgreSQL, pg_dump's custom format): -<n> tells
# apart backups taken in the same second.
_NAME_RE = re.compile(r"^broker-([0-9]{8}T[0-9]{6}Z)(?:-([0-9]+))?\.(?:db|dump)$")
_SUFFIX_RE = re.compile(r"\.(?:db|dump)$")
CHECKSUM_SUFFIX = ".sha256"
PYTHON = "/opt/gatehouse/venv/bin/python"  # the services' interpreter in the images
DATA_MOUNT = broker_deploy.DATA_MOUNT
DATABASE = broker_deploy.DATABASE
SQLITE_MAGIC = b"SQLite format 3\x00"
PREVIOUS_SUFFIX = ".before-restore"
SECRETS_MOUNT = "/" + broker_deploy.SECRETS
TOTP_KEY = broker_deploy.TOTP_KEY
# Both end in .key: support bundles list such files by name and never read them.
KEY_SUFFIX = ".totp.key"
PREVIOUS_KEY = "totp.before-restore.key"
HEALTH_ADDRESS = ("127.0.0.1", broker_deploy.ADMIN_PORT)  # /health, inside the broker container
_CHUNK = 1024 * 1024

# Runs in the broker container as the service user: argv[1] the live database, argv[2] the copy.
# The copy is one read transaction of the source (a consistent snapshot); the broker keeps
# serving meanwhile (WAL: readers do not block its writers).
SQLITE_BACKUP_SCRIPT = r"""
import json, os, sqlite3, sys
os.umask(0o077)
source = sqlite3.connect(sys.argv[1], timeout=30)
target = sqlite3.connect(sys.argv[2])
with target:
    source.backup(target)
source.close()
check = target.execute("PRAGMA integrity_check").fetchone()[0]
try:
    version = target.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
except sqlite3.Error:
    version = None
target.close()
print(json.dumps({"integrity": check, "schema_version": version}))
"""

SCHEMA_SCRIPT = "from gatehouse.broker.db import SCHEMA_VERSION; print(SCHEMA_VERSION)"
HEALTH_SCRIPT = (
    "import http.client\n"
    "conn = http.client.HTTPConnection(%r, %d, timeout=2)\n"
    "conn.request('GET', '/health')\n"
    "raise SystemExit(conn.getresponse().status != 200)\n" % HEALTH_ADDRESS
)


def checksum_path(db_path: str) -> str:
    return db_path + CHECKSUM_SUFFIX


def metadata_path(db_path: str) -> str:
    return _SUFFIX_RE.sub("", db_path) + ".json"


def key_path(db_path: str) -> str:
    return _SUFFIX_RE.sub("", db_path) + KEY_SUFFIX


def read_checksums(db_path: str) -> dict[str, str] | None:
    """{"database": sha256, "totp_key": sha256 or None} as the checksum file of ``db_path`` records them.

    None without a checksum file. The database's line comes first; the key's, when there is one, second.
    """
    try:
        with open(checksum_path(db_path), encoding="utf-8") as handle:
            lines = [line.split() for line in handle.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return None
    names = (os.path.basename(db_path), os.path.basename(key_path(db_path)))
    if not 1 <= len(lines) <= 2 or any(
        len(line) != 2 or line[1].lstrip("*") != names[i] or not re.match(r"^[0-9a-f]{64}$", line[0])
        for i, line in enumerate(lines)
    ):
        raise Failure("%s is not a checksum file of %s" % (checksum_path(db_path), db_path))
    return {"database": lines[0][0], "totp_key": lines[1][0] if len(lines) == 2 else None}


def list_backups(backup_dir: str) -> list[str]:
    """Complete backups (database and checksum file) in ``backup_dir``, oldest first."""
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _NAME_RE.match(name)
        if match and os.path.exists(os.path.join(backup_dir, name + CHECKSUM_SUFFIX)):
            found.append(((match.group(1), int(match.group(2) or 0)), os.path.join(backup_dir, name)))
    return [path for _order, path in sorted(found)]


def new_backup_path(backup_dir: str, now: datetime.datetime, suffix: str = ".db") -> str:
    """A path for a backup taken ``now`` that no file of another backup (of either engine) uses."""
    stem, n = PREFIX + now.strftime("%Y%m%dT%H%M%SZ"), 0
    while True:
        base = os.path.join(backup_dir, stem if n == 0 else "%s-%d" % (stem, n))
        taken = [base + ".db", base + ".dump", base + KEY_SUFFIX, base + ".json"]
        taken += [base + ".db" + CHECKSUM_SUFFIX, base + ".dump" + CHECKSUM_SUFFIX]
        if not any(os.path.exists(p) for p in taken):
            return base + suffix
        n += 1


def broker_container(cli, params: dict):
    name = broker_deploy.container_name(params["name_prefix"])
    container = ctr.find_container(cli, name)
    if container is None:
        raise Failure("there is no broker container %s on the Docker host (name_prefix)" % name)
    return container


def host_data_dir(container) -> str:
    """Where the broker's /data is on this host (the same path on the Docker host and here)."""
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == DATA_MOUNT and mount.get("Source"):
            return mount["Source"]
    raise Failure("container %s mounts no data directory at %s" % (container.name, DATA_MOUNT))


def host_secrets_dir(container, data_dir: str) -> str:
    """Where the broker's secrets/ is on this host: its /secrets mount, else beside data/ (the broker
    module's layout; a broker without TOTP, LDAP or RADIUS mounts none, and a later deployment with TOTP
    keeps a key it finds there)."""
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == SECRETS_MOUNT and mount.get("Source"):
            return mount["Source"]
    return os.path.join(os.path.dirname(data_dir.rstrip("/")), broker_deploy.SECRETS)


def broker_settings(data_dir: str) -> dict:
    """The keys of the broker's broker.properties in ``data_dir`` (empty without the file)."""
    data = read_bytes(os.path.join(data_dir, "broker.properties")) or b""
    found = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, text = line.strip().partition("=")
        if sep and not key.startswith(("#", "!")):
            found[key.strip()] = text.strip()
    return found


def broker_database(data_dir: str) -> str:
    """The ``Database`` of the broker's broker.properties in ``data_dir``; the SQLite default without one."""
    return broker_settings(data_dir).get("Database") or DATA_MOUNT + "/" + DATABASE


def is_postgresql(database: str) -> bool:
    return database.lower().startswith(("postgresql://", "postgres://"))


def engine_for(cli, container):
    """The engine of the broker's database (its ``Database`` key): SqliteEngine or PostgresEngine."""
    database = broker_database(host_data_dir(container))
    if is_postgresql(database):
        return PostgresEngine(cli, container, database)
    return SqliteEngine(cli, container)


def host_path(container, path: str) -> str | None:
    """Where the file ``path`` of the container is on this host (through its mounts), or None."""
    for mount in container.attrs.get("Mounts") or []:
        target = (mount.get("Destination") or "").rstrip("/")
        if target and mount.get("Source") and (path == target or path.startswith(target + "/")):
            return mount["Source"] + path[len(target) :]
    return None


class SqliteEngine:
    """The broker's embedded SQLite database, ``broker.db`` in its data directory."""

    name = "sqlite"
    suffix = ".db"

    def __init__(self, cli=None, container=None) -> None:
        self.cli = cli
        self.container = container

    def describe(self, data_dir: str) -> str:
        """The live database, as results and messages name it."""
        return os.path.join(data_dir, DATABASE)

    def same(self, newest: str, digest: str, facts: dict) -> bool:
        """Whether the backup ``newest`` holds the database just copied (its sha256 ``digest``)."""
        return (read_checksums(newest) or {}).get("database") == digest

    def snapshot(self, container, data_dir: str) -> tuple[str, dict]:
        """A consistent copy of the live database in ``data_dir`` (host path) and what it holds."""
        tmp_name = ".backup-%s.db" % uuid.uuid4().hex
        argv = [PYTHON, "-c", SQLITE_BACKUP_SCRIPT, DATA_MOUNT + "/" + DATABASE, DATA_MOUNT + "/" + tmp_name]
        tmp = os.path.join(data_dir, tmp_name)
        try:
            code, output = ctr.exec_in(container, argv)
        except ctr.ContainerError as exc:
            raise Failure(str(exc)) from None
        if code != 0:
            remove_quietly(tmp)
            raise Failure(
                "the SQLite backup in %s failed (exit code %s): %s" % (container.name, code, output.strip())
            )
        try:
            facts = json.loads(output.strip().splitlines()[-1])
        except (IndexError, ValueError):
            remove_quietly(tmp)
            raise Failure(
                "the SQLite backup in %s gave no report: %s" % (container.name, output.strip())
            ) from None
        if facts["integrity"] != "ok":
            remove_quietly(tmp)
            raise Failure(
                "the copy of the broker database fails its integrity check: %s" % facts["integrity"]
            )
        return tmp, {"schema_version": facts["schema_version"]}

    def verify(self, path: str) -> None:
        with open(path, "rb") as handle:
            if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise Failure("%s is not an SQLite database" % path)

    def check_schema(self, container, schema_version: int | None) -> None:
        """Refuse a backup whose schema is newer than the running broker's image understands."""
        container.reload()
        if schema_version is None or not (container.attrs.get("State") or {}).get("Running"):
            return  # a stopped broker cannot be asked; its start after the restore tells
        code, output = ctr.exec_in(container, [PYTHON, "-c", SCHEMA_SCRIPT])
        if code != 0:
            raise Failure(
                "cannot read the schema version of the broker in %s: %s" % (container.name, output.strip())
            )
        understood = int(output.strip().splitlines()[-1])
        if schema_version > understood:
            raise Failure(
                "the backup has schema version %d, newer than the broker in %s understands (%d): upgrade the broker "
                "first; nothing was changed" % (schema_version, container.name, understood)
            )

    def put_back(self, previous: str, data_dir: str) -> None:
        """Undo put_in_place: the kept previous database becomes the live one again (broker stopped)."""
        live = os.path.join(data_dir, DATABASE)
        _remove_journals(data_dir)
        os.replace(previous, live)

    def put_in_place(self, backup: str, data_dir: str) -> str | None:
        """Replace the (stopped) broker's database with ``backup``; returns where the previous one is kept."""
        live = os.path.join(data_dir, DATABASE)
        previous = None
        uid = gid = None
        mode = 0o600
        if os.path.exists(live):
            st = os.stat(live)
            uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o777
            previous = live + PREVIOUS_SUFFIX
            remove_quietly(previous)
            os.link(live, previous)  # the database as it was, kept until the next restore
        _remove_journals(data_dir)
        with open(backup, "rb") as source, atomic_open(live, mode, uid, gid) as target:
            shutil.copyfileobj(source, target, _CHUNK)
        return previous


def _remove_journals(data_dir: str) -> None:
    """SQLite's journal files of the (stopped) broker: stale ones must not meet another database."""
    for name in broker_deploy.DB_FILES:
        if name != DATABASE:
            remove_quietly(os.path.join(data_dir, name))


# The PostgreSQL client tools (pg_dump, pg_restore, psql) come from this image: the broker's has none.
PG_IMAGE = "postgres"
PG_MAGIC = b"PGDMP"  # the first bytes of pg_dump's custom format
PREVIOUS_DUMP = "broker.before-restore.dump"
PG_STAGE_PREFIX = ".backup-pg-"
PG_WORK = "/work"  # the stage directory in the one-off container
PG_INPUT = PG_WORK + "/input.dump"  # the dump a restore reads: a copy in the stage, the broker user's
# pg_dump's SQL carries a random key per run on these lines (psql's \restrict); not content.
_RESTRICT_RE = re.compile(rb"^\\(?:un)?restrict\b")
_COPY_VERSION_RE = re.compile(rb"^COPY public\.schema_version \(version\) FROM stdin;$")

# Backup, in a one-off container of PG_IMAGE; $1 is the broker's URL, the password in the password
# file PGPASSFILE names. The dump, and its SQL as pg_restore writes it (to compare contents: a
# custom dump holds the time it was taken), land in the stage directory.
PG_BACKUP_SCRIPT = """set -eu
umask 077
pg_dump --format=custom --file=%(work)s/broker.dump --dbname="$1"
pg_restore --file=%(work)s/content.sql %(work)s/broker.dump
""" % {"work": PG_WORK}

# Restore: the dump's SQL, after DROP OWNED BY CURRENT_USER (every object of the broker's role
# in the database: tables, sequences, the citext extension), runs in ONE transaction. The
# database is empty when the dump's objects are created, and an error anywhere leaves it as it
# was. The SQL is written to a file first, so a pg_restore that fails never feeds psql a script
# cut short.
PG_RESTORE_SCRIPT = """set -eu
umask 077
{ echo 'DROP OWNED BY CURRENT_USER;'; pg_restore --no-owner --no-privileges --file=- %(input)s; } > %(work)s/restore.sql
psql -X -q -v ON_ERROR_STOP=1 --single-transaction --dbname="$1" --file=%(work)s/restore.sql > /dev/null
""" % {"work": PG_WORK, "input": PG_INPUT}


def pgpass_line(password: str) -> bytes:
    """A libpq password file line for any host, port, database and user."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return ("*:*:*:*:%s\n" % escaped).encode("utf-8")


def content_digest(sql_path: str) -> tuple[str, int | None]:
    """(sha256 of the dump's SQL without its per-run lines, the schema version in it)."""
    digest = hashlib.sha256()
    version = None
    in_version = False
    with open(sql_path, "rb") as handle:
        for line in handle:
            if _RESTRICT_RE.match(line):
                continue
            digest.update(line)
            stripped = line.rstrip(b"\n")
            if in_version:
                if stripped == b"\\.":
                    in_version = False
                elif stripped.strip().isdigit():
                    version = max(version or 0, int(stripped))
            elif _COPY_VERSION_RE.match(stripped):
                in_version = True
    return digest.hexdigest(), version


class PostgresEngine(SqliteEngine):
    """The broker's PostgreSQL database (``Database`` a ``postgresql://`` URL), with pg_dump/pg_restore.

    The client tools run in a one-off container of the ``gatehouse/postgres`` image, through the
    collection's Docker layer (hardened like the broker), in the broker container's network
    namespace while it runs (or its network mode while it is stopped), with the broker's mounts
    read-only (the URL's ``sslrootcert`` is found where the broker finds it) and as the broker's
    user (the owner of its data directory). The password is the broker's ``DatabasePasswordFile``, copied to a 0600 password file in
    a stage directory of the data directory (``PGPASSFILE``): never on a command line or in the
    container's environment. The stage is removed afterwards.

    A custom dump holds the time it was taken, so two dumps of the same data differ: whether the
    newest backup holds the same data is told by ``content_sha256`` (the dump's SQL without its
    per-run lines) in its metadata.
    """

    name = "postgresql"
    suffix = ".dump"

    def __init__(self, cli=None, container=None, database: str = "") -> None:
        super().__init__(cli, container)
        self.database = database
        if container is not None and not database:
            self.database = broker_database(host_data_dir(container))
        if not is_postgresql(self.database):
            raise Failure(
                "the backup is of a broker on PostgreSQL but the broker in %s uses SQLite (Database=%s): "
                "nothing was changed" % (getattr(container, "name", "?"), self.database)
            )

    def describe(self, data_dir: str) -> str:
        # The URL holds no password (the broker module and the broker refuse one); no parameters.
        return self.database.split("?", 1)[0]

    def same(self, newest: str, digest: str, facts: dict) -> bool:
        try:
            with open(metadata_path(newest), encoding="utf-8") as handle:
                metadata = json.load(handle)
        except (OSError, ValueError):
            return False
        return isinstance(metadata, dict) and metadata.get("content_sha256") == facts["content_sha256"]

    def verify(self, path: str) -> None:
        with open(path, "rb") as handle:
            if handle.read(len(PG_MAGIC)) != PG_MAGIC:
                raise Failure("%s is not a dump of pg_dump's custom format" % path)

    def _password(self, data_dir: str) -> str | None:
        """The broker's database password (the first line of its DatabasePasswordFile), or None."""
        name = broker_settings(data_dir).get("DatabasePasswordFile")
        if not name:
            return None
        path = host_path(self.container, name)
        data = read_bytes(path) if path else None
        if data is None:
            raise Failure(
                "the broker's DatabasePasswordFile %s is not on this host (%s): nothing was changed"
                % (name, path or "no mount holds it")
            )
        lines = data.decode("utf-8", "replace").splitlines()
        return lines[0].strip() if lines else ""

    def _run(self, data_dir: str, script: str, purpose: str, input_path: str | None = None):
        """Run ``script`` in a one-off container; returns the stage directory (the caller removes it)."""
        image = ctr.image_ref(PG_IMAGE, ctr.COLLECTION_VERSION, None)
        if ctr.image_id(self.cli, image) is None:
            raise Failure(
                "the image %s (pg_dump, pg_restore, psql) is not on the Docker host: load it first "
                "(make images, IMAGES=postgres hack/build-images.sh); nothing was changed" % image
            )
        stage = tempfile.mkdtemp(prefix=PG_STAGE_PREFIX, dir=data_dir)
        try:
            # As the broker's user (the owner of its data directory): it may read what the broker
            # reads (the certs/ directory is the service user's alone), and the stage is made its own.
            owner = os.stat(data_dir)
            uid, gid = (owner.st_uid, owner.st_gid) if os.getuid() == 0 else (os.getuid(), os.getgid())
            if os.getuid() == 0:
                os.chown(stage, uid, gid)
            environment = {}
            password = self._password(data_dir)
            if password:
                write_atomic(os.path.join(stage, "pgpass"), pgpass_line(password), 0o600, uid, gid)
                environment["PGPASSFILE"] = PG_WORK + "/pgpass"
            mounts = [
                {"source": m["Source"], "target": m["Destination"], "read_only": True}
                for m in self.container.attrs.get("Mounts") or []
                if m.get("Source") and m.get("Destination")
            ]
            mounts.append({"source": stage, "target": PG_WORK, "read_only": False})
            if input_path:
                with (
                    open(input_path, "rb") as source,
                    atomic_open(os.path.join(stage, os.path.basename(PG_INPUT)), 0o600, uid, gid) as target,
                ):
                    shutil.copyfileobj(source, target, _CHUNK)
            self.container.reload()
            running = (self.container.attrs.get("State") or {}).get("Running")
            spec = {
                "service": "broker",
                "name": self.container.name + "-" + purpose,
                "image": image,
                "entrypoint": ["/bin/sh", "-c", script, "sh"],
                "command": [self.database],
                "environment": environment,
                "user": "%d:%d" % (uid, gid),
                "labels": dict(self.container.labels or {}),
                "mounts": mounts,
                # The broker's own network namespace while it runs; its network mode while it is stopped.
                "network_mode": "container:" + self.container.id
                if running
                else (self.container.attrs.get("HostConfig") or {}).get("NetworkMode") or "bridge",
                "network": None,
            }
            if spec["network_mode"] == "default":
                spec["network_mode"] = "bridge"
            status, output = ctr.run_once(self.cli, spec, spec["name"], [self.database], 3600)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if status != 0:
            shutil.rmtree(stage, ignore_errors=True)
            text = output.strip()
            if password:
                text = text.replace(password, "********")
            raise Failure(
                "%s of the broker's PostgreSQL database %s failed (exit code %s): %s"
                % (purpose, self.describe(data_dir), status, text or "no output")
            )
        return stage

    def snapshot(self, container, data_dir: str) -> tuple[str, dict]:
        """pg_dump of the live database (the broker keeps serving) into ``data_dir``, and what it holds."""
        stage = self._run(data_dir, PG_BACKUP_SCRIPT, "pg-dump")
        try:
            digest, version = content_digest(os.path.join(stage, "content.sql"))
            tmp = os.path.join(data_dir, ".backup-%s.dump" % uuid.uuid4().hex)
            os.rename(os.path.join(stage, "broker.dump"), tmp)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return tmp, {"schema_version": version, "content_sha256": digest}

    def _replace(self, dump: str, data_dir: str) -> None:
        stage = self._run(data_dir, PG_RESTORE_SCRIPT, "pg-restore", input_path=dump)
        shutil.rmtree(stage, ignore_errors=True)

    def put_in_place(self, backup: str, data_dir: str) -> str | None:
        """With the broker stopped: dump the database as it is (kept as broker.before-restore.dump until
        the next restore), then replace its content with ``backup`` in one transaction."""
        tmp, _facts = self.snapshot(self.container, data_dir)
        previous = os.path.join(data_dir, PREVIOUS_DUMP)
        os.replace(tmp, previous)
        self._replace(backup, data_dir)
        return previous

    def put_back(self, previous: str, data_dir: str) -> None:
        self._replace(previous, data_dir)


ENGINES = {SqliteEngine.name: SqliteEngine, PostgresEngine.name: PostgresEngine}


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _diff(backup_dir: str, before: list[str], after: list[str]) -> dict:
    def text(paths: list[str]) -> str:
        return "".join(os.path.basename(p) + "\n" for p in paths)

    return {
        "before_header": backup_dir,
        "after_header": backup_dir,
        "before": text(before),
        "after": text(after),
    }


def validate(params: dict) -> None:
    errors = []
    if params["keep"] < 1:
        errors.append("keep must be 1 or more (the backup just taken is always kept)")
    if params["state"] == "present" and params["restore_from"]:
        errors.append("restore_from is only used with state=restored")
    for key in ("stop_timeout", "wait_timeout"):
        if params[key] < 1:
            errors.append("%s must be 1 or more seconds" % key)
    if errors:
        raise Failure("; ".join(errors), errors=errors)


def run(params: dict, check_mode: bool) -> dict:
    validate(params)
    try:
        cli = ctr.client(params["docker_host"])
        if params["state"] == "restored":
            return restore(cli, params, check_mode)
        return backup(cli, params, check_mode)
    except ctr.ContainerError as exc:
        raise Failure(str(exc)) from None


def backup(cli, params: dict, check_mode: bool, engine=None) -> dict:
    """Take a backup unless the newest one holds the same database and TOTP key; keep the newest ``keep``.

    changed is true when a backup is (or would be) written or an old one removed.
    """
    backup_dir = params["backup_dir"]
    container = broker_container(cli, params)
    engine = engine or engine_for(cli, container)
    container.reload()
    if not (container.attrs.get("State") or {}).get("Running"):
        raise Failure(
            "the broker container %s is not running: an online backup needs the running broker"
            % container.name
        )
    data_dir = host_data_dir(container)
    # Read on the host: the broker reads it only when it starts, so it cannot change under the snapshot.
    key = read_bytes(os.path.join(host_secrets_dir(container, data_dir), TOTP_KEY))
    key_digest = sha256(key) if key is not None else None
    before = list_backups(backup_dir)
    tmp, facts = engine.snapshot(container, data_dir)
    try:
        digest = sha256_file(tmp)
        size = os.path.getsize(tmp)
        newest = before[-1] if before else None
        recorded = read_checksums(newest) if newest is not None else None
        same = (
            recorded is not None and recorded["totp_key"] == key_digest and engine.same(newest, digest, facts)
        )
        written = None
        if same:
            after = list(before)
            # The newest backup as it is (a dump differs from the last one only in its time).
            digest, size = recorded["database"], os.path.getsize(newest)
            facts = dict(facts, schema_version=_recorded_schema(newest, facts["schema_version"]))
        else:
            created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
            written = new_backup_path(backup_dir, created, engine.suffix)
            after = [*before, written]
            metadata = {
                "format": FORMAT,
                "engine": engine.name,
                "database": DATABASE if engine.name == SqliteEngine.name else engine.describe(data_dir),
                "file": os.path.basename(written),
                "created": created.isoformat().replace("+00:00", "Z"),
                "schema_version": facts["schema_version"],
                "collection_version": ctr.COLLECTION_VERSION,
                "image": container.attrs.get("Config", {}).get("Image"),
                **({"content_sha256": facts["content_sha256"]} if "content_sha256" in facts else {}),
                "container": container.name,
                "size": size,
                "sha256": digest,
                # The broker's TOTP key: null when the broker has none.
                "totp_key": None
                if key is None
                else {"file": os.path.basename(key_path(written)), "sha256": key_digest},
            }
            if not check_mode:
                os.makedirs(backup_dir, mode=0o700, exist_ok=True)
                with open(tmp, "rb") as source, atomic_open(written, 0o600) as target:
                    shutil.copyfileobj(source, target, _CHUNK)
                lines = "%s  %s\n" % (digest, os.path.basename(written))
                if key is not None:
                    write_atomic(key_path(written), key, 0o600)
                    lines += "%s  %s\n" % (key_digest, os.path.basename(key_path(written)))
                write_atomic(metadata_path(written), (json.dumps(metadata, indent=2) + "\n").encode(), 0o600)
                # Last: the checksum file marks the backup complete.
                write_atomic(checksum_path(written), lines.encode(), 0o600)
    finally:
        remove_quietly(tmp)
    removed = after[: -params["keep"]]
    kept = after[-params["keep"] :]
    if not check_mode:
        for path in removed:
            # The checksum file first: from then on the backup is incomplete and no longer listed.
            for name in (checksum_path(path), metadata_path(path), key_path(path), path):
                remove_quietly(name)
    latest = written or newest
    return {
        "changed": written is not None or bool(removed),
        "backup": {
            "path": latest,
            "checksum_file": checksum_path(latest),
            "metadata_file": metadata_path(latest),
            "totp_key_file": key_path(latest) if key is not None else None,
            "sha256": digest,
            "size": size,
            "schema_version": facts["schema_version"],
            "new": written is not None,
        },
        "backups": kept,
        "removed": removed,
        "diff": _diff(backup_dir, before, kept),
    }


def _recorded_schema(path: str, default):
    try:
        with open(metadata_path(path), encoding="utf-8") as handle:
            return json.load(handle).get("schema_version", default)
    except (OSError, ValueError, AttributeError):
        return default


def verify_backup(path: str) -> tuple[dict, str, bytes | None]:
    """The metadata, the database's sha256 and the TOTP key (None without one) of the backup ``path``
    after checking them; Failure when they do not match. A message never holds the key."""
    if not os.path.isfile(path):
        raise Failure("backup %s does not exist" % path)
    if not _SUFFIX_RE.search(path):
        raise Failure(
            "backup %s is not the database file of a backup (broker-<time>.db, or broker-<time>.dump of "
            "PostgreSQL)" % path
        )
    recorded = read_checksums(path)
    if recorded is None:
        raise Failure("backup %s has no checksum file %s: it is incomplete" % (path, checksum_path(path)))
    expected = recorded["database"]
    actual = sha256_file(path)
    if actual != expected:
        raise Failure(
            "backup %s does not match its checksum (sha256 recorded %s, file %s): refused, nothing was changed"
            % (path, expected, actual),
            expected_sha256=expected,
            actual_sha256=actual,
        )
    try:
        with open(metadata_path(path), encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as exc:
        raise Failure(
            "backup %s has no readable metadata %s: %s" % (path, metadata_path(path), exc)
        ) from None
    if (
        not isinstance(metadata, dict)
        or metadata.get("format") not in FORMATS
        or metadata.get("engine") not in ENGINES
        or metadata.get("sha256") != actual
    ):
        raise Failure("the metadata of backup %s does not describe it (format, engine or sha256)" % path)
    return metadata, actual, _verified_key(path, metadata, recorded["totp_key"])


def _verified_key(path: str, metadata: dict, recorded: str | None) -> bytes | None:
    """The TOTP key of the backup ``path`` once its checksum file, its metadata and its form agree."""
    described = metadata.get("totp_key") if metadata["format"] >= 2 else None
    if described is None and recorded is None:
        return None
    key_file = key_path(path)
    if (
        not isinstance(described, dict)
        or described.get("sha256") != recorded
        or described.get("file") != os.path.basename(key_file)
    ):
        raise Failure(
            "the metadata and the checksum file of backup %s do not agree on its TOTP key %s: refused, nothing "
            "was changed" % (path, key_file)
        )
    key = read_bytes(key_file)
    if key is None:
        raise Failure("backup %s lacks its TOTP key %s: refused, nothing was changed" % (path, key_file))
    if sha256(key) != recorded:
        raise Failure(
            "the TOTP key %s of backup %s does not match its checksum: refused, nothing was changed"
            % (key_file, path)
        )
    if not broker_deploy.totp_key_valid(key.decode("ascii", "replace")):
        raise Failure(
            "the TOTP key %s of backup %s is not the base64 of %d bytes: refused, nothing was changed"
            % (key_file, path, broker_deploy.TOTP_KEY_BYTES)
        )
    return key


def put_key(key: bytes, secrets_dir: str, data_dir: str) -> str | None:
    """Make ``key`` the (stopped) broker's TOTP key; returns where the previous key is kept, or None.

    A missing secrets/ is made as the broker module makes it (0700, the owner of data/).
    """
    live = os.path.join(secrets_dir, TOTP_KEY)
    if not os.path.isdir(secrets_dir):
        st = os.stat(data_dir)
        os.mkdir(secrets_dir, 0o700)
        os.chown(secrets_dir, st.st_uid, st.st_gid)
    previous = None
    if os.path.exists(live):
        st = os.stat(live)
        previous = os.path.join(secrets_dir, PREVIOUS_KEY)
        remove_quietly(previous)
        os.link(live, previous)  # the key of the previous database, kept with it until the next restore
    else:
        st = os.stat(secrets_dir)
    write_atomic(live, key, 0o600, st.st_uid, st.st_gid)
    return previous


def put_key_back(previous: str | None, secrets_dir: str) -> None:
    """Undo put_key: the previous key (or none) is the broker's key again."""
    live = os.path.join(secrets_dir, TOTP_KEY)
    if previous is None:
        remove_quietly(live)
    else:
        os.replace(previous, live)


def restore(cli, params: dict, check_mode: bool) -> dict:
    """Verify the backup, stop the broker, put the database and the TOTP key in place, start it, wait for /health.

    Everything that can be checked is checked before the broker is stopped: the checksums, the
    metadata, the files, and that the broker's image understands the backup's schema version. When
    the broker does not come up healthy on the restored database, the previous database and key are
    put back and the broker started on them. A backup without a key leaves the broker's key as it
    is (with a warning). A restore always replaces the database: changed is true.
    """
    path = params["restore_from"]
    metadata, digest, key = verify_backup(path)
    container = broker_container(cli, params)
    engine = engine_for(cli, container)
    if engine.name != metadata["engine"]:
        raise Failure(
            "backup %s is of a broker on %s, but the broker in %s uses %s (%s): refused, nothing was changed"
            % (
                path,
                metadata["engine"],
                container.name,
                engine.name,
                engine.describe(host_data_dir(container)),
            )
        )
    engine.verify(path)
    data_dir = host_data_dir(container)
    secrets_dir = host_secrets_dir(container, data_dir)
    live_key = os.path.join(secrets_dir, TOTP_KEY)
    has_key = os.path.exists(live_key)
    engine.check_schema(container, metadata.get("schema_version"))
    live = engine.describe(data_dir)
    warnings = []
    if key is None and (has_key or metadata["format"] < 2):
        warnings.append(
            "backup %s holds no TOTP key, so the broker keeps its own (%s): TOTP secrets the database holds that "
            "were enrolled under another key cannot be decrypted, and those users must enroll again"
            % (path, live_key if has_key else "it has none")
        )
    key_text = "the TOTP key of the backup" if key is not None else "kept (the backup holds none)"
    result = {
        "changed": True,
        "restored_from": path,
        "sha256": digest,
        "schema_version": metadata.get("schema_version"),
        "database": live,
        "previous": None,
        "totp_key": {"path": live_key, "restored": key is not None, "previous": None},
        "warnings_list": warnings,
        "diff": {
            "before": "%s: the current database\n%s: %s\n"
            % (live, live_key, "the current TOTP key" if has_key else "none"),
            "after": "%s: backup %s (sha256 %s, taken %s)\n%s: %s\n"
            % (live, path, digest, metadata.get("created"), live_key, key_text),
        },
    }
    if check_mode:
        return result
    reported = {k: v for k, v in result.items() if k not in ("changed", "diff", "warnings_list")}
    placed = False
    try:
        ctr.stop_container(container, params["stop_timeout"])
        result["previous"] = reported["previous"] = engine.put_in_place(path, data_dir)
        placed = True
        if key is not None:
            result["totp_key"]["previous"] = put_key(key, secrets_dir, data_dir)
    except (ctr.ContainerError, OSError, Failure) as exc:
        if placed and result["previous"] is not None:
            engine.put_back(result["previous"], data_dir)  # the key was not replaced
            reported["previous"] = None
        reported["totp_key"] = dict(result["totp_key"], restored=False, previous=None)
        again = _start_again(container, params["wait_timeout"])
        raise Failure(
            "restore of %s failed before the broker started on it: %s%s" % (path, exc, again), **reported
        ) from None
    try:
        ctr.start_container(container, params["wait_timeout"], ready=_healthy)
    except ctr.ContainerError as exc:
        if result["previous"] is None:
            raise Failure(str(exc), **reported) from None
        ctr.stop_container(container, params["stop_timeout"])
        engine.put_back(result["previous"], data_dir)
        if key is not None:
            # The key belongs to the database: the previous one comes back with it.
            put_key_back(result["totp_key"]["previous"], secrets_dir)
        reported["previous"] = None  # it is the live database again
        reported["totp_key"] = dict(result["totp_key"], restored=False, previous=None)
        again = _start_again(container, params["wait_timeout"])
        raise Failure(
            "the broker did not come up on the restored database, so the previous database was put back%s: %s%s"
            % (" with its TOTP key" if key is not None else "", exc, again),
            **reported,
        ) from None
    return result


def _start_again(container, timeout: int) -> str:
    """Start the broker again after a failed step (on its previous database): "" or why it did not."""
    container.reload()
    if (container.attrs.get("State") or {}).get("Running"):
        return ""
    try:
        ctr.start_container(container, timeout, ready=_healthy)
    except ctr.ContainerError as exc:
        return "; the broker could not be started again: %s" % exc
    return ""


def _healthy(container) -> bool:
    try:
        code, _output = ctr.exec_in(container, [PYTHON, "-c", HEALTH_SCRIPT])
    except ctr.ContainerError:
        return False
    return code == 0
