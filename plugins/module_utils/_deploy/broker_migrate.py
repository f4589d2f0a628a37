# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the broker_migrate module: move the broker's database between SQLite and PostgreSQL.

The copy is the broker's own ``python -m gatehouse.broker.migrate`` (files/services/gatehouse/
broker/migrate.py), run in a one-off container of the broker container's image (so it knows the
schema of the broker it moves) through the collection's Docker layer, hardened like the broker,
with the broker's mounts, as the owner of its data directory, in the broker's network namespace
while it runs and its network mode while it is stopped. The SQLite side is a file of the broker's
data directory (``/data/<sqlite_file>``); the PostgreSQL side is ``database_url``. The password
and the CA of ``database_ca_cert`` are put in a 0600 stage directory of the data directory and
named by options of the command: never on a command line, in the container's environment or in
the result.

Invariants: every check runs before anything changes - the options, the broker container, its
current database (the source, or already the target), and a ``--check`` run of the copy against
both databases while the broker keeps serving (a target with other rows, another schema version,
a database that cannot be reached: the task fails with the broker untouched). Only then is the
broker stopped and the copy made (one transaction on the target, counts and content compared
before and after the commit). A copy that fails starts the broker again on its unchanged source.
A target that already holds the source's rows, or a broker that already uses the target, is no
change. An SQLite target that holds other rows is, with ``replace``, moved aside as
``<file>.before-migrate`` (not emptied in place) and the copy goes to a new file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import write_atomic
from ansible_collections.gatehouse.access.plugins.module_utils._common.files import read_bytes
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker as broker_deploy
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker_backup
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr

PYTHON = broker_backup.PYTHON
DATA_MOUNT = broker_deploy.DATA_MOUNT
STAGE_PREFIX = ".migrate-"
PREVIOUS_SUFFIX = ".before-migrate"
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Exit codes of gatehouse.broker.migrate.
EXIT_OK, EXIT_DIFFERS, EXIT_UNUSABLE, EXIT_REFUSED = 0, 1, 2, 3
MASK = "********"
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the database and SQLite's journal files


def validate(params: dict) -> None:
    errors: list[str] = []
    broker_deploy.validate_database(params, errors)
    if params["to"] == "postgresql" and not params.get("database_url"):
        errors.append("to=postgresql needs database_url (the PostgreSQL database to copy to)")
    if not _FILE_RE.match(params["sqlite_file"] or "") or params["sqlite_file"] in (".", ".."):
        errors.append(
            "sqlite_file %r must be a file name in the broker's data directory" % params["sqlite_file"]
        )
    ca = params.get("database_ca_cert")
    if ca and not os.path.isfile(ca):
        errors.append("database_ca_cert %s is not a file on this host" % ca)
    for key in ("stop_timeout", "timeout"):
        if params[key] < 1:
            errors.append("%s must be 1 or more seconds" % key)
    if errors:
        raise Failure("; ".join(errors), errors=errors)


def _base(database: str) -> str:
    """A database without its parameters (the broker module adds sslmode and sslrootcert)."""
    return database.split("?", 1)[0].rstrip("/")


def sides(params: dict, url: str) -> tuple[str, str]:
    """(source, target) as the copy in the container names them (the URL without the CA's parameters)."""
    sqlite = DATA_MOUNT + "/" + params["sqlite_file"]
    return (sqlite, url) if params["to"] == "postgresql" else (url, sqlite)


def shown(database: str) -> str:
    return _base(database) if broker_backup.is_postgresql(database) else database


class Copier:
    """Runs gatehouse.broker.migrate in one-off containers of the broker's image."""

    def __init__(self, cli, container, params: dict) -> None:
        self.cli = cli
        self.container = container
        self.params = params
        self.data_dir = broker_backup.host_data_dir(container)
        self.image = (container.attrs.get("Config") or {}).get("Image") or container.image.id
        owner = os.stat(self.data_dir)
        self.uid, self.gid = (owner.st_uid, owner.st_gid) if os.getuid() == 0 else (os.getuid(), os.getgid())
        self.secrets = [params["database_password"]] if params.get("database_password") else []
        settings = broker_backup.broker_settings(self.data_dir)
        self.broker_database = settings.get("Database") or DATA_MOUNT + "/" + broker_deploy.DATABASE
        # Back to SQLite without database_url: the broker's own URL and password file (as it reads them).
        self.own = params["to"] == "sqlite" and not params.get("database_url")
        self.url = self.broker_database if self.own else params["database_url"]
        self.password_file = settings.get("DatabasePasswordFile") if self.own else None
        if self.password_file:
            path = broker_backup.host_path(container, self.password_file)
            data = read_bytes(path) if path else None
            lines = (data or b"").decode("utf-8", "replace").splitlines()
            if lines and lines[0].strip():
                self.secrets.append(lines[0].strip())

    def run(self, *extra: str) -> tuple[int | None, dict]:
        """One run of the copy with ``extra`` options; (exit code, its JSON report)."""
        for leftover in os.listdir(self.data_dir):
            if leftover.startswith(STAGE_PREFIX):
                # The stage of an interrupted run still holds the password.
                shutil.rmtree(os.path.join(self.data_dir, leftover), ignore_errors=True)
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=self.data_dir)
        try:
            if os.getuid() == 0:
                os.chown(stage, self.uid, self.gid)
            inside = DATA_MOUNT + "/" + os.path.basename(stage)
            source, target = sides(self.params, self.url)
            url = self.url
            if self.params.get("database_ca_cert"):
                with open(self.params["database_ca_cert"], "rb") as handle:
                    write_atomic(
                        os.path.join(stage, "database-ca.pem"), handle.read(), 0o600, self.uid, self.gid
                    )
                query = broker_deploy.parse_database_url(url)["query"]
                added = ([] if "sslmode" in query else ["sslmode=verify-full"]) + [
                    "sslrootcert=%s/database-ca.pem" % inside
                ]
                url = url + ("&" if "?" in url else "?") + "&".join(added)
            source, target = (source, url) if self.params["to"] == "postgresql" else (url, target)
            command = ["--source", source, "--target", target, "--json", *extra]
            if self.secrets:
                write_atomic(
                    os.path.join(stage, "password"),
                    (self.secrets[0] + "\n").encode(),
                    0o600,
                    self.uid,
                    self.gid,
                )
                side = (
                    "--target-password-file"
                    if self.params["to"] == "postgresql"
                    else "--source-password-file"
                )
                command += [side, inside + "/password"]
            elif self.password_file:
                command += ["--source-password-file", self.password_file]
            self.container.reload()
            running = (self.container.attrs.get("State") or {}).get("Running")
            mode = (
                "container:" + self.container.id
                if running
                else (self.container.attrs.get("HostConfig") or {}).get("NetworkMode") or "bridge"
            )
            spec = {
                "service": "broker",
                "name": self.container.name + "-migrate",
                "image": self.image,
                "entrypoint": [PYTHON, "-m", "gatehouse.broker.migrate"],
                "command": command,
                "user": "%d:%d" % (self.uid, self.gid),
                "labels": dict(self.container.labels or {}),
                "mounts": [
                    {
                        "source": m["Source"],
                        "target": m["Destination"],
                        "read_only": m["Destination"] != DATA_MOUNT,
                    }
                    for m in self.container.attrs.get("Mounts") or []
                    if m.get("Source") and m.get("Destination")
                ],
                "network_mode": "bridge" if mode == "default" else mode,
                "network": None,
            }
            status, output = ctr.run_once(self.cli, spec, spec["name"], command, self.params["timeout"])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        output = self.scrub(output)
        try:
            start = output.index("{")
            report = json.loads(output[start:])
        except ValueError:
            if "No module named gatehouse.broker.migrate" in output:
                raise Failure(
                    "the broker's image %s has no gatehouse.broker.migrate: upgrade the broker first; nothing was "
                    "changed" % self.image
                ) from None
            raise Failure(
                "the copy in a container of %s gave no report (exit code %s): %s"
                % (self.image, status, output.strip()[-2000:] or "no output")
            ) from None
        return status, report

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def _tables(report: dict) -> dict:
    return {
        name: {"source": t.get("source"), "target": t.get("target"), "same": t.get("same")}
        for name, t in (report.get("tables") or {}).items()
    }


def _counts_text(header: str, tables: dict, key: str) -> str:
    lines = [header]
    for name, t in tables.items():
        lines.append("  %s: %s" % (name, "-" if t.get(key) is None else t[key]))
    return "\n".join(lines) + "\n"


def _failure(result: dict, msg: str) -> Failure:
    return Failure(msg, **{k: v for k, v in result.items() if k not in ("msg", "diff")})


def migrate(cli, params: dict, check_mode: bool) -> dict:
    """Check, stop the broker, copy and compare (module doc); the result with the per-table counts."""
    container = broker_backup.broker_container(cli, params)
    copier = Copier(cli, container, params)
    database = copier.broker_database
    source, target = sides(params, copier.url)
    result = {
        "changed": False,
        "source": shown(source),
        "target": shown(target),
        "broker_database": shown(database),
        "status": "",
        "schema_version": None,
        "tables": {},
        "rows": 0,
        "broker_stopped": False,
        "previous": None,
    }
    if _base(database) == _base(target):
        result.update(
            status="in-use",
            msg="the broker %s already uses %s: nothing to move" % (container.name, result["target"]),
        )
        return result
    if _base(database) != _base(source):
        raise _failure(
            result,
            "the broker %s uses %s, which is not the source %s of this move: nothing was changed"
            % (container.name, result["broker_database"], result["source"]),
        )
    replace_file = False
    status, report = copier.run("--check")
    result.update(
        schema_version=report.get("schema_version"), tables=_tables(report), status=report.get("status")
    )
    result["rows"] = sum(t["source"] or 0 for t in result["tables"].values())
    if (
        status == EXIT_REFUSED
        and params["replace"]
        and params["to"] == "sqlite"
        and "other rows" in report["message"]
    ):
        replace_file = True  # the file is moved aside, the copy goes to a new one
    elif status != EXIT_OK:
        raise _failure(result, "%s; nothing was changed" % report.get("message", "the copy was refused"))
    diff = {
        "before": _counts_text("%s (rows per table)" % result["target"], result["tables"], "target"),
        "after": _counts_text("%s (rows per table)" % result["target"], result["tables"], "source"),
    }
    if report.get("status") == "same":
        result["msg"] = report["message"]
        return result
    result.update(changed=True, diff=diff, status="would-copy" if check_mode else "")
    result["msg"] = report.get("message", "")
    if check_mode:
        return result

    container.reload()
    was_running = bool((container.attrs.get("State") or {}).get("Running"))
    if params["stop_broker"] and was_running:
        ctr.stop_container(container, params["stop_timeout"])
        result["broker_stopped"] = True
    moved: list[tuple[str, str]] = []
    try:
        extra = ["--replace"] if params["replace"] and params["to"] == "postgresql" else []
        if replace_file:
            name = params["sqlite_file"]
            for suffix in SQLITE_SUFFIXES:
                kept = os.path.join(copier.data_dir, name + PREVIOUS_SUFFIX + suffix)
                broker_backup.remove_quietly(kept)
            for suffix in SQLITE_SUFFIXES:
                path = os.path.join(copier.data_dir, name + suffix)
                if os.path.exists(path):
                    kept = os.path.join(copier.data_dir, name + PREVIOUS_SUFFIX + suffix)
                    os.replace(path, kept)
                    moved.append((kept, path))
            result["previous"] = os.path.join(copier.data_dir, name + PREVIOUS_SUFFIX)
        status, report = copier.run(*extra)
    except (ctr.ContainerError, OSError, Failure) as exc:
        status, report = None, {"message": str(exc)}
    result.update(status=report.get("status", "failed"), tables=_tables(report) or result["tables"])
    if status != EXIT_OK or report.get("status") not in ("copied", "same"):
        for kept, path in reversed(moved):
            os.replace(kept, path)
        result.update(changed=False, previous=None)
        again = ""
        if result["broker_stopped"]:
            try:
                ctr.start_container(container, params["stop_timeout"] + 60)
                result["broker_stopped"] = False
            except ctr.ContainerError as exc:
                again = "; the broker could not be started again: %s" % exc
        raise _failure(
            result,
            "the copy failed, the broker keeps its database %s: %s%s"
            % (result["broker_database"], report.get("message", "no report"), again),
        )
    result["rows"] = sum(t["source"] or 0 for t in result["tables"].values())
    result["msg"] = report.get("message", "")
    return result


def run(params: dict, check_mode: bool) -> dict:
    validate(params)
    try:
        cli = ctr.client(params["docker_host"])
        return migrate(cli, params, check_mode)
    except ctr.ContainerError as exc:
        raise Failure(str(exc)) from None
