# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: tenant_settings
short_description: The multi-tenant settings of one host, from the inventory groups
version_added: 0.1.0
description:
  - Works out, for one host, what a multi-tenant deployment (several brokers behind shared connection managers
    and security gateways) needs; see C(docs/tenants.md).
  - A tenant is a host of the C(brokers) group with C(gatehouse_tenant) (its name, 1-32 characters of
    C(a-z0-9-)) and C(gatehouse_tenant_host_names) (its public FQDNs), optionally
    C(gatehouse_tenant_agent_networks) (CIDRs of its desktops), and the tenant's own certificate for the CM/SG
    nodes - C(gatehouse_tenant_ssl_cert) and C(gatehouse_tenant_ssl_key) (both or neither), C(gatehouse_tenant_broker_ca_cert)
    (paths on the CM/SG nodes, as the cmsg module's C(tenants) options take them). The broker host's own variables hold the
    tenant's users, groups, desktops, pools and entitlements (C(gatehouse_users) and the others), so the
    same names in two tenants are two objects at two brokers.
  - A host of the C(desktops) group with C(gatehouse_tenant) belongs to that tenant's broker; the others
    belong to the first host of C(brokers) (as without tenants).
  - Without C(gatehouse_tenant) on any broker host the results are those of a single-tenant deployment -
    C(tenants) is empty, every desktop belongs to the first broker, which alone gets the access objects.
options:
  broker_port:
    description: The brokers' TLS port as the other nodes reach it, where a broker host sets no
      C(gatehouse_broker_port).
    type: int
    default: 443
extends_documentation_fragment:
  - gatehouse.access.inventory
author:
  - Gatehouse contributors (@gatehouse)
"""

EXAMPLES = r"""
- name: Deploy a shared CM and SG for every tenant of the inventory
  gatehouse.access.cmsg:
    accept_policies: true
    external_pcoip_ip: [203.0.113.30]
    self_signed: true
    tenants: "{{ (groups | gatehouse.access.tenant_settings(hostvars, inventory_hostname)).tenants }}"
"""

RETURN = r"""
_value:
  description:
    - C(tenants) - every tenant in the order of the C(brokers) group, as the
      O(gatehouse.access.cmsg#module:tenants) option takes them (C(name), C(host_names), C(broker_url) of its
      broker host at its C(gatehouse_address) and C(gatehouse_broker_port), C(agent_networks), and
      C(ssl_cert), C(ssl_key), C(broker_ca_cert) where the broker host gives them); empty without tenants.
    - C(tenant) - the tenant of this host (a broker or desktop host with C(gatehouse_tenant)); else empty.
    - C(broker) - the broker host of this host - its own tenant's broker, itself on a broker host with a
      tenant, else the first host of C(brokers) (empty without brokers).
    - C(broker_url) - that broker's URL as this host reaches it (C(https://address:port), an IPv6 address in
      brackets), like a tenant's C(broker_url); empty without brokers.
    - C(objects) - whether this host gets the access objects - a broker host with a tenant, or the first
      broker host of a single-tenant inventory.
    - C(desktops) - on such a host, the hosts of C(desktops) that belong to it; else empty.
    - C(desktop_addresses) - the addresses of those desktop hosts as the other nodes reach them (a tenant
      broker's firewall sources for the agents' load reports); empty where C(desktops) is.
  type: dict
  sample: {"tenants": [{"name": "tenant-a", "host_names": ["desktops.tenant-a.example"],
           "broker_url": "https://10.31.0.10:443", "agent_networks": []}], "tenant": "tenant-a",
           "broker": "broker-a", "broker_url": "https://10.31.0.10:443", "objects": true, "desktops": ["desk-a"],
           "desktop_addresses": ["10.31.0.31"]}
"""

import re  # noqa: E402
from collections.abc import Mapping  # noqa: E402

from ansible.errors import AnsibleFilterError  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.inventory import node_address  # noqa: E402

BROKERS = "brokers"
DESKTOPS = "desktops"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# The cmsg module's tenants options a tenant's broker host may give (paths on the CM/SG nodes).
OWN_FILES = {
    "ssl_cert": "gatehouse_tenant_ssl_cert",
    "ssl_key": "gatehouse_tenant_ssl_key",
    "broker_ca_cert": "gatehouse_tenant_broker_ca_cert",
}


def _broker_url(host: str, node: Mapping, port: int) -> str:
    address = node_address(host, node)
    shown = "[%s]" % address if ":" in address else address
    return "https://%s:%d" % (shown, int(node.get("gatehouse_broker_port", port)))


def _tenant_brokers(groups: Mapping, hostvars: Mapping) -> dict[str, str]:
    """Tenant name -> its broker host, in the order of the brokers group; refuses a bad inventory."""
    out: dict[str, str] = {}
    for host in groups.get(BROKERS, []):
        name = hostvars[host].get("gatehouse_tenant")
        if not name:
            continue
        if not NAME_RE.match(str(name)):
            raise AnsibleFilterError(
                "tenant_settings: gatehouse_tenant of %s is %r, not 1-32 characters of a-z, 0-9 and '-'"
                % (host, name)
            )
        if name in out:
            raise AnsibleFilterError(
                "tenant_settings: tenant %s has two broker hosts (%s, %s); give each tenant one"
                % (name, out[name], host)
            )
        if bool(hostvars[host].get("gatehouse_tenant_ssl_cert")) != bool(
            hostvars[host].get("gatehouse_tenant_ssl_key")
        ):
            raise AnsibleFilterError(
                "tenant_settings: broker %s of tenant %s needs gatehouse_tenant_ssl_cert and gatehouse_tenant_ssl_key "
                "together (the tenant's own certificate and its key), or neither" % (host, name)
            )
        if not hostvars[host].get("gatehouse_tenant_host_names"):
            raise AnsibleFilterError(
                "tenant_settings: broker %s of tenant %s needs gatehouse_tenant_host_names (the tenant's public "
                "FQDNs)" % (host, name)
            )
        out[str(name)] = host
    if out:
        plain = [h for h in groups.get(BROKERS, []) if not hostvars[h].get("gatehouse_tenant")]
        if plain:
            raise AnsibleFilterError(
                "tenant_settings: %s in the brokers group without gatehouse_tenant; once one broker host is a "
                "tenant's, every one must be" % ", ".join(plain)
            )
    return out


def tenant_settings(groups: Mapping, hostvars: Mapping, inventory_hostname: str, broker_port: int = 443):
    """The settings of inventory_hostname (see RETURN); single-tenant inventories get today's values."""
    brokers = _tenant_brokers(groups, hostvars)
    first = (list(groups.get(BROKERS, [])) or [""])[0]
    node = hostvars[inventory_hostname]
    tenant = str(node.get("gatehouse_tenant") or "")
    if tenant and inventory_hostname not in groups.get(BROKERS, []) and tenant not in brokers:
        raise AnsibleFilterError(
            "tenant_settings: gatehouse_tenant of %s is %s, which no host of the brokers group is (%s)"
            % (inventory_hostname, tenant, ", ".join(sorted(brokers)) or "no tenants")
        )
    broker = brokers.get(tenant, first) if tenant else first
    is_broker = inventory_hostname in groups.get(BROKERS, [])
    objects = is_broker and (bool(tenant) if brokers else inventory_hostname == first)
    desktops: list[str] = []
    if objects:
        desktops = [
            host
            for host in groups.get(DESKTOPS, [])
            if str(hostvars[host].get("gatehouse_tenant") or "") == (tenant if brokers else "")
        ]
    tenants = [
        {
            "name": name,
            "host_names": [str(h) for h in hostvars[host]["gatehouse_tenant_host_names"]],
            "broker_url": _broker_url(host, hostvars[host], broker_port),
            "agent_networks": [str(n) for n in hostvars[host].get("gatehouse_tenant_agent_networks") or []],
            # Only the files given: an entry without them is what the cmsg module had before.
            **{
                option: str(hostvars[host][variable])
                for option, variable in OWN_FILES.items()
                if hostvars[host].get(variable)
            },
        }
        for name, host in brokers.items()
    ]
    return {
        "tenants": tenants,
        "tenant": tenant,
        "broker": broker,
        "broker_url": _broker_url(broker, hostvars[broker], broker_port) if broker else "",
        "objects": objects,
        "desktops": desktops,
        "desktop_addresses": list(dict.fromkeys(node_address(host, hostvars[host]) for host in desktops)),
    }


class FilterModule:
    def filters(self):
        return {"tenant_settings": tenant_settings}
