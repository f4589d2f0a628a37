#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_entitlement
short_description: Entitle a user or group to a desktop or pool of the Gatehouse connection broker
version_added: 0.1.0
description:
  - Gives a principal (a user, or a group and so all its members) the right to use a resource (a desktop, or a
    pool of desktops), or takes it away, through the broker's admin REST API.
  - The entitled resources are what the user sees in the client's resource list.
  - In a domain whose users come from a directory (M(gatehouse.access.broker) option
    O(gatehouse.access.broker#module:directories)), O(principal_type=directory-group) entitles the members of a
    directory group, found at each login (nested groups with the directory's C(group_mode=ad-nested)).
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
      - When the principal or the resource does not exist yet (because an earlier task of the same check-mode
        run would create it), the result is computed locally and a warning says so.
  diff_mode:
    support: full
    details:
      - The diff shows the entitlement before and after (empty when it does not exist).
  platform:
    platforms: posix
options:
  principal_type:
    description:
      - Whether O(principal) names a user, a group of the broker, or a group of the domain's directory
        (V(directory-group)).
    type: str
    choices: [user, group, directory-group]
    required: true
  principal:
    description:
      - Name of the user or group; a user or group must exist when the entitlement is created.
      - With V(directory-group), the group's name (its CN, like V(vdi-users)) or its full DN (like
        V(CN=vdi-users,OU=Groups,DC=corp,DC=example,DC=com)); the broker compares both without regard to case.
        The group is not looked up when the entitlement is created.
    type: str
    required: true
  domain:
    description:
      - Domain of the principal; one of the broker's configured C(Domains).
      - Defaults to the broker's default domain (the first configured one).
    type: str
  resource_type:
    description: Whether O(resource) names a desktop or a pool.
    type: str
    choices: [desktop, pool]
    required: true
  resource:
    description: Name of the desktop or pool; it must exist when the entitlement is created.
    type: str
    required: true
  state:
    description:
      - V(present) creates the entitlement.
      - V(absent) removes it. Nothing else is removed; a principal or resource that does not exist means the
        entitlement does not exist either, which is no change.
    type: str
    choices: [present, absent]
    default: present
notes:
  - Removing a user, group, desktop or pool removes its entitlements as well.
seealso:
  - module: gatehouse.access.broker_user
  - module: gatehouse.access.broker_group
  - module: gatehouse.access.broker_desktop
  - module: gatehouse.access.broker_pool
"""

EXAMPLES = r"""
- name: Entitle the staff group to the engineering pool
  gatehouse.access.broker_entitlement:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    ca_cert: /etc/gatehouse/ca.pem
    principal_type: group
    domain: CORP
    principal: staff
    resource_type: pool
    resource: engineering

- name: Entitle one user to one desktop
  gatehouse.access.broker_entitlement:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    principal_type: user
    principal: alice
    resource_type: desktop
    resource: desk1

- name: Entitle the members of an Active Directory group (nested groups included) to a pool
  gatehouse.access.broker_entitlement:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    principal_type: directory-group
    domain: CORP
    principal: CN=vdi-users,OU=Groups,DC=corp,DC=example,DC=com
    resource_type: pool
    resource: engineering

- name: Take the entitlement away again
  gatehouse.access.broker_entitlement:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    principal_type: user
    principal: alice
    resource_type: desktop
    resource: desk1
    state: absent
"""

RETURN = r"""
entitlement:
  description: The entitlement after the task (in check mode, what it would be); V(null) when it does not exist.
  returned: always
  type: dict
  sample: {principal_type: group, domain: CORP, principal: staff, resource_type: pool, resource: engineering}
  contains:
    principal_type:
      description: V(user), V(group) or V(directory-group).
      type: str
    domain:
      description: Domain of the principal, in the broker's configured spelling.
      type: str
    principal:
      description: User or group name (a directory group's CN or DN), in its stored spelling.
      type: str
    resource_type:
      description: V(desktop) or V(pool).
      type: str
    resource:
      description: Desktop or pool name, in its stored spelling.
      type: str
diff:
  description: The entitlement before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects import (  # noqa: E402
    ENTITLEMENT_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=ENTITLEMENT_ARGSPEC, supports_check_mode=True)
    run_module(module, "entitlement")


if __name__ == "__main__":
    main()
