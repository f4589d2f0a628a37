#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_pool
short_description: Manage a desktop pool of the Gatehouse connection broker
version_added: 0.1.0
description:
  - Creates, updates or removes a pool of desktops of the connection broker through its admin REST API.
  - A user entitled to a pool gets the least-loaded healthy member; in a persistent pool the first choice
    becomes the user's assigned desktop.
  - Options that are not set are left as they are on the broker (or take the broker's default when the pool is
    created).
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.broker_api
attributes:
  check_mode:
    support: full
    details:
      - The write is sent with C(?check_mode=true); the broker runs it in a transaction it rolls back and
        answers what a real run would answer.
      - When a desktop in O(members) does not exist yet (because an earlier task of the same check-mode run
        would create it), the result is computed locally from the current pool and a warning says so.
  diff_mode:
    support: full
    details:
      - The diff shows the pool before and after.
  platform:
    platforms: posix
options:
  name:
    description: Pool name (1 to 128 characters without C(/), C(\), control characters or outer spaces).
    type: str
    required: true
  persistent:
    description:
      - V(true) keeps each user on the desktop first chosen for them while it is a healthy member.
      - Turning it off drops the pool's assignments. New pools are not persistent unless this is V(true).
    type: bool
  description:
    description: Free text, at most 256 characters.
    type: str
  members:
    description:
      - Desktops in the pool; every desktop must exist. A desktop belongs to at most one pool, so listing it
        here moves it out of any other pool.
      - With O(append=false) (the default) this is the exact list; desktops not listed leave the pool. An empty
        list empties the pool.
      - When not set, the membership is not changed.
    type: list
    elements: str
  append:
    description:
      - If V(true), add the desktops in O(members) and keep the members the pool has.
      - If V(false), O(members) is the exact list of members.
    type: bool
    default: false
  state:
    description:
      - V(present) creates or updates the pool.
      - V(absent) removes the pool with its entitlements and assignments; its desktops stay, without a pool.
    type: str
    choices: [present, absent]
    default: present
notes:
  - Manage pool membership either with O(members) or with
    O(gatehouse.access.broker_desktop#module:pool), not both, or the two tasks undo each other on every run.
seealso:
  - module: gatehouse.access.broker_desktop
  - module: gatehouse.access.broker_entitlement
"""

EXAMPLES = r"""
- name: A persistent pool of exactly these desktops
  gatehouse.access.broker_pool:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    ca_cert: /etc/gatehouse/ca.pem
    name: engineering
    persistent: true
    description: Engineering workstations
    members: [desk1, desk2, desk3]

- name: Add a desktop to a pool, keep the others
  gatehouse.access.broker_pool:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: engineering
    members: [desk4]
    append: true

- name: Remove a pool (its desktops stay)
  gatehouse.access.broker_pool:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: old-pool
    state: absent
"""

RETURN = r"""
pool:
  description: The pool after the task (in check mode, what it would be); V(null) after O(state=absent).
  returned: always
  type: dict
  sample: {name: engineering, persistent: true, description: Engineering workstations, members: [desk1, desk2]}
  contains:
    name:
      description: Pool name, in its stored spelling.
      type: str
    persistent:
      description: Whether users keep their assigned desktop.
      type: bool
    description:
      description: Free text.
      type: str
    members:
      description: Desktops in the pool.
      type: list
      elements: str
diff:
  description: The pool before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects import (  # noqa: E402
    POOL_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=POOL_ARGSPEC, supports_check_mode=True)
    run_module(module, "pool")


if __name__ == "__main__":
    main()
