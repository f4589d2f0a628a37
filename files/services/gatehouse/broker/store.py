"""The broker's objects on top of :class:`~gatehouse.broker.db.Database`.

Readers return plain dicts in the admin API's shape (what ``GET`` answers), so the API can tell
"changed" by comparing the shape before and after a write. Writers expect validated input and
must run inside ``db.transaction()``. Names compare case-insensitively (``COLLATE NOCASE``).

The SQL is SQLite's and runs on PostgreSQL too through :func:`gatehouse.broker.pg.translate`:
keep to the constructs its rules cover (``COLLATE NOCASE`` only on columns declared so, ids read
back by name rather than ``lastrowid``, ``lower()`` on both sides to compare such a column with
a plain one).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from gatehouse.broker.db import Database
from gatehouse.broker.placement import Member

Obj = dict[str, Any]
DIRECTORY_GROUP = "directory-group"  # principal type of an entitlement naming a directory group


@dataclass
class UserRecord:
    id: int
    domain: str
    name: str
    enabled: bool
    password_hash: str | None
    source: str = "local"


@dataclass
class DesktopRecord:
    id: int
    name: str
    address: str
    hostname: str
    agent_port: int
    session_port: int
    enabled: bool
    pool_id: int | None
    logon: str
    agent_ca_pem: str
    agent_cert_sha256: str
    site: str = ""


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------ domains

    def sync_domains(self, names: list[str]) -> None:
        with self.db.transaction() as conn:
            for name in names:
                conn.execute("INSERT OR IGNORE INTO domains (name) VALUES (?)", (name,))

    def domain_id(self, name: str) -> int | None:
        row = self.db.one("SELECT id FROM domains WHERE name = ?", (name,))
        return int(row["id"]) if row else None

    def list_domains(self) -> list[str]:
        return [r["name"] for r in self.db.query("SELECT name FROM domains ORDER BY name")]

    # ------------------------------------------------------------ users

    def user_record(self, domain: str, name: str) -> UserRecord | None:
        row = self.db.one(
            "SELECT u.id, d.name AS domain, u.name, u.enabled, u.password_hash, u.source FROM users u "
            "JOIN domains d ON d.id = u.domain_id WHERE d.name = ? AND u.name = ?",
            (domain, name),
        )
        if not row:
            return None
        return UserRecord(
            row["id"], row["domain"], row["name"], bool(row["enabled"]), row["password_hash"], row["source"]
        )

    def _user_obj(self, row: Any) -> Obj:
        groups = [
            r["name"]
            for r in self.db.query(
                "SELECT g.name FROM group_members m JOIN groups g ON g.id = m.group_id "
                "WHERE m.user_id = ? ORDER BY g.name COLLATE NOCASE",
                (row["id"],),
            )
        ]
        return {
            "domain": row["domain"],
            "name": row["name"],
            "display_name": row["display_name"],
            "enabled": bool(row["enabled"]),
            "groups": groups,
            "password_set": row["password_hash"] is not None,
            "source": row["source"],
            "totp_enrolled": bool(row["totp_enrolled"]),
        }

    _USER_SELECT = (
        "SELECT u.id, d.name AS domain, u.name, u.display_name, u.enabled, u.password_hash, u.source, "
        "EXISTS (SELECT 1 FROM totp t WHERE t.user_id = u.id) AS totp_enrolled "
        "FROM users u JOIN domains d ON d.id = u.domain_id "
    )

    def get_user(self, domain: str, name: str) -> Obj | None:
        row = self.db.one(self._USER_SELECT + "WHERE d.name = ? AND u.name = ?", (domain, name))
        return self._user_obj(row) if row else None

    def list_users(self, domain: str | None = None) -> list[Obj]:
        if domain:
            rows = self.db.query(
                self._USER_SELECT + "WHERE d.name = ? ORDER BY u.name COLLATE NOCASE", (domain,)
            )
        else:
            rows = self.db.query(self._USER_SELECT + "ORDER BY d.name COLLATE NOCASE, u.name COLLATE NOCASE")
        return [self._user_obj(r) for r in rows]

    def put_user(
        self, domain: str, name: str, fields: Obj, password_hash: str | None, source: str = "local"
    ) -> None:
        """Create or update; ``fields`` holds only the keys to set, ``groups`` replaces membership.

        ``source`` is the domain's (local or ldap), recorded when the user is created.
        """
        domain_id = self.domain_id(domain)
        existing = self.user_record(domain, name)
        conn = self.db.conn
        if existing is None:
            conn.execute(
                "INSERT INTO users (domain_id, name, display_name, enabled, password_hash, source) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    domain_id,
                    name,
                    fields.get("display_name", ""),
                    int(fields.get("enabled", True)),
                    password_hash,
                    source,
                ),
            )
            created = self.user_record(domain, name)
            assert created is not None
            user_id = created.id
        else:
            user_id = existing.id
            for column in ("display_name", "enabled"):
                if column in fields:
                    value = int(fields[column]) if column == "enabled" else fields[column]
                    conn.execute(f"UPDATE users SET {column} = ? WHERE id = ?", (value, user_id))  # noqa: S608
            if password_hash is not None:
                conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))
        if "groups" in fields:
            conn.execute("DELETE FROM group_members WHERE user_id = ?", (user_id,))
            for group in fields["groups"]:
                conn.execute(
                    "INSERT OR IGNORE INTO group_members (group_id, user_id) "
                    "SELECT id, ? FROM groups WHERE domain_id = ? AND name = ?",
                    (user_id, domain_id, group),
                )

    def directory_user(self, domain: str, name: str, display_name: str) -> UserRecord:
        """The row of a directory user, created at the first login (source ldap, no password).

        An existing row is kept as it is (an administrator may have created it for a TOTP secret
        or entitlements, or disabled it); only a new row takes the directory's display name.
        Must run inside ``db.transaction()``.
        """
        record = self.user_record(domain, name)
        if record is None:
            self.db.conn.execute(
                "INSERT INTO users (domain_id, name, display_name, enabled, password_hash, source) "
                "VALUES (?, ?, ?, 1, NULL, 'ldap')",
                (self.domain_id(domain), name, display_name[:256]),
            )
            record = self.user_record(domain, name)
        assert record is not None
        return record

    # ------------------------------------------------------------ TOTP secrets (encrypted by factors.py)

    def totp(self, user_id: int) -> tuple[bytes, int] | None:
        """The user's encrypted TOTP secret and the last time step accepted, or None."""
        row = self.db.one("SELECT secret, last_step FROM totp WHERE user_id = ?", (user_id,))
        return (bytes(row["secret"]), int(row["last_step"])) if row else None

    def set_totp(self, user_id: int, secret: bytes) -> None:
        """Store a new (encrypted) secret; it replaces any earlier one and its used steps."""
        self.db.conn.execute(
            "INSERT INTO totp (user_id, secret, last_step, enrolled_at) VALUES (?, ?, 0, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET secret = excluded.secret, last_step = 0, "
            "enrolled_at = excluded.enrolled_at",
            (user_id, secret, time.time()),
        )

    def delete_totp(self, user_id: int) -> None:
        self.db.conn.execute("DELETE FROM totp WHERE user_id = ?", (user_id,))

    def accept_totp_step(self, user_id: int, step: int) -> bool:
        """Record ``step`` as used if it is later than every step used before: one atomic UPDATE,
        so two requests with the same code cannot both succeed."""
        cur = self.db.conn.execute(
            "UPDATE totp SET last_step = ? WHERE user_id = ? AND last_step < ?", (step, user_id, step)
        )
        return cur.rowcount == 1

    def replace_password_hash(self, user_id: int, old: str, new: str) -> bool:
        """Swap the stored hash only if it is still ``old`` (an admin may have set a new password)."""
        cur = self.db.conn.execute(
            "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?", (new, user_id, old)
        )
        return cur.rowcount == 1

    def delete_user(self, domain: str, name: str) -> None:
        record = self.user_record(domain, name)
        if record:
            self.db.conn.execute("DELETE FROM users WHERE id = ?", (record.id,))

    def user_group_ids(self, user_id: int) -> list[int]:
        return [
            r[0] for r in self.db.query("SELECT group_id FROM group_members WHERE user_id = ?", (user_id,))
        ]

    # ------------------------------------------------------------ groups

    _GROUP_SELECT = (
        "SELECT g.id, d.name AS domain, g.name, g.description FROM groups g "
        "JOIN domains d ON d.id = g.domain_id "
    )

    def _group_obj(self, row: Any) -> Obj:
        members = [
            r["name"]
            for r in self.db.query(
                "SELECT u.name FROM group_members m JOIN users u ON u.id = m.user_id "
                "WHERE m.group_id = ? ORDER BY u.name COLLATE NOCASE",
                (row["id"],),
            )
        ]
        return {
            "domain": row["domain"],
            "name": row["name"],
            "description": row["description"],
            "members": members,
        }

    def group_id(self, domain: str, name: str) -> int | None:
        row = self.db.one(self._GROUP_SELECT + "WHERE d.name = ? AND g.name = ?", (domain, name))
        return int(row["id"]) if row else None

    def get_group(self, domain: str, name: str) -> Obj | None:
        row = self.db.one(self._GROUP_SELECT + "WHERE d.name = ? AND g.name = ?", (domain, name))
        return self._group_obj(row) if row else None

    def list_groups(self, domain: str | None = None) -> list[Obj]:
        if domain:
            rows = self.db.query(
                self._GROUP_SELECT + "WHERE d.name = ? ORDER BY g.name COLLATE NOCASE", (domain,)
            )
        else:
            rows = self.db.query(self._GROUP_SELECT + "ORDER BY d.name COLLATE NOCASE, g.name COLLATE NOCASE")
        return [self._group_obj(r) for r in rows]

    def put_group(self, domain: str, name: str, fields: Obj) -> None:
        group_id = self.group_id(domain, name)
        if group_id is None:
            self.db.conn.execute(
                "INSERT INTO groups (domain_id, name, description) VALUES (?, ?, ?)",
                (self.domain_id(domain), name, fields.get("description", "")),
            )
        elif "description" in fields:
            self.db.conn.execute(
                "UPDATE groups SET description = ? WHERE id = ?", (fields["description"], group_id)
            )

    def delete_group(self, domain: str, name: str) -> None:
        group_id = self.group_id(domain, name)
        if group_id is not None:
            self.db.conn.execute("DELETE FROM groups WHERE id = ?", (group_id,))

    # ------------------------------------------------------------ pools

    def pool_id(self, name: str) -> int | None:
        row = self.db.one("SELECT id FROM pools WHERE name = ?", (name,))
        return int(row["id"]) if row else None

    def _pool_obj(self, row: Any) -> Obj:
        members = [
            r["name"]
            for r in self.db.query(
                "SELECT name FROM desktops WHERE pool_id = ? ORDER BY name COLLATE NOCASE", (row["id"],)
            )
        ]
        return {
            "name": row["name"],
            "persistent": bool(row["persistent"]),
            "description": row["description"],
            "members": members,
        }

    def get_pool(self, name: str) -> Obj | None:
        row = self.db.one("SELECT * FROM pools WHERE name = ?", (name,))
        return self._pool_obj(row) if row else None

    def pool_by_id(self, pool_id: int) -> Obj | None:
        row = self.db.one("SELECT * FROM pools WHERE id = ?", (pool_id,))
        return dict(row) if row else None

    def list_pools(self) -> list[Obj]:
        return [self._pool_obj(r) for r in self.db.query("SELECT * FROM pools ORDER BY name COLLATE NOCASE")]

    def put_pool(self, name: str, fields: Obj) -> None:
        conn = self.db.conn
        pool_id = self.pool_id(name)
        if pool_id is None:
            conn.execute(
                "INSERT INTO pools (name, persistent, description) VALUES (?, ?, ?)",
                (name, int(fields.get("persistent", False)), fields.get("description", "")),
            )
            pool_id = self.pool_id(name)
        else:
            if "persistent" in fields:
                conn.execute(
                    "UPDATE pools SET persistent = ? WHERE id = ?", (int(fields["persistent"]), pool_id)
                )
            if "description" in fields:
                conn.execute(
                    "UPDATE pools SET description = ? WHERE id = ?", (fields["description"], pool_id)
                )
        if "members" in fields:
            conn.execute("UPDATE desktops SET pool_id = NULL WHERE pool_id = ?", (pool_id,))
            for desktop in fields["members"]:
                conn.execute("UPDATE desktops SET pool_id = ? WHERE name = ?", (pool_id, desktop))
        if not fields.get("persistent", True):
            conn.execute("DELETE FROM assignments WHERE pool_id = ?", (pool_id,))

    def delete_pool(self, name: str) -> None:
        pool_id = self.pool_id(name)
        if pool_id is not None:
            self.db.conn.execute("DELETE FROM pools WHERE id = ?", (pool_id,))

    # ------------------------------------------------------------ desktops

    def _desktop_record(self, row: Any) -> DesktopRecord:
        return DesktopRecord(
            row["id"],
            row["name"],
            row["address"],
            row["hostname"],
            row["agent_port"],
            row["session_port"],
            bool(row["enabled"]),
            row["pool_id"],
            row["logon"],
            row["agent_ca_pem"],
            row["agent_cert_sha256"],
            row["site"],
        )

    def desktop_record(self, name: str) -> DesktopRecord | None:
        row = self.db.one("SELECT * FROM desktops WHERE name = ?", (name,))
        return self._desktop_record(row) if row else None

    def desktop_by_id(self, desktop_id: int) -> DesktopRecord | None:
        row = self.db.one("SELECT * FROM desktops WHERE id = ?", (desktop_id,))
        return self._desktop_record(row) if row else None

    _DESKTOP_SELECT = "SELECT d.*, p.name AS pool FROM desktops d LEFT JOIN pools p ON p.id = d.pool_id "

    @staticmethod
    def _desktop_obj(row: Any) -> Obj:
        return {
            "name": row["name"],
            "address": row["address"],
            "hostname": row["hostname"],
            "agent_port": row["agent_port"],
            "session_port": row["session_port"],
            "enabled": bool(row["enabled"]),
            "pool": row["pool"],
            "logon": row["logon"],
            "agent_ca_pem": row["agent_ca_pem"],
            "agent_cert_sha256": row["agent_cert_sha256"],
            "site": row["site"],
        }

    def get_desktop(self, name: str) -> Obj | None:
        row = self.db.one(self._DESKTOP_SELECT + "WHERE d.name = ?", (name,))
        return self._desktop_obj(row) if row else None

    def list_desktops(self) -> list[Obj]:
        return [
            self._desktop_obj(r)
            for r in self.db.query(self._DESKTOP_SELECT + "ORDER BY d.name COLLATE NOCASE")
        ]

    def put_desktop(self, name: str, fields: Obj) -> None:
        conn = self.db.conn
        values = dict(fields)
        if "pool" in values:
            pool = values.pop("pool")
            values["pool_id"] = self.pool_id(pool) if pool else None
        existing = self.desktop_record(name)
        if existing is None:
            columns = ["name", *values]
            conn.execute(
                f"INSERT INTO desktops ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",  # noqa: S608
                (name, *(int(v) if isinstance(v, bool) else v for v in values.values())),
            )
        else:
            for column, value in values.items():
                conn.execute(
                    f"UPDATE desktops SET {column} = ? WHERE id = ?",  # noqa: S608 - column names are fixed
                    (int(value) if isinstance(value, bool) else value, existing.id),
                )

    def delete_desktop(self, name: str) -> None:
        self.db.conn.execute("DELETE FROM desktops WHERE name = ?", (name,))

    # ------------------------------------------------------------ entitlements

    def _principal_id(self, principal_type: str, domain: str, name: str) -> int | None:
        if principal_type == "user":
            record = self.user_record(domain, name)
            return record.id if record else None
        return self.group_id(domain, name)

    def _resource_id(self, resource_type: str, name: str) -> int | None:
        if resource_type == "desktop":
            record = self.desktop_record(name)
            return record.id if record else None
        return self.pool_id(name)

    _ENT_SELECT = """
        SELECT e.id,
               CASE WHEN e.user_id IS NOT NULL THEN 'user' ELSE 'group' END AS principal_type,
               COALESCE(ud.name, gd.name) AS domain,
               COALESCE(u.name, g.name) AS principal,
               CASE WHEN e.desktop_id IS NOT NULL THEN 'desktop' ELSE 'pool' END AS resource_type,
               COALESCE(dk.name, p.name) AS resource
        FROM entitlements e
        LEFT JOIN users u ON u.id = e.user_id LEFT JOIN domains ud ON ud.id = u.domain_id
        LEFT JOIN groups g ON g.id = e.group_id LEFT JOIN domains gd ON gd.id = g.domain_id
        LEFT JOIN desktops dk ON dk.id = e.desktop_id LEFT JOIN pools p ON p.id = e.pool_id
    """

    @staticmethod
    def _ent_obj(row: Any) -> Obj:
        return {
            "principal_type": row["principal_type"],
            "domain": row["domain"],
            "principal": row["principal"],
            "resource_type": row["resource_type"],
            "resource": row["resource"],
        }

    _DIR_ENT_SELECT = """
        SELECT de.id, 'directory-group' AS principal_type, dm.name AS domain, de.principal,
               CASE WHEN de.desktop_id IS NOT NULL THEN 'desktop' ELSE 'pool' END AS resource_type,
               COALESCE(dk.name, p.name) AS resource
        FROM directory_entitlements de JOIN domains dm ON dm.id = de.domain_id
        LEFT JOIN desktops dk ON dk.id = de.desktop_id LEFT JOIN pools p ON p.id = de.pool_id
    """

    def _dir_ent_where(self, key: tuple[str, str, str, str, str]) -> tuple[str, tuple[object, ...]] | None:
        _ptype, domain, name, resource_type, resource = key
        domain_id = self.domain_id(domain)
        rid = self._resource_id(resource_type, resource)
        if domain_id is None or rid is None:
            return None
        rcol = "desktop_id" if resource_type == "desktop" else "pool_id"
        return f"de.domain_id = ? AND de.principal = ? AND de.{rcol} = ?", (domain_id, name, rid)

    def _ent_where(self, key: tuple[str, str, str, str, str]) -> tuple[str, tuple[object, ...]] | None:
        principal_type, domain, name, resource_type, resource = key
        pid = self._principal_id(principal_type, domain, name)
        rid = self._resource_id(resource_type, resource)
        if pid is None or rid is None:
            return None
        pcol = "user_id" if principal_type == "user" else "group_id"
        rcol = "desktop_id" if resource_type == "desktop" else "pool_id"
        return f"e.{pcol} = ? AND e.{rcol} = ?", (pid, rid)

    def get_entitlement(self, key: tuple[str, str, str, str, str]) -> Obj | None:
        if key[0] == DIRECTORY_GROUP:
            dwhere = self._dir_ent_where(key)
            row = self.db.one(self._DIR_ENT_SELECT + "WHERE " + dwhere[0], dwhere[1]) if dwhere else None
            return self._ent_obj(row) if row else None
        where = self._ent_where(key)
        if where is None:
            return None
        row = self.db.one(self._ENT_SELECT + "WHERE " + where[0], where[1])
        return self._ent_obj(row) if row else None

    def list_entitlements(self, filters: dict[str, str]) -> list[Obj]:
        rows = [self._ent_obj(r) for r in self.db.query(self._ENT_SELECT)]
        rows += [self._ent_obj(r) for r in self.db.query(self._DIR_ENT_SELECT)]
        for field_name, wanted in filters.items():
            rows = [r for r in rows if str(r[field_name]).lower() == wanted.lower()]
        return sorted(rows, key=lambda r: tuple(str(v).lower() for v in r.values()))

    def put_entitlement(self, key: tuple[str, str, str, str, str]) -> None:
        principal_type, domain, name, resource_type, resource = key
        if principal_type == DIRECTORY_GROUP:
            rcol = "desktop_id" if resource_type == "desktop" else "pool_id"
            self.db.conn.execute(
                f"INSERT OR IGNORE INTO directory_entitlements (domain_id, principal, {rcol}) VALUES (?, ?, ?)",  # noqa: S608
                (self.domain_id(domain), name, self._resource_id(resource_type, resource)),
            )
            return
        pid = self._principal_id(principal_type, domain, name)
        rid = self._resource_id(resource_type, resource)
        pcol = "user_id" if principal_type == "user" else "group_id"
        rcol = "desktop_id" if resource_type == "desktop" else "pool_id"
        self.db.conn.execute(
            f"INSERT OR IGNORE INTO entitlements ({pcol}, {rcol}) VALUES (?, ?)",  # noqa: S608
            (pid, rid),
        )

    def delete_entitlement(self, key: tuple[str, str, str, str, str]) -> None:
        if key[0] == DIRECTORY_GROUP:
            dwhere = self._dir_ent_where(key)
            if dwhere is not None:
                clause = dwhere[0].replace("de.", "")
                self.db.conn.execute("DELETE FROM directory_entitlements WHERE " + clause, dwhere[1])  # noqa: S608
            return
        where = self._ent_where(key)
        if where is not None:
            clause = where[0].replace("e.", "")
            self.db.conn.execute("DELETE FROM entitlements WHERE " + clause, where[1])  # noqa: S608

    # ------------------------------------------------------------ what a user may use

    def directory_entitlement_ids(self, domain: str, groups: Collection[str]) -> tuple[set[int], set[int]]:
        """Desktop and pool ids entitled to any of ``groups`` (CNs and DNs) of ``domain``.

        Matched case-insensitively. The domain's directory entitlements are few (one per group
        and resource an administrator named), so they are read and matched here rather than
        sending a user's possibly many groups as query parameters.
        """
        wanted = {g.lower() for g in groups}
        desktops: set[int] = set()
        pools: set[int] = set()
        if not wanted:
            return desktops, pools
        rows = self.db.query(
            "SELECT de.principal, de.desktop_id, de.pool_id FROM directory_entitlements de "
            "JOIN domains dm ON dm.id = de.domain_id WHERE dm.name = ?",
            (domain,),
        )
        for row in rows:
            if row["principal"].lower() in wanted:
                if row["desktop_id"] is not None:
                    desktops.add(int(row["desktop_id"]))
                else:
                    pools.add(int(row["pool_id"]))
        return desktops, pools

    def entitled(
        self, user_id: int, domain: str = "", directory_groups: Collection[str] = ()
    ) -> tuple[list[DesktopRecord], list[Obj]]:
        """Desktops and pools the user is entitled to, directly, through a broker group, or (a
        directory user of ``domain``) through a directory-group entitlement naming one of
        ``directory_groups`` by CN or DN."""
        groups = self.user_group_ids(user_id)
        dir_desktops, dir_pools = self.directory_entitlement_ids(domain, directory_groups)
        marks = ",".join("?" * len(groups)) or "NULL"
        cond = f"(e.user_id = ? OR e.group_id IN ({marks}))"

        def query(table: str, column: str, extra: set[int]) -> list[Any]:
            # Entitled directly or through a broker group, or one of the directory-group ids.
            also = ",".join("?" * len(extra)) or "NULL"
            return self.db.query(
                f"SELECT r.* FROM {table} r WHERE r.id IN (SELECT e.{column} FROM entitlements e "  # noqa: S608
                f"WHERE {cond}) OR r.id IN ({also}) ORDER BY r.name COLLATE NOCASE",
                (user_id, *groups, *sorted(extra)),
            )

        desktops = [self._desktop_record(r) for r in query("desktops", "desktop_id", dir_desktops)]
        pools = [dict(r) for r in query("pools", "pool_id", dir_pools)]
        return desktops, pools

    # ------------------------------------------------------------ load, placement state

    def members(self, *, pool_id: int | None = None, desktop_id: int | None = None) -> list[Member]:
        """Placement view of a pool's desktops (or of one desktop) with their latest load report."""
        where, param = ("d.pool_id = ?", pool_id) if desktop_id is None else ("d.id = ?", desktop_id)
        sql = (
            "SELECT d.id, d.name, d.enabled, d.site, r.active_sessions, r.capacity, r.reported_at, "
            "COALESCE(l.placed_since_report, 0) AS placed_since_report, "
            "COALESCE(l.placed_total, 0) AS placed_total "
            "FROM desktops d LEFT JOIN desktop_load l ON l.desktop_id = d.id "
            "LEFT JOIN agent_reports r ON r.desktop_id = d.id AND r.agent_port = d.agent_port "
            "AND (lower(r.address) = lower(d.address) OR (r.hostname <> '' AND lower(r.hostname) = lower(d.address))) "
            "WHERE " + where + " ORDER BY d.id"
        )
        rows = self.db.query(sql, (param,))
        best: dict[int, Member] = {}
        for r in rows:
            member = Member(
                desktop_id=r["id"],
                name=r["name"],
                enabled=bool(r["enabled"]),
                active_sessions=r["active_sessions"],
                capacity=r["capacity"],
                reported_at=r["reported_at"],
                placed_since_report=r["placed_since_report"],
                placed_total=r["placed_total"],
                site=r["site"],
            )
            best[member.desktop_id] = member
        return list(best.values())

    def record_placement(self, desktop_id: int) -> None:
        self.db.conn.execute(
            "INSERT INTO desktop_load (desktop_id, placed_since_report, placed_total) VALUES (?, 1, 1) "
            "ON CONFLICT (desktop_id) DO UPDATE SET placed_since_report = desktop_load.placed_since_report + 1, "
            "placed_total = desktop_load.placed_total + 1",
            (desktop_id,),
        )

    def assignment(self, user_id: int, pool_id: int) -> int | None:
        row = self.db.one(
            "SELECT desktop_id FROM assignments WHERE user_id = ? AND pool_id = ?", (user_id, pool_id)
        )
        return int(row[0]) if row else None

    def set_assignment(self, user_id: int, pool_id: int, desktop_id: int) -> None:
        self.db.conn.execute(
            "INSERT INTO assignments (user_id, pool_id, desktop_id, assigned_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, pool_id) DO UPDATE SET desktop_id = excluded.desktop_id, "
            "assigned_at = excluded.assigned_at",
            (user_id, pool_id, desktop_id, time.time()),
        )

    _ASSIGN_SELECT = (
        "SELECT p.name AS pool, dm.name AS domain, u.name AS user, d.name AS desktop, a.assigned_at "
        "FROM assignments a JOIN pools p ON p.id = a.pool_id JOIN users u ON u.id = a.user_id "
        "JOIN domains dm ON dm.id = u.domain_id JOIN desktops d ON d.id = a.desktop_id "
    )

    def list_assignments(self, pool: str | None = None) -> list[Obj]:
        if pool:
            rows = self.db.query(self._ASSIGN_SELECT + "WHERE p.name = ? ORDER BY u.name", (pool,))
        else:
            rows = self.db.query(self._ASSIGN_SELECT + "ORDER BY p.name, dm.name, u.name")
        return [dict(r) for r in rows]

    def get_assignment(self, pool: str, domain: str, user: str) -> Obj | None:
        row = self.db.one(
            self._ASSIGN_SELECT + "WHERE p.name = ? AND dm.name = ? AND u.name = ?", (pool, domain, user)
        )
        return dict(row) if row else None

    def delete_assignment(self, pool: str, domain: str, user: str) -> None:
        record = self.user_record(domain, user)
        pool_id = self.pool_id(pool)
        if record and pool_id is not None:
            self.db.conn.execute(
                "DELETE FROM assignments WHERE user_id = ? AND pool_id = ?", (record.id, pool_id)
            )

    def report_desktops(self, address: str, hostname: str, agent_port: int) -> list[DesktopRecord]:
        """Registered desktops an agent at ``address`` (or ``hostname``) and ``agent_port`` serves."""
        rows = self.db.query(
            "SELECT * FROM desktops WHERE agent_port = ? AND (lower(address) = lower(?) OR "
            "(? <> '' AND lower(address) = lower(?))) ORDER BY id",
            (agent_port, address, hostname, hostname),
        )
        return [self._desktop_record(r) for r in rows]

    def record_report(self, desktop_ids: list[int], report: Obj, now: float) -> None:
        """Store an agent's load report for each of its desktops (one row per desktop) and restart
        their 'placed since report' counters."""
        conn = self.db.conn
        for desktop_id in desktop_ids:
            conn.execute(
                "INSERT INTO agent_reports (desktop_id, address, agent_port, hostname, session_port, "
                "active_sessions, capacity, reported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (desktop_id) DO UPDATE SET address = excluded.address, "
                "agent_port = excluded.agent_port, hostname = excluded.hostname, "
                "session_port = excluded.session_port, active_sessions = excluded.active_sessions, "
                "capacity = excluded.capacity, reported_at = excluded.reported_at",
                (
                    desktop_id,
                    report["address"],
                    report["agent_port"],
                    report["hostname"],
                    report["session_port"],
                    report["active_sessions"],
                    report["capacity"],
                    now,
                ),
            )
            conn.execute(
                "UPDATE desktop_load SET placed_since_report = 0 WHERE desktop_id = ?", (desktop_id,)
            )

    def site_last_reports(self) -> dict[str, float]:
        """The latest load report of any desktop of each site, for the sites with a report."""
        rows = self.db.query(
            "SELECT d.site, MAX(r.reported_at) AS last FROM desktops d "
            "JOIN agent_reports r ON r.desktop_id = d.id WHERE d.site <> '' GROUP BY d.site"
        )
        return {r["site"]: float(r["last"]) for r in rows}

    def list_sites(self) -> list[Obj]:
        """Every site named by a desktop: its desktops and the time of its latest report (or None)."""
        last = self.site_last_reports()
        rows = self.db.query(
            "SELECT site, COUNT(*) AS desktops FROM desktops WHERE site <> '' GROUP BY site ORDER BY site"
        )
        return [
            {"name": r["site"], "desktops": r["desktops"], "last_report": last.get(r["site"])} for r in rows
        ]

    def list_reports(self) -> list[Obj]:
        rows = self.db.query(
            "SELECT r.address, r.agent_port, r.hostname, r.session_port, r.active_sessions, r.capacity, "
            "r.reported_at, d.name AS desktop FROM agent_reports r JOIN desktops d ON d.id = r.desktop_id "
            "ORDER BY r.address, r.agent_port, d.name"
        )
        return [dict(r) for r in rows]
