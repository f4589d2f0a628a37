#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_group
short_description: Manage a user group of the Gatehouse connection broker
version_added: 0.1.0
description:
  - Creates, updates or removes a group of users of the connection broker through its admin REST API.
  - Entitlements given to a group apply to all its members (M(gatehouse.access.broker_entitlement)).
  - Members are not managed here but on each user (O(gatehouse.access.broker_user#module:groups)); the
    group's RV(group.members) are returned for reference.
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
  diff_mode:
    support: full
    details:
      - The diff shows the group before and after.
  platform:
    platforms: posix
options:
  name:
    description: Group name (1 to 128 characters without C(/), C(\), control characters or outer spaces).
    type: str
    required: true
  domain:
    description:
      - Domain of the group; one of the broker's configured C(Domains). Only users of the same domain can be
        members.
      - Defaults to the broker's default domain (the first configured one).
    type: str
  description:
    description:
      - Free text, at most 256 characters. When not set, it is left as it is (empty for a new group).
    type: str
  state:
    description:
      - V(present) creates or updates the group.
      - V(absent) removes the group, its memberships and its entitlements; the users stay.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: gatehouse.access.broker_user
  - module: gatehouse.access.broker_entitlement
"""

EXAMPLES = r"""
- name: Create the staff group
  gatehouse.access.broker_group:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    ca_cert: /etc/gatehouse/ca.pem
    domain: CORP
    name: staff
    description: All staff

- name: Remove a group that is no longer used
  gatehouse.access.broker_group:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    domain: CORP
    name: contractors-2024
    state: absent
"""

RETURN = r"""
group:
  description: The group after the task (in check mode, what it would be); V(null) after O(state=absent).
  returned: always
  type: dict
  sample: {domain: CORP, name: staff, description: All staff, members: [alice, bob]}
  contains:
    domain:
      description: Domain, in the broker's configured spelling.
      type: str
    name:
      description: Group name, in its stored spelling.
      type: str
    description:
      description: Free text.
      type: str
    members:
      description: Users in the group (set on the users).
      type: list
      elements: str
diff:
  description: The group before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects import (  # noqa: E402
    GROUP_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=GROUP_ARGSPEC, supports_check_mode=True)
    run_module(module, "group")


if __name__ == "__main__":
    main()
