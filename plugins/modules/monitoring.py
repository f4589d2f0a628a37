#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: monitoring
short_description: Deploy, configure and remove the Prometheus server that watches Gatehouse
version_added: 0.1.0
description:
  - Writes the data directory O(data_dir) (C(docker-compose.yaml), C(data/prometheus.yml), C(data/alerts.yml)) and
    converges the container C(<prefix>-prometheus) of the image C(gatehouse/prometheus) (Prometheus from Debian's
    package).
  - Prometheus scrapes C(/metrics) of every target in O(targets), one job per kind named C(gatehouse-<kind>)
    (C(gatehouse-broker), C(gatehouse-cm), C(gatehouse-sg), C(gatehouse-halb), C(gatehouse-postgresql)); the alert
    rules of the collection (C(roles/monitoring/files/gatehouse-alerts.yml)) select on these job names.
  - The time series are kept in C(tsdb/) of O(data_dir), owned by uid 10001 (the container's user). They survive
    O(state=absent) unless O(purge=true).
  - Every option is validated before anything is changed. Before the container is created or replaced, C(promtool
    check config) of the image checks the new C(prometheus.yml) and rules (staged in a temporary directory of
    O(data_dir)); when it refuses them the task fails with its findings and the running Prometheus and its files are
    left as they were. The check is skipped in check mode.
  - Files are written atomically. The container is recreated only when its spec, its image or one of the two files
    changed; the same options twice report no change.
  - The guide is C(docs/monitoring.md) in the collection.
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
      - The diff shows C(prometheus.yml) and C(alerts.yml) before and after.
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - Docker engine >= 20.10
options:
  state:
    description:
      - V(present) writes the data directory and runs Prometheus.
      - V(absent) removes the container and the files the module wrote.
    type: str
    choices: [present, absent]
    default: present
  targets:
    description:
      - The endpoints to scrape, as V(host:port) or V([IPv6]:port), by kind. At least one is required with
        O(state=present).
      - The Gatehouse services serve C(/metrics) on their management listener (C(AdminAddress):C(AdminPort)) - the
        broker on 9181, the CM on 9180, the SG on 9172; the HALB nodes on their metrics frontend (8405 by default).
    type: dict
    default: {}
    suboptions:
      broker:
        description: Brokers' management listeners.
        type: list
        elements: str
        default: []
      cm:
        description: Connection managers' management listeners.
        type: list
        elements: str
        default: []
      sg:
        description: Security gateways' management listeners.
        type: list
        elements: str
        default: []
      halb:
        description: HALB nodes' metrics frontends (HAProxy's Prometheus exporter and the node's VRRP state).
        type: list
        elements: str
        default: []
      postgresql:
        description: Database nodes' metrics endpoints (Patroni's REST API, C(/metrics)).
        type: list
        elements: str
        default: []
  alert_rules:
    description:
      - The text of a Prometheus rules file, written to C(data/alerts.yml) and loaded by Prometheus. The role
        P(gatehouse.access.monitoring#role) passes the collection's C(gatehouse-alerts.yml).
      - When not set, no rules are loaded (and an C(alerts.yml) of an earlier run is removed).
    type: str
  ca_cert:
    description:
      - CA bundle (PEM, a path on the target) of the targets that speak HTTPS - the database nodes' Patroni REST API
        (O(targets.postgresql)), as M(gatehouse.access.database) deploys it. With it the job C(gatehouse-postgresql)
        scrapes over HTTPS and verifies the nodes' certificates (names included) against this CA; without it over
        plain HTTP.
      - Copied to C(data/ca.pem) beside the configuration.
    type: path
  alertmanagers:
    description: Alertmanagers (V(host:port)) that Prometheus sends the firing alerts to. None by default.
    type: list
    elements: str
    default: []
  scrape_interval:
    description: How often every target is scraped (a Prometheus duration).
    type: str
    default: 15s
  evaluation_interval:
    description: How often the alert rules are evaluated.
    type: str
    default: 15s
  retention:
    description: How long the time series are kept (C(--storage.tsdb.retention.time)).
    type: str
    default: 15d
  max_connections:
    description:
      - Most simultaneous connections to the web UI and HTTP API (C(--web.max-connections)); further ones wait.
      - Bounds what slow or idle clients can hold. Prometheus' own default is 512.
    type: int
    default: 64
  read_timeout:
    description:
      - Deadline to read a whole request, and for an idle keep-alive connection (C(--web.read-timeout)).
      - A client that sends its request slower is disconnected. Prometheus' own default is 5m.
    type: str
    default: 10s
  listen_address:
    description: Address of Prometheus' web UI and HTTP API (plain HTTP, no authentication; firewall it).
    type: str
    default: 0.0.0.0
  port:
    description: Port of the web UI and HTTP API; with O(network_mode=bridge) the host port published for 9090.
    type: int
    default: 9090
  data_dir:
    description: The data directory.
    type: path
    default: /opt/gatehouse/monitoring
  purge:
    description: With O(state=absent), also delete the time series database C(tsdb/).
    type: bool
    default: false
  image_tag:
    description: Tag of the C(gatehouse/prometheus) image. The default is the version of this collection.
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
      - V(host) runs Prometheus in the host's network namespace, so that it reaches targets on the host's
        loopback and every address the host reaches.
      - V(bridge) runs it on Docker's default bridge and publishes O(port).
      - V(container:<name>) shares the network namespace of another container (Molecule and the demo).
    type: str
    default: host
  host_label:
    description: Value of the C(gatehouse.host) label of the container. Defaults to the target's host name.
    type: str
  name_prefix:
    description: Prefix of the container name (C(<prefix>-prometheus)).
    type: str
    default: gatehouse
  wait_timeout:
    description:
      - Seconds to wait for a (re)started container to be up; a container that exits right after its start
        (a configuration Prometheus refuses) fails the task with its last log lines. V(0) does not wait.
    type: int
    default: 60
notes:
  - C(gatehouse/prometheus) is built by C(make images); it is not part of the dark-site bundle.
seealso:
  - module: gatehouse.access.cmsg
  - module: gatehouse.access.broker
  - module: gatehouse.access.halb
"""

EXAMPLES = r"""
- name: Prometheus scraping a broker, two CM/SG nodes and the HALB pair, with the collection's alert rules
  gatehouse.access.monitoring:
    targets:
      broker: [10.0.0.10:9181]
      cm: [10.0.0.21:9180, 10.0.0.22:9180]
      sg: [10.0.0.21:9172, 10.0.0.22:9172]
      halb: [10.0.0.41:8405, 10.0.0.42:8405]
    alert_rules: "{{ lookup('ansible.builtin.file', 'gatehouse-alerts.yml') }}"
    alertmanagers: [10.0.0.5:9093]

- name: Remove Prometheus and its time series
  gatehouse.access.monitoring:
    state: absent
    purge: true
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
  sample: [{name: gatehouse-prometheus, action: create}]
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
    jobs:
      description: The scrape jobs and their targets.
      type: dict
      sample: {gatehouse-sg: ["10.0.0.21:9172"]}
    rules:
      description: Path of the alert rules on the target, or V(null).
      type: str
    url:
      description: Prometheus' HTTP API as the target reaches it.
      type: str
      sample: http://127.0.0.1:9090
left_behind:
  description: With O(state=absent), what was kept (the time series unless O(purge), files the module did not write).
  returned: O(state=absent)
  type: list
  elements: str
promtool:
  description: The findings of C(promtool check config) when it refused the new configuration.
  returned: failure of the check
  type: list
  elements: str
errors:
  description: Every problem found in the options, when the module fails.
  returned: failure
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as deploy  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import monitoring as _monitoring  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_monitoring.ARGUMENT_SPEC,
        required_if=_monitoring.REQUIRED_IF,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _monitoring.run)


if __name__ == "__main__":
    main()
