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
  - In a domain whose users come from a directory (M(gatehouse.access.broker) option
    O(gatehouse.access.broker#module:directories)) a user has no password - the directory checks it - and the
    broker creates the user at the first login. Create such a user here to enroll its TOTP secret or to give it
    entitlements before it logs in; do not set O(password) for it.
  - O(totp) enrolls the user's TOTP secret (second factor V(totp) of the broker) and returns it once, as an
    C(otpauth://) URI for the user's authenticator app.
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
        C(password: (changed)) to the C(after) side, a new TOTP secret C(totp_secret: (changed))."
      - In check mode a TOTP enrollment is checked by the broker but no secret is made, so no
        RV(totp.otpauth_uri) is returned.
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
  totp:
    description:
      - "V(enrolled) - the user has a TOTP secret. When it has none (or with O(totp_reset=true)) the broker makes a
        new one and the module returns it once in RV(totp.otpauth_uri); the broker never shows it again.
        B(The task must set C(no_log: true)) (the module fails otherwise), register its result and hand the URI to
        the user, for example as a file of mode V(0600) or a QR code, never in a log."
      - V(absent) - the user's TOTP secret is removed; the user enrolls again before the next login that asks for
        a TOTP code.
      - V(ignore) leaves the enrollment as it is.
    type: str
    choices: [enrolled, absent, ignore]
    default: ignore
  totp_reset:
    description:
      - With O(totp=enrolled), replace an enrolled secret by a new one (a lost or replaced phone). Every run with
        V(true) makes a new secret and reports a change.
    type: bool
    default: false
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
  - RV(totp.otpauth_uri) is the user's TOTP secret. Ansible's C(no_log) hides it from the output and the logs,
    while the registered variable keeps it for the next task; do not print it with M(ansible.builtin.debug).
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

- name: Enroll the TOTP secret of a directory user (second factor totp); keep the URI for her only
  gatehouse.access.broker_user:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    domain: LAB
    name: erin
    totp: enrolled
  register: erin_totp
  no_log: true

- name: Hand the enrollment URI over as a file only the operator can read
  ansible.builtin.copy:
    content: "{{ erin_totp.totp.otpauth_uri }}\n"
    dest: "{{ lookup('ansible.builtin.env', 'HOME') }}/.gatehouse/totp-lab-erin.uri"
    mode: "0600"
  delegate_to: localhost
  when: erin_totp.totp.otpauth_uri is defined
  no_log: true

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
    totp_enrolled:
      description: Whether the user has a TOTP secret (brokers with enterprise identity).
      type: bool
totp:
  description: The TOTP enrollment, when O(totp) is V(enrolled) or V(absent) and O(state=present).
  returned: when O(totp) is not V(ignore)
  type: dict
  sample: {enrolled: true, changed: true, otpauth_uri: "otpauth://totp/Gatehouse:erin?secret=...&issuer=Gatehouse"}
  contains:
    enrolled:
      description: Whether the user has (in check mode, would have) a TOTP secret.
      type: bool
    changed:
      description: Whether a secret was (or would be) made or removed.
      type: bool
    otpauth_uri:
      description:
        - "B(Secret.) The new secret as an C(otpauth://totp/) URI for the user's authenticator app (a QR code of
          it is what the apps scan). Returned only by the run that made the secret, never in check mode; the
          broker does not show it again. Run the task with C(no_log: true) and never log or print the URI."
      type: str
      returned: when a new secret was made
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

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects import (  # noqa: E402
    USER_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=USER_ARGSPEC, supports_check_mode=True)
    run_module(module, "user")


if __name__ == "__main__":
    main()
