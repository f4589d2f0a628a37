# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: monitoring_targets
short_description: The endpoints a monitoring host scrapes, by kind, from the inventory groups
version_added: 0.1.0
description:
  - Returns the O(gatehouse.access.monitoring#module:targets) of a monitoring host, a dictionary by kind
    (V(broker), V(cm), V(sg), V(halb), V(postgresql)) of V(host:port) lists, from the inventory groups
    C(brokers), C(cmsg), C(halb) and C(databases).
  - A broker is scraped on its management port 9181, a CM on 9180, an SG on 9172 (only where
    C(cmsg_enable_security_gateway) is true), a HALB node on its C(halb_metrics_port) (8405; V(0) means none) and
    a database node on Patroni's REST API, 8008 (not an etcd-only witness, C(database_patroni=false)).
  - A node in the monitoring host's own network namespace (the same inventory host) is scraped on V(127.0.0.1).
    In bridge mode (C(gatehouse_network_mode) unset or V(bridge)) a CM/SG node publishes its management ports on
    its host's loopback only (C(cmsg_cm_admin_host_port), C(cmsg_sg_admin_host_port)), and a broker on a monitoring
    host publishes its own there (C(gatehouse_broker_admin_host_port), 9181), so such nodes are scraped only from
    their own host.
  - O(extra) adds endpoints of your own by kind; the result lists every endpoint once, in inventory order.
options:
  inventory_hostname:
    description: The monitoring host.
    type: str
    required: true
  extra:
    description: More endpoints by kind, as O(gatehouse.access.monitoring#module:targets) takes them.
    type: dict
    default: {}
extends_documentation_fragment:
  - gatehouse.access.inventory
author:
  - Gatehouse contributors (@gatehouse)
"""

EXAMPLES = r"""
- name: Scrape every Gatehouse node of the inventory, and a PostgreSQL exporter
  gatehouse.access.monitoring:
    targets: >-
      {{ groups | gatehouse.access.monitoring_targets(hostvars, inventory_hostname,
                                                      extra={'postgresql': ['10.0.0.61:8008']}) }}
"""

RETURN = r"""
_value:
  description: V(host:port) lists by kind; every kind is present, possibly empty.
  type: dict
  sample: {"broker": ["127.0.0.1:9181"], "cm": ["10.0.0.21:9180"], "sg": ["10.0.0.21:9172"],
           "halb": ["10.0.0.41:8405"], "postgresql": []}
"""

from collections.abc import Mapping  # noqa: E402

from ansible.errors import AnsibleFilterError  # noqa: E402
from ansible.module_utils.parsing.convert_bool import boolean  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker, cmsg, database  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy.monitoring import TARGET_KINDS  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._halb.render import DEFAULT_METRICS_PORT  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._ops.inventory import bridged, node_address  # noqa: E402


def monitoring_targets(
    groups: Mapping, hostvars: Mapping, inventory_hostname: str, extra: Mapping | None = None
):
    """Targets by kind (every kind of TARGET_KINDS present); unknown kinds in extra are refused."""
    unknown = sorted(set(extra or {}) - set(TARGET_KINDS))
    if unknown:
        raise AnsibleFilterError(
            "monitoring_targets: unknown kind(s) %s in extra (kinds: %s)"
            % (", ".join(unknown), ", ".join(TARGET_KINDS))
        )
    out: dict[str, list[str]] = {kind: [] for kind in TARGET_KINDS}
    for host in groups.get("brokers", []):
        node = hostvars[host]
        if host == inventory_hostname:
            # bridge mode: site.yml publishes it on the loopback at gatehouse_broker_admin_host_port
            port = broker.ADMIN_PORT
            if bridged(node):
                port = int(node.get("gatehouse_broker_admin_host_port", broker.ADMIN_PORT))
            if port > 0:
                out["broker"].append("127.0.0.1:%d" % port)
        elif not bridged(node):
            out["broker"].append("%s:%d" % (node_address(host, node), broker.ADMIN_PORT))
    for host in groups.get("cmsg", []):
        node = hostvars[host]
        published, local = bridged(node), host == inventory_hostname
        if not (local or not published):
            continue
        address = "127.0.0.1" if local else node_address(host, node)
        cm_port = (
            int(node.get("cmsg_cm_admin_host_port", cmsg.CM_ADMIN_PORT)) if published else cmsg.CM_ADMIN_PORT
        )
        out["cm"].append("%s:%d" % (address, cm_port))
        if boolean(node.get("cmsg_enable_security_gateway", True), strict=False):
            sg_port = (
                int(node.get("cmsg_sg_admin_host_port", cmsg.SG_ADMIN_PORT))
                if published
                else cmsg.SG_ADMIN_PORT
            )
            out["sg"].append("%s:%d" % (address, sg_port))
    for host in groups.get("halb", []):
        node = hostvars[host]
        port = int(node.get("halb_metrics_port", DEFAULT_METRICS_PORT))
        if port > 0:
            out["halb"].append("%s:%d" % (node_address(host, node), port))
    for host in groups.get("databases", []):
        node = hostvars[host]
        if boolean(node.get("database_patroni", True), strict=False):  # an etcd-only witness has no Patroni
            out["postgresql"].append("%s:%d" % (node_address(host, node), database.API_PORT))
    for kind, found in (extra or {}).items():
        if isinstance(found, str) or not isinstance(found, (list, tuple)):
            raise AnsibleFilterError("monitoring_targets: extra.%s must be a list of host:port" % kind)
        out[kind].extend(str(target) for target in found)
    return {kind: list(dict.fromkeys(found)) for kind, found in out.items()}


class FilterModule:
    def filters(self):
        return {"monitoring_targets": monitoring_targets}
