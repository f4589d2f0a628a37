# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: dmz_settings
short_description: The double-hop DMZ settings of one host, from the inventory groups
version_added: 0.1.0
description:
  - Works out, for one host, what the C(sg_forwarders) group (forwarding security gateways in the outer
    perimeter) and the C(cmsg) group (connection managers and inner security gateways) need of each other;
    see C(docs/dmz.md).
  - Each forwarder forwards to exactly one inner security gateway - the C(cmsg) host named in its
    C(gatehouse_forward_to_host), by default the SG-enabled C(cmsg) host at its own position in the group
    (modulo their number). One inner gateway only, because every CM/SG host has its own grant secret - a grant
    minted by one connection manager opens a session at its own gateway only, and a forwarder picks among its
    O(gatehouse.access.cmsg#module:forward_to) entries without looking at the grant.
  - A forwarder is reached by the clients at its C(gatehouse_address) and by the inner gateways from its
    C(gatehouse_dmz_address) (its address on the inner firewall's side; default C(gatehouse_address)). An inner
    gateway is reached by the forwarders at its C(gatehouse_dmz_address) (default C(gatehouse_address)) on its
    C(cmsg_pcoip_port) (4172).
extends_documentation_fragment:
  - gatehouse.access.inventory
author:
  - Gatehouse contributors (@gatehouse)
"""

EXAMPLES = r"""
- name: Deploy a forwarder with the inner gateway it forwards to
  gatehouse.access.cmsg:
    accept_policies: true
    forward_to: "{{ (groups | gatehouse.access.dmz_settings(hostvars, inventory_hostname)).forward_to }}"
"""

RETURN = r"""
_value:
  description:
    - C(forward_to) - on a forwarder, the V(host:port) of its inner gateway (V([IPv6]:port) for IPv6); else empty.
    - C(forwarders) - on an inner gateway, the inventory names of the forwarders in front of it; else empty.
    - C(proxy_protocol_sources) - on an inner gateway, those forwarders' C(gatehouse_dmz_address); else empty.
    - C(external_pcoip_ip) - on an inner gateway, the address its connection manager hands the clients - the
      first IPv4 C(gatehouse_address) of those forwarders, and the first IPv6 one where the host has
      C(cmsg_enable_ipv6); else empty (the host keeps its own C(cmsg_external_pcoip_ip)).
    - C(outer_addresses) - every forwarder's C(gatehouse_address) and C(gatehouse_dmz_address) (firewall sources
      of the inner gateways' 4172, and never a source of the broker, the agents or the admin ports).
  type: dict
  sample: {"forward_to": [], "forwarders": ["dmz-sg1"], "proxy_protocol_sources": ["10.10.0.11"],
           "external_pcoip_ip": ["203.0.113.21"], "outer_addresses": ["203.0.113.21", "10.10.0.11"]}
"""

from collections.abc import Mapping  # noqa: E402

from ansible.errors import AnsibleFilterError  # noqa: E402
from ansible.module_utils.parsing.convert_bool import boolean  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.inventory import node_address  # noqa: E402

FORWARDERS = "sg_forwarders"
INNER = "cmsg"
PCOIP_PORT = 4172


def _dmz_address(host: str, node: Mapping) -> str:
    return str(node.get("gatehouse_dmz_address") or node_address(host, node))


def _inner_of(forwarder: str, index: int, inner: list[str], hostvars: Mapping) -> str:
    """The inner gateway a forwarder forwards to (its gatehouse_forward_to_host, or by position)."""
    node = hostvars[forwarder]
    named = node.get("gatehouse_forward_to_host")
    if named:
        if named not in inner:
            raise AnsibleFilterError(
                "dmz_settings: gatehouse_forward_to_host of %s is %s, not a host of the %s group with the "
                "security gateway enabled (%s)" % (forwarder, named, INNER, ", ".join(inner) or "none")
            )
        return str(named)
    if not inner:
        raise AnsibleFilterError(
            "dmz_settings: forwarder %s has no inner security gateway to forward to (no host of the %s group "
            "with the security gateway enabled)" % (forwarder, INNER)
        )
    return inner[index % len(inner)]


def dmz_settings(groups: Mapping, hostvars: Mapping, inventory_hostname: str):
    """The settings of inventory_hostname; a host of neither group gets empty lists only."""
    forwarders = list(groups.get(FORWARDERS, []))
    both = sorted(set(forwarders) & set(groups.get(INNER, [])))
    if both:
        raise AnsibleFilterError(
            "dmz_settings: %s in both %s and %s; a forwarder holds no connection manager"
            % (", ".join(both), FORWARDERS, INNER)
        )
    inner = [
        host
        for host in groups.get(INNER, [])
        if boolean(hostvars[host].get("cmsg_enable_security_gateway", True), strict=False)
    ]
    pairs = [(host, _inner_of(host, index, inner, hostvars)) for index, host in enumerate(forwarders)]
    out: dict[str, list[str]] = {
        "forward_to": [],
        "forwarders": [],
        "proxy_protocol_sources": [],
        "external_pcoip_ip": [],
        "outer_addresses": [],
    }
    for host in forwarders:
        node = hostvars[host]
        out["outer_addresses"].extend([node_address(host, node), _dmz_address(host, node)])
    for forwarder, target in pairs:
        if forwarder == inventory_hostname:
            node = hostvars[target]
            address = _dmz_address(target, node)
            port = int(node.get("cmsg_pcoip_port", PCOIP_PORT))
            out["forward_to"].append(
                "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)
            )
        if target == inventory_hostname:
            out["forwarders"].append(forwarder)
            out["proxy_protocol_sources"].append(_dmz_address(forwarder, hostvars[forwarder]))
    if out["forwarders"]:
        external = [node_address(host, hostvars[host]) for host in out["forwarders"]]
        ipv4 = [a for a in external if ":" not in a]
        ipv6 = [a for a in external if ":" in a]
        if not ipv4:
            raise AnsibleFilterError(
                "dmz_settings: the forwarders of %s (%s) have no IPv4 gatehouse_address for its external_pcoip_ip"
                % (inventory_hostname, ", ".join(out["forwarders"]))
            )
        out["external_pcoip_ip"].append(ipv4[0])
        if ipv6 and boolean(hostvars[inventory_hostname].get("cmsg_enable_ipv6", False), strict=False):
            out["external_pcoip_ip"].append(ipv6[0])
    return {key: list(dict.fromkeys(values)) for key, values in out.items()}


class FilterModule:
    def filters(self):
        return {"dmz_settings": dmz_settings}
