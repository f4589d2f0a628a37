#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_backup
short_description: Back up the connection broker's database and TOTP key, keep the newest N, restore one
version_added: 0.1.0
description:
  - With O(state=present), takes a consistent online backup of the database of the broker container
    C(<name_prefix>-broker) while it keeps serving, with SQLite's online backup API run inside the container
    (PostgreSQL - see below),
    and writes it to O(backup_dir) as files of mode 0600 named after the UTC time -
    C(broker-<time>.db), C(broker-<time>.totp.key) (the broker's TOTP key C(secrets/totp.key), when it has
    one - it decrypts the enrolled TOTP secrets in the database), C(broker-<time>.json) (metadata - format,
    engine, time, schema version, collection version, image, size, sha256 of the database and of the key)
    and C(broker-<time>.db.sha256) (C(sha256sum -c) format, one line per file). Each file is written
    atomically, the checksum file last; a backup without it is incomplete and ignored.
  - An SQLite copy passes SQLite's integrity check before it is kept. When the newest backup already holds the
    same database and the same key (same sha256), no new backup is written. Then only the newest O(keep)
    backups stay.
  - The key is never returned, shown in a diff or named in a message; only its path is. Its file name ends
    in C(.key), so support bundles list it without reading it.
  - With O(state=restored), verifies the backup O(restore_from) before anything else - the database and the
    key against its checksum file and its metadata, that the database is an SQLite file and the key a key of
    the broker's form, and that the running broker's image understands its schema version (an older one is
    migrated forward when the broker starts) - and refuses a backup that does not pass with nothing changed.
    Then it stops the broker container, keeps the current database as C(broker.db.before-restore) and the
    current key as C(secrets/totp.before-restore.key) (until the next restore), removes SQLite's journal
    files, puts the database and the key in place by renames, starts the container and waits until the
    broker's C(/health) answers. When the broker does not come up on the restored database, the previous
    database and key are put back, the broker is started on them and the task fails.
  - A backup without a key (taken before the key was part of backups) restores the database only; the broker
    keeps its key and the module warns that TOTP secrets enrolled under another key cannot be decrypted.
  - A broker deployed with O(gatehouse.access.broker#module:database_url) keeps its state in PostgreSQL. Its
    backup is C(broker-<time>.dump), written by C(pg_dump) in custom format, run in a one-off container of the
    image C(gatehouse/postgres) (the broker's image has no client tools) in the broker container's network
    namespace, with the broker's mounts read-only; the password reaches it in a 0600 password file
    (C(PGPASSFILE)), never on a command line or in the container's environment. The metadata holds
    C(content_sha256), the sha256 of the dump's SQL (a dump holds the time it was taken), which tells whether
    the newest backup holds the same data. A restore keeps the current database as
    C(data/broker.before-restore.dump) (until the next restore), then runs the backup's SQL
    (C(pg_restore --no-owner --no-privileges)) in one transaction after C(DROP OWNED BY CURRENT_USER) - the
    database is empty when the backup's objects are created, and an error leaves it as it was. The broker's
    database role must own its objects (the broker creates them).
  - A backup restores only into a broker of its engine (SQLite or PostgreSQL); another is refused with nothing
    changed.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - With O(state=present) the copy is taken and compared with the newest backup, then deleted; the result
        and the diff say which backup would be written and which would be removed. Nothing is kept.
      - With O(state=restored) the backup and its key are verified; the broker is not stopped and nothing is
        written.
  diff_mode:
    support: full
    details:
      - O(state=present) shows the backups of O(backup_dir) before and after; O(state=restored) names the
        backup that replaces the database and whether the key is replaced (never the key itself).
  idempotent:
    description: Whether a second run with the same options, on an unchanged broker, changes nothing.
    support: partial
    details:
      - O(state=present) reports V(changed=true) when it writes a new backup (the database or the key differs
        from the newest backup) or removes backups beyond O(keep); run again on an unchanged database and key
        it changes nothing.
      - O(state=restored) always replaces the database and restarts the broker, so it always reports
        V(changed=true).
  platform:
    platforms: posix
requirements:
  - Docker SDK for Python (C(docker)) >= 6.0 on the managed host.
  - For a broker on PostgreSQL, the image C(gatehouse/postgres) of the collection's version on the Docker host.
options:
  state:
    description:
      - V(present) takes a backup, V(restored) restores O(restore_from).
    type: str
    choices: [present, restored]
    default: present
  backup_dir:
    description:
      - Directory of the backups on the broker's host; created with mode 0700 (the backups hold password
        hashes and the TOTP key). Required with O(state=present); not used by O(state=restored).
    type: path
  keep:
    description:
      - How many backups O(backup_dir) keeps (the newest ones, including the one just taken).
    type: int
    default: 7
  restore_from:
    description:
      - Path of the backup (C(broker-<time>.db)) to restore; its C(.db.sha256), C(.json) and (when the broker
        had a TOTP key) C(.totp.key) files are next to it. Required with O(state=restored).
    type: path
  name_prefix:
    description:
      - Prefix of the broker container's name, as given to the broker module.
    type: str
    default: gatehouse
  stop_timeout:
    description:
      - Seconds the broker has to stop gracefully before it is killed (restore).
    type: int
    default: 30
  wait_timeout:
    description:
      - Seconds to wait for the restored broker's C(/health).
    type: int
    default: 60
seealso:
  - module: gatehouse.access.broker
"""

EXAMPLES = r"""
- name: Back up the broker's database, keep the newest 14 backups
  gatehouse.access.broker_backup:
    backup_dir: /var/backups/gatehouse
    keep: 14
  register: backup

- name: Fetch the new backup, its TOTP key, checksum and metadata files to the controller
  ansible.builtin.fetch:
    src: "{{ item }}"
    dest: backups/
  loop: >-
    {{ [backup.backup.path, backup.backup.checksum_file, backup.backup.metadata_file,
        backup.backup.totp_key_file] | select | list }}
  when: backup.backup.new

- name: Restore a backup (the broker is stopped and started again)
  gatehouse.access.broker_backup:
    state: restored
    restore_from: /var/backups/gatehouse/broker-20260101T020000Z.db
"""

RETURN = r"""
backup:
  description: The backup that holds the database now - the new one or, when nothing changed, the newest one.
  returned: state=present
  type: dict
  contains:
    path:
      description: The database file of the backup.
      type: str
    checksum_file:
      description: Its checksum file (C(sha256sum -c) format).
      type: str
    metadata_file:
      description: Its metadata (JSON).
      type: str
    totp_key_file:
      description: Its copy of the broker's TOTP key; null when the broker has none.
      type: str
    sha256:
      description: sha256 of the database file.
      type: str
    size:
      description: Size of the database file in bytes.
      type: int
    schema_version:
      description: Schema version of the database.
      type: int
    new:
      description: Whether this run wrote (or in check mode would write) the backup.
      type: bool
backups:
  description: The complete backups that O(backup_dir) keeps, oldest first.
  returned: state=present
  type: list
  elements: str
removed:
  description: Backups removed (or, in check mode, to be removed) because of O(keep).
  returned: state=present
  type: list
  elements: str
restored_from:
  description: The backup restored.
  returned: state=restored
  type: str
sha256:
  description: sha256 of the restored database, as its checksum file records it.
  returned: state=restored
  type: str
schema_version:
  description: Schema version of the restored database, from its metadata.
  returned: state=restored
  type: int
database:
  description: Path of the broker's database on the host; for PostgreSQL its URL (no password, no parameters).
  returned: state=restored
  type: str
previous:
  description: Where the database that was replaced is kept; null when there was none or in check mode.
  returned: state=restored
  type: str
totp_key:
  description: The broker's TOTP key (its path, never its value).
  returned: state=restored
  type: dict
  contains:
    path:
      description: Path of the broker's TOTP key on the host.
      type: str
    restored:
      description: Whether the backup's key replaces it; false for a backup without a key (the broker keeps its own).
      type: bool
    previous:
      description: Where the key that was replaced is kept; null when there was none, nothing was replaced or in check mode.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure, finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker_backup as backup_utils  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import DOCKER_HOST_OPTION  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["present", "restored"], "default": "present"},
            "backup_dir": {"type": "path"},
            "keep": {"type": "int", "default": 7},
            "restore_from": {"type": "path"},
            "name_prefix": {"type": "str", "default": "gatehouse"},
            "docker_host": DOCKER_HOST_OPTION,
            "stop_timeout": {"type": "int", "default": 30},
            "wait_timeout": {"type": "int", "default": 60},
        },
        required_if=[("state", "present", ["backup_dir"]), ("state", "restored", ["restore_from"])],
        supports_check_mode=True,
    )
    try:
        result = backup_utils.run(module.params, module.check_mode)
    except Failure as exc:
        result = exc.result
    finish(module, result)


if __name__ == "__main__":
    main()
