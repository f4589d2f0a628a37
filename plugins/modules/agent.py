#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: agent
short_description: Run, configure and remove Gatehouse test desktops (agent stand-ins) on a host
version_added: 0.1.0
description:
  - Runs one container C(<prefix>-agent-<name>) of the image C(gatehouse/agent) for every entry of O(instances), each
    with its own C(agent.properties) in C(<data_dir>/<name>/data) (mounted read-only at C(/data)).
  - Each agent's certificate, key and the deployment CA are read from C(<data_dir>/pki) - C(<name>.pem),
    C(<name>.key) and C(ca.pem), as M(gatehouse.access.node_certificates) writes them with O(data_dir)C(/pki) as its
    directory and the agent's name as the entry's name (role C(agent)). They are mounted one by one at C(/certs),
    so that no agent sees another agent's key. A missing one fails the task before anything is changed.
  - A container is recreated exactly when its spec, its image, its C(agent.properties), its certificate, key or one
    of its CAs changed; the same options twice report no change. Files are written atomically.
  - The role P(gatehouse.access.agent#role) issues the certificates and calls this module, one task each.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.deploy.container_limits
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows each C(agent.properties) before and after.
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - Docker engine >= 20.10
options:
  state:
    description:
      - V(present) writes the agents' files and runs their containers.
      - V(absent) removes the containers of O(instances), their files and their certificates and keys in C(pki/).
    type: str
    choices: [present, absent]
    default: present
  instances:
    description:
      - The agents of this host. Their ports must differ (they share the host's ports, or one network namespace).
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The agent's name (letters, digits, C(.), C(_) and C(-)); also its certificate's file name.
        type: str
        required: true
      hostname:
        description: The desktop's host name the agent reports. Defaults to O(instances[].name).
        type: str
      advertise_address:
        description:
          - The address the agent reports to the broker. Defaults to O(host_address) with O(network_mode=bridge),
            otherwise to the agent's own address.
        type: str
      control_port:
        description: TLS port of the agent's control channel (launch-session from the connection managers).
        type: int
        default: 60443
      session_port:
        description: Port of the session's TCP and UDP (PCoIP).
        type: int
        default: 4172
      admin_port:
        description:
          - Port of the agent's management listener (C(/health), C(/metrics)) on its loopback; never published.
            Agents that share a network namespace (O(network_mode=host) or V(container:<name>)) need one each.
        type: int
        default: 9182
      capacity:
        description: Sessions the agent takes at once.
        type: int
        default: 10
  data_dir:
    description: Parent of the agents' directories (C(<data_dir>/<name>/data)) and of C(pki/).
    type: path
    default: /opt/gatehouse/agent
  host_address:
    description: This host's address as the connection managers and the broker see it (see O(instances[].advertise_address)).
    type: str
    default: ""
  broker_url:
    description: The broker, C(https://broker:port), that the agents send their load reports to; empty sends none.
    type: str
    default: ""
  broker_ca_cert:
    description:
      - CA bundle (PEM, a path on the target) that verifies the broker, mounted as C(/certs/broker-ca.pem). Without it
        the deployment CA verifies the broker.
    type: path
  broker_tls_verify:
    description: Verify the broker's certificate.
    type: bool
    default: true
  client_tls_verify:
    description:
      - Accept launch-session only from connection managers with a certificate of the deployment CA (role C(cm)).
        V(false) is for tests only.
    type: bool
    default: true
  report_interval:
    description: Seconds between load reports.
    type: int
    default: 10
  session_tag_ttl:
    description: Seconds a session tag stays valid before it is used.
    type: int
    default: 60
  log_level:
    description: Log level of the agents.
    type: str
    choices: [debug, info, warn, error]
    default: info
  image_tag:
    description: Tag of the C(gatehouse/agent) image. The default is the version of this collection.
    type: str
    default: 0.1.0
  image_source:
    description:
      - V(local) uses the image already on the Docker host (C(make images)); V(registry) pulls it from O(registry)
        when it is missing.
    type: str
    choices: [local, registry]
    default: local
  registry:
    description: Registry prefix for O(image_source=registry), like V(registry.example.com:5000).
    type: str
  network_mode:
    description:
      - V(bridge) publishes each agent's ports on the host with the same numbers (control TCP, session TCP and UDP).
      - V(host) runs the agents in the host's network namespace; V(container:<name>) in another container's (Molecule
        and the demo).
    type: str
    default: bridge
  host_label:
    description: Value of the C(gatehouse.host) label of the containers. Defaults to the target's host name.
    type: str
  name_prefix:
    description: Prefix of the container names (C(<prefix>-agent-<name>)).
    type: str
    default: gatehouse
  wait_timeout:
    description:
      - Seconds to wait for a (re)started container to be up; a container that exits right after its start fails the
        task with its last log lines. V(0) does not wait.
    type: int
    default: 60
notes:
  - C(gatehouse/agent) is a stand-in for a desktop's agent, for tests and demonstrations; it is not part of the
    dark-site bundle.
seealso:
  - module: gatehouse.access.node_certificates
  - module: gatehouse.access.broker_desktop
"""

EXAMPLES = r"""
- name: Issue the agents' certificates from the deployment CA
  gatehouse.access.node_certificates:
    ca_dir: ~/.gatehouse/secrets/ca
    directory: /opt/gatehouse/agent/pki
    certificates:
      - {name: desk1, role: agent, names: [desk1, 10.0.0.31]}
      - {name: desk2, role: agent, names: [desk2, 10.0.0.31]}

- name: Two test desktops on this host reporting to the broker
  gatehouse.access.agent:
    instances:
      - name: desk1
      - name: desk2
        control_port: 60444
        session_port: 4173
        admin_port: 9183
    host_address: 10.0.0.31
    broker_url: https://broker.example.com:8443

- name: Remove them
  gatehouse.access.agent:
    state: absent
    instances: [{name: desk1}, {name: desk2}]
"""

RETURN = r"""
changed_files:
  description: Files and directories written (with O(state=absent), removed); in check mode, those that would be.
  returned: always
  type: list
  elements: str
containers:
  description: Containers that were (or would be) created, recreated, started or removed.
  returned: always
  type: list
  elements: dict
  sample: [{name: gatehouse-agent-desk1, action: create}]
images_loaded:
  description: Images pulled from O(registry).
  returned: O(state=present)
  type: list
  elements: str
config:
  description: The effective configuration.
  returned: O(state=present)
  type: dict
  contains:
    agents:
      description: Each agent's container, reported host name and address, and ports.
      type: list
      elements: dict
      sample:
        - {name: desk1, container: gatehouse-agent-desk1, hostname: desk1, advertise_address: 10.0.0.31,
           control_port: 60443, session_port: 4172}
    image:
      description: The image the containers run.
      type: str
      sample: gatehouse/agent:0.1.0
left_behind:
  description: With O(state=absent), files in the agents' directories that the module did not write (kept).
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

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import agent as _agent  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as deploy  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_agent.ARGUMENT_SPEC,
        required_if=_agent.REQUIRED_IF,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _agent.run)


if __name__ == "__main__":
    main()
