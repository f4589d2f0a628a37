#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_user
short_description: Manage a user account of the Gatehouse connection broker
version_added: 0.1.0
description:
  - Creates, updates or removes a user of the connection broker through its admin REST API (display name,
    enabled flag, group memberships and password).
  - Options that are not set are left as they are on the broker (or take the broker's default when the user is
    created).
  - Group memberships are managed here, on the user; M(gatehouse.access.broker_group) manages the groups
    themselves.
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
      - When a group in O(groups) does not exist yet (because an earlier task of the same check-mode run
        would create it), the result is computed locally from the current user and a warning says so.
  diff_mode:
    support: full
    details:
      - "The diff shows the user before and after. A password is never shown; a password change adds
        C(password: (changed)) to the C(after) side."
  platform:
    platforms: posix
options:
  name:
    description: User name (1 to 128 characters without C(/), C(\), control characters or outer spaces).
    type: str
    required: true
  domain:
    description:
      - Domain of the user; one of the broker's configured C(Domains).
      - Defaults to the broker's default domain (the first configured one).
    type: str
  display_name:
    description: Display name, at most 256 characters.
    type: str
  enabled:
    description:
      - Whether the user may log in. A disabled user keeps its memberships and entitlements. New users are
        enabled unless this is V(false).
    type: bool
  groups:
    description:
      - Groups of the user, in its domain. Every group must exist.
      - With O(append=false) (the default) this is the exact list; the user leaves every group not listed. An
        empty list removes all memberships.
      - When not set, memberships are not changed.
    type: list
    elements: str
  append:
    description:
      - If V(true), add the user to the groups in O(groups) and keep the memberships it has.
      - If V(false), O(groups) is the exact list of the user's groups.
    type: bool
    default: false
  password:
    description:
      - The user's password (1 to 1024 characters). The broker stores only a salted scrypt hash.
      - A user created without a password exists but cannot log in.
      - When not set, the password is not changed.
    type: str
  update_password:
    description:
      - V(always) sets O(password) when it differs from the stored one. The module asks the broker whether the
        password matches (its C(check-password) endpoint compares hashes); a password is never read back. The
        same password on every run reports no change.
      - V(on_create) sets O(password) only when the user is created, so users can change theirs later.
    type: str
    choices: [always, on_create]
    default: always
  state:
    description:
      - V(present) creates or updates the user.
      - V(absent) removes the user together with its memberships, entitlements and pool assignments.
    type: str
    choices: [present, absent]
    default: present
notes:
  - When the task loops over a list of users, do not put the passwords into the loop items; Ansible returns
    each item with its result. Look the password up by user name instead, for example
    C(password={{ vault_passwords[item.name] }}).
seealso:
  - module: gatehouse.access.broker_group
  - module: gatehouse.access.broker_entitlement
"""

EXAMPLES = r"""
- name: Create a user with a password, in two groups
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    ca_cert: /etc/gatehouse/ca.pem
    domain: CORP
    name: alice
    display_name: Alice Example
    password: "{{ vault_passwords.alice }}"
    groups: [staff, engineering]

- name: Set the initial password only; users change it later
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    name: bob
    password: "{{ vault_initial_passwords.bob }}"
    update_password: on_create
  environment:
    GATEHOUSE_ADMIN_TOKEN: "{{ vault_broker_admin_token }}"

- name: Add carol to the on-call group, keep her other groups
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: carol
    groups: [on-call]
    append: true

- name: Disable a user without removing anything
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: dave
    enabled: false

- name: Remove a user
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: mallory
    state: absent
"""

RETURN = r"""
user:
  description: The user after the task (in check mode, what it would be); V(null) after O(state=absent).
  returned: always
  type: dict
  sample:
    domain: CORP
    name: alice
    display_name: Alice Example
    enabled: true
    groups: [engineering, staff]
    password_set: true
  contains:
    domain:
      description: Domain, in the broker's configured spelling.
      type: str
    name:
      description: User name, in its stored spelling.
      type: str
    display_name:
      description: Display name.
      type: str
    enabled:
      description: Whether the user may log in.
      type: bool
    groups:
      description: Groups of the user.
      type: list
      elements: str
    password_set:
      description: Whether the user has a password (and so can log in when enabled).
      type: bool
password_changed:
  description: Whether the password was (or in check mode would be) set; always V(false) for O(state=absent).
  returned: always
  type: bool
  sample: false
diff:
  description:
    - The user before and after, when run with C(--diff).
    - "A password change shows as C(password: (changed)) on the C(after) side; a password is never shown."
  returned: when diff mode is on
  type: dict
  sample:
    before: {domain: CORP, name: alice, display_name: "", enabled: true, groups: [], password_set: true}
    after: {domain: CORP, name: alice, display_name: Alice, enabled: true, groups: [staff], password_set: true}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._broker_objects import (  # noqa: E402
    USER_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=USER_ARGSPEC, supports_check_mode=True)
    run_module(module, "user")


if __name__ == "__main__":
    main()
