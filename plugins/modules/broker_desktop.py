#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker_desktop
short_description: Register a remote desktop (agent host) with the Gatehouse connection broker
version_added: 0.1.0
description:
  - Creates, updates or removes a desktop of the connection broker through its admin REST API. A desktop is a
    host running the desktop agent; the connection manager connects to O(address) on O(agent_port) and the
    client's session goes to O(session_port).
  - Options that are not set are left as they are on the broker (or take the broker's default when the desktop
    is created).
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
      - When O(pool) does not exist yet (because an earlier task of the same check-mode run would create it),
        the result is computed locally from the current desktop and a warning says so.
  diff_mode:
    support: full
    details:
      - The diff shows the desktop before and after.
  platform:
    platforms: posix
options:
  name:
    description: Desktop name (1 to 128 characters without C(/), C(\), control characters or outer spaces).
    type: str
    required: true
  address:
    description:
      - IP address or DNS name the connection manager connects to. IP addresses are normalised and DNS names
        lower-cased by the broker.
      - Required when the desktop is created.
      - Agent load reports are matched to the desktop by this address (or O(hostname)) and O(agent_port).
    type: str
  hostname:
    description: Host name reported to the connection manager (C(agent-info/hostname)).
    type: str
  agent_port:
    description: Port of the agent's HTTPS API. New desktops get V(60443).
    type: int
  session_port:
    description: Port of the agent's session (PCoIP) listener. New desktops get V(4172).
    type: int
  enabled:
    description:
      - Whether placement may choose this desktop. A disabled desktop keeps its pool and entitlements. New
        desktops are enabled unless this is V(false).
    type: bool
  pool:
    description:
      - Pool the desktop belongs to (a desktop belongs to at most one pool); the pool must exist.
      - An empty string takes the desktop out of its pool. When not set, the membership is not changed.
      - Manage pool membership either here or with O(gatehouse.access.broker_pool#module:members), not both, or
        the two tasks undo each other on every run.
    type: str
  logon:
    description:
      - How the user is logged on at the desktop's agent.
      - V(windows-password) forwards the user's own password in the agent's C(launch-session) (single sign-on
        to Windows). The connection manager sends it only to an agent whose certificate it verified (the
        deployment CA with its C(AgentTlsVerify), or O(agent_ca_pem) or O(agent_cert_sha256)); otherwise the
        allocation fails and no request reaches the agent.
      - V(none) sends no credentials (a pre-logged-on or kiosk desktop).
      - New desktops get V(windows-password).
    type: str
    choices: [windows-password, none]
  agent_ca_pem:
    description:
      - PEM certificates of a CA that signed this desktop's agent certificate (for example the agent's own
        self-signed certificate), for agents the deployment CA did not sign. The connection manager verifies
        the chain and the host name (O(address)) against it.
      - An empty string removes it. Stored re-encoded, so the same certificates always compare equal.
      - Mutually exclusive with O(agent_cert_sha256) unless one of them is the empty string (which clears it);
        the broker refuses a desktop that would end up with both.
    type: str
  agent_cert_sha256:
    description:
      - SHA-256 fingerprint of this desktop's agent certificate (64 hexadecimal digits, colons allowed as
        C(openssl x509 -fingerprint -sha256) prints them). The connection manager accepts exactly that
        certificate, checked before anything is sent.
      - An empty string removes it. Stored as 64 lower-case digits.
    type: str
  site:
    description:
      - The site the desktop belongs to in a multi-site deployment (1 to 63 lower-case letters, digits, V(-) or
        V(_), starting with a letter or digit), the connection managers' C(site) of the same location. A client
        allocated this desktop is sent to that site's gateway, wherever it logged in, and the desktop is not
        offered while its site is down (no agent of the site reported within the broker's C(AgentStaleAfter)).
      - An empty string takes the desktop out of any site. New desktops have no site.
      - See the C(docs/multisite.md) page of the collection.
    type: str
  state:
    description:
      - V(present) creates or updates the desktop.
      - V(absent) removes the desktop with its entitlements and pool assignments.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: gatehouse.access.broker_pool
  - module: gatehouse.access.broker_entitlement
"""

EXAMPLES = r"""
- name: Register a desktop
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    ca_cert: /etc/gatehouse/ca.pem
    name: desk1
    address: 10.0.0.21
    hostname: desk1.corp.example

- name: Register a desktop with non-default ports, in a pool
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: lab-desk7
    address: lab-desk7.corp.example
    agent_port: 60444
    session_port: 4173
    pool: lab

- name: Register a desktop whose agent has its own certificate (pinned), with Windows single sign-on
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: desk9
    address: 10.0.0.29
    logon: windows-password
    agent_cert_sha256: "{{ lookup('ansible.builtin.file', 'fingerprints/desk9.sha256') }}"

- name: Register a kiosk desktop that needs no credentials
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: kiosk1
    address: kiosk1.corp.example
    logon: none

- name: A desktop of site 2 in a multi-site deployment
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: site2-desk1
    address: 10.2.0.21
    site: site2

- name: Take a desktop out of placement for maintenance
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: desk1
    enabled: false

- name: Take a desktop out of its pool
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: lab-desk7
    pool: ""

- name: Remove a desktop
  gatehouse.access.broker_desktop:
    broker_url: https://broker.example.com:443
    admin_token: "{{ vault_broker_admin_token }}"
    name: old-desk
    state: absent
"""

RETURN = r"""
desktop:
  description: The desktop after the task (in check mode, what it would be); V(null) after O(state=absent).
  returned: always
  type: dict
  sample:
    name: desk1
    address: 10.0.0.21
    hostname: desk1.corp.example
    agent_port: 60443
    session_port: 4172
    enabled: true
    pool: null
    logon: windows-password
    agent_ca_pem: ""
    agent_cert_sha256: ""
    site: ""
  contains:
    name:
      description: Desktop name, in its stored spelling.
      type: str
    address:
      description: Normalised IP address or lower-case DNS name.
      type: str
    hostname:
      description: Host name.
      type: str
    agent_port:
      description: Agent API port.
      type: int
    session_port:
      description: Session port.
      type: int
    enabled:
      description: Whether placement may choose the desktop.
      type: bool
    pool:
      description: Pool of the desktop, or V(null).
      type: str
    logon:
      description: V(windows-password) or V(none).
      type: str
    agent_ca_pem:
      description: The desktop's own agent CA certificates (PEM), or an empty string.
      type: str
    agent_cert_sha256:
      description: The pinned SHA-256 of the agent certificate (64 lower-case hexadecimal digits), or an empty string.
      type: str
    site:
      description: The desktop's site, or an empty string.
      type: str
diff:
  description: The desktop before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._broker_api.objects import (  # noqa: E402
    DESKTOP_ARGSPEC,
    run_module,
)


def main() -> None:
    module = AnsibleModule(argument_spec=DESKTOP_ARGSPEC, supports_check_mode=True)
    run_module(module, "desktop")


if __name__ == "__main__":
    main()
