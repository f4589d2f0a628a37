#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker
short_description: Deploy, configure and remove a Gatehouse connection broker
version_added: 0.1.0
description:
  - Writes the data directory O(data_dir) (C(docker-compose.yaml), C(data/broker.properties), C(data/broker.env),
    C(certs/)) and converges the container C(<prefix>-broker).
  - The broker keeps users, desktops, pools and entitlements in the SQLite database C(data/broker.db). It is kept
    across upgrades and by O(state=absent) unless O(purge=true).
  - The admin bearer token is an option (never logged) written to C(data/broker.env) with mode V(0600); the object
    modules (M(gatehouse.access.broker_user) and friends) need the same admin token, so keep it in a vault.
  - Connection managers and agents authenticate with certificates from the deployment CA (O(client_ca_cert)); the
    broker answers the broker protocol only to role C(cm) and takes load reports only from role C(agent) for the
    addresses the certificate names. There is no agent token.
  - Every option is validated before anything is changed. Files are written atomically. The container is recreated
    only when its spec, its image or a file it reads changed; the same options twice report no change.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.deploy
  - gatehouse.access.deploy.container_limits
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the configuration files before and after; the token is masked and private keys are shown
        as a hash only.
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - cryptography >= 42.0 on the target
  - Docker engine >= 20.10
options:
  admin_token:
    description:
      - Bearer token of the admin API (at least 16 characters of C([A-Za-z0-9._~+/=-])). Required with
        O(state=present). Generate it once, for example with
        C(lookup('ansible.builtin.password', '/dev/null', length=40, chars=['ascii_letters', 'digits'])), and keep
        it in a vault.
    type: str
  client_ca_cert:
    description:
      - CA bundle on the target that issued the connection managers' and agents' certificates (the deployment CA),
        copied to C(certs/client-ca.pem) (C(ClientCaCert)). Required with O(client_tls_verify=true).
    type: path
  client_tls_verify:
    description:
      - Require and verify client certificates (C(ClientTlsVerify)) - role C(cm) for the broker protocol, role
        C(agent) for load reports. V(false) makes the module return a warning (test setups only).
    type: bool
    default: true
  domains:
    description: Domains offered to clients; the first one is the default.
    type: list
    elements: str
    default: [CORP]
  data_dir:
    description: The data directory.
    type: path
    default: /opt/gatehouse/broker
  https_port:
    description: Host port published for the broker's 8443 with O(network_mode=bridge).
    type: int
    default: 443
  purge:
    description: With O(state=absent), also delete the database.
    type: bool
    default: false
seealso:
  - module: gatehouse.access.cmsg
"""

EXAMPLES = r"""
- name: Broker with a certificate from the deployment CA, verifying its clients
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    domains: [CORP, LAB]
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem

- name: Test broker with a self-signed certificate and no client verification
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    self_signed: true
    client_tls_verify: false

- name: Remove the broker, keep the database
  gatehouse.access.broker:
    state: absent

- name: Remove the broker and its database
  gatehouse.access.broker:
    state: absent
    purge: true
"""

RETURN = r"""
changed_files:
  description: Files and directories written (or, with O(state=absent), removed); in check mode, those that would be.
  returned: always
  type: list
  elements: str
containers:
  description: Containers that were (or would be) created, recreated, started or removed.
  returned: always
  type: list
  elements: dict
  sample: [{name: gatehouse-broker, action: create}]
images_loaded:
  description: Images loaded from O(bundle_path) or pulled from O(registry).
  returned: O(state=present)
  type: list
  elements: str
config:
  description: The effective configuration (no token).
  returned: O(state=present)
  type: dict
  contains:
    broker_properties:
      description: Keys and values of C(data/broker.properties).
      type: dict
    database:
      description: Path of the SQLite database on the target.
      type: str
left_behind:
  description: With O(state=absent), what was kept (the database unless O(purge), files the module did not write).
  returned: O(state=absent)
  type: list
  elements: str
errors:
  description: Every problem found in the options, when the module fails.
  returned: failure
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils import _broker  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils import _deploy as deploy  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_broker.ARGUMENT_SPEC,
        required_if=_broker.REQUIRED_IF,
        mutually_exclusive=deploy.COMMON_MUTUALLY_EXCLUSIVE,
        required_together=deploy.COMMON_REQUIRED_TOGETHER,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _broker.run)


if __name__ == "__main__":
    main()
