#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_migrate
short_description: Move the connection broker's database from SQLite to PostgreSQL, or back, with every row
version_added: 0.1.0
description:
  - Copies every table of the broker's database from its SQLite file to a PostgreSQL database (O(to=postgresql))
    or from PostgreSQL to an SQLite file of its data directory (O(to=sqlite)), keeping the ids, then compares
    the row count and the content of every table (a sha256 of the rows in a form both engines give alike).
  - The copy is the broker's own C(python -m gatehouse.broker.migrate), run in a one-off container of the broker
    container's image (hardened like the broker, removed afterwards) with the broker's mounts, in its network
    namespace (or network mode while it is stopped), so the database is reached the way the broker reaches it.
  - Before anything changes it checks the options, the broker container C(<name_prefix>-broker), that the broker
    uses the source (from its C(broker.properties)), and both databases with a dry run of the copy while the
    broker keeps serving - a target that holds other rows, a target at another schema version, a source newer
    than the broker or a database that cannot be reached fails the task with nothing changed.
  - Then it stops the broker (O(stop_broker); nothing writes the source during the copy) and copies in one
    transaction on the target, tables in dependency order, PostgreSQL's identity sequences moved past the
    copied ids. The rows are read back and compared before the commit (a difference rolls the copy back) and
    again after it. The broker stays stopped - deploy it on the target next (M(gatehouse.access.broker) with
    O(gatehouse.access.broker#module:database_url), or without it for SQLite), as C(playbooks/broker-migrate.yml)
    does. When the copy fails, the broker is started again on its unchanged source.
  - A target that already holds exactly the source's rows, or a broker that already uses the target, is no change.
  - The schema of the target is the source's schema version; the broker of that version migrates it later as
    usual. A source newer than the broker's image is refused.
  - The TOTP secrets are copied as they are (encrypted with the broker's TOTP key, which stays in
    C(secrets/totp.key)); the password is never in the result, a diff or a message.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - Runs the dry run of the copy against both databases and reports the rows per table that would be copied;
        the broker is not stopped and nothing is written.
  diff_mode:
    support: full
    details:
      - The rows per table of the target before and after (never a value of a row).
  idempotent:
    description: Whether a second run with the same options, the databases unchanged, changes nothing.
    support: full
    details:
      - A target that holds the source's rows already (same counts and content) or a broker that already uses the
        target reports V(changed=false).
  platform:
    platforms: posix
requirements:
  - Docker SDK for Python (C(docker)) >= 6.0 on the managed host.
  - The broker container's image with C(gatehouse.broker.migrate) (the collection's version).
options:
  to:
    description:
      - V(postgresql) copies the SQLite file O(sqlite_file) to O(database_url); V(sqlite) copies O(database_url)
        to O(sqlite_file).
    type: str
    choices: [postgresql, sqlite]
    default: postgresql
  database_url:
    description:
      - The PostgreSQL database, a libpq URL as for O(gatehouse.access.broker#module:database_url) (no password
        in it). For O(to=postgresql) (required) an empty database owned by the broker's role (the copy creates the
        schema), or one that already holds the same rows.
      - For O(to=sqlite) it may be left out - the source is then the broker's own C(Database) and
        C(DatabasePasswordFile), as its C(broker.properties) names them (O(database_password) and
        O(database_ca_cert) are not used then).
    type: str
  database_password:
    description:
      - The password of the URL's role; written to a 0600 file of a stage directory that only the copy reads.
    type: str
  database_ca_cert:
    description:
      - CA certificate (a path on the node) to verify the database server with; adds C(sslmode=verify-full)
        (unless the URL sets C(sslmode=verify-ca)) and C(sslrootcert) for the copy, as the broker module does.
    type: path
  sqlite_file:
    description:
      - The SQLite side, a file name in the broker's data directory C(data/). The broker module's SQLite
        database is C(broker.db).
    type: str
    default: broker.db
  replace:
    description:
      - Overwrite a target that holds other rows instead of failing. A PostgreSQL target is emptied in the copy's
        own transaction; an SQLite target is moved aside as C(<sqlite_file>.before-migrate) (with its journal
        files) and the copy goes to a new file.
    type: bool
    default: false
  stop_broker:
    description:
      - Stop the broker container before the copy (so nothing writes the source meanwhile). It stays stopped.
        Set V(false) only when nothing writes the source.
    type: bool
    default: true
  name_prefix:
    description:
      - Prefix of the broker container's name, as given to the broker module.
    type: str
    default: gatehouse
  stop_timeout:
    description:
      - Seconds the broker has to stop gracefully before it is killed.
    type: int
    default: 30
  timeout:
    description:
      - Seconds the copy may take.
    type: int
    default: 900
seealso:
  - module: gatehouse.access.broker
  - module: gatehouse.access.broker_backup
"""

EXAMPLES = r"""
- name: Back up the SQLite database first
  gatehouse.access.broker_backup:
    backup_dir: /var/backups/gatehouse

- name: Copy the broker's SQLite database to PostgreSQL (the broker is stopped)
  gatehouse.access.broker_migrate:
    to: postgresql
    database_url: postgresql://broker@db1.example.com:5432,db2.example.com:5432/broker
    database_password: "{{ vault_broker_database_password }}"
    database_ca_cert: /opt/gatehouse/pki/database-ca.pem
  register: moved

- name: Start the broker on PostgreSQL
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem
    database_url: postgresql://broker@db1.example.com:5432,db2.example.com:5432/broker
    database_password: "{{ vault_broker_database_password }}"
    database_ca_cert: /opt/gatehouse/pki/database-ca.pem

- name: Back to SQLite (the old broker.db is kept as broker.db.before-migrate)
  gatehouse.access.broker_migrate:
    to: sqlite
    replace: true
    database_url: postgresql://broker@db1.example.com:5432,db2.example.com:5432/broker
    database_password: "{{ vault_broker_database_password }}"
    database_ca_cert: /opt/gatehouse/pki/database-ca.pem
"""

RETURN = r"""
status:
  description:
    - V(copied), V(same) (the target held the source's rows already), V(in-use) (the broker already uses the
      target), V(would-copy) (check mode).
  returned: always
  type: str
source:
  description: The source database (an SQLite path in the broker container, or the URL without parameters).
  returned: always
  type: str
target:
  description: The target database, named the same way.
  returned: always
  type: str
broker_database:
  description: The database the broker's C(broker.properties) names (before this run's redeployment).
  returned: always
  type: str
schema_version:
  description: The schema version of the source, and so of the target.
  returned: when the databases were compared
  type: int
tables:
  description: Per table, the rows of the source and of the target and whether their content is the same.
  returned: always
  type: dict
  sample: {"users": {"source": 12, "target": 12, "same": true}}
rows:
  description: The rows of the source, all tables together.
  returned: always
  type: int
broker_stopped:
  description: Whether this run stopped the broker (it stays stopped until it is deployed on the target).
  returned: always
  type: bool
previous:
  description: Where a replaced SQLite target is kept (C(<sqlite_file>.before-migrate)); null otherwise.
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import Failure, finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker as broker_deploy  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker_migrate as migrate_utils  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import DOCKER_HOST_OPTION  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "to": {"type": "str", "choices": ["postgresql", "sqlite"], "default": "postgresql"},
            "database_url": {"type": "str"},
            "database_password": {"type": "str", "no_log": True},
            "database_ca_cert": {"type": "path"},
            "sqlite_file": {"type": "str", "default": "broker.db"},
            "replace": {"type": "bool", "default": False},
            "stop_broker": {"type": "bool", "default": True},
            "name_prefix": {"type": "str", "default": "gatehouse"},
            "docker_host": DOCKER_HOST_OPTION,
            "stop_timeout": {"type": "int", "default": 30},
            "timeout": {"type": "int", "default": 900},
        },
        supports_check_mode=True,
    )
    for value in broker_deploy.url_passwords(module.params.get("database_url")):
        # A password written into the URL by mistake is refused; it must not be shown either.
        module.no_log_values.add(value)
    try:
        result = migrate_utils.run(module.params, module.check_mode)
    except Failure as exc:
        result = exc.result
    finish(module, result)


if __name__ == "__main__":
    main()
