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
  - Forwarders with a C(gatehouse_forwarder_vip) (an IPv4 address with its prefix, like C(203.0.113.20/24)) form a
    keepalived pair per VIP; the connection manager of their inner gateway hands out the VIP instead of their own
    addresses. All forwarders of one VIP forward to the same inner gateway (the client reaches whichever holds the
    VIP, and only its own connection manager's gateway accepts its grant), and all forwarders of one inner gateway
    share its VIP; anything else stops the play.
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
    - Only when a forwarder has a C(gatehouse_forwarder_vip) - C(forwarder_vip) (on a forwarder, its VIP with the
      prefix; else empty), C(listen_address) (on a forwarder, the VIP's address - it listens there, so its UDP
      answers leave from the VIP) and C(forwarder_vip_pairs) (every VIP's inventory group name, for the
      keepalived pair, and its forwarders in inventory order).
  type: dict
  sample: {"forward_to": [], "forwarders": ["dmz-sg1"], "proxy_protocol_sources": ["10.10.0.11"],
           "external_pcoip_ip": ["203.0.113.21"], "outer_addresses": ["203.0.113.21", "10.10.0.11"]}
"""

import ipaddress  # noqa: E402
from collections.abc import Mapping  # noqa: E402

from ansible.errors import AnsibleFilterError  # noqa: E402
from ansible.module_utils.parsing.convert_bool import boolean  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.inventory import node_address  # noqa: E402

FORWARDERS = "sg_forwarders"
INNER = "cmsg"
PCOIP_PORT = 4172
VIP_VARIABLE = "gatehouse_forwarder_vip"
VIP_GROUP_PREFIX = "gatehouse_forwarder_vip_"


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


def _vip_of(forwarder: str, node: Mapping) -> ipaddress.IPv4Interface | None:
    value = node.get(VIP_VARIABLE)
    if not value:
        return None
    try:
        vip = ipaddress.ip_interface(str(value).strip())
    except ValueError:
        vip = None
    if not isinstance(vip, ipaddress.IPv4Interface) or "/" not in str(value):
        raise AnsibleFilterError(
            "dmz_settings: %s of %s is %r, not an IPv4 address with its prefix (like 203.0.113.20/24)"
            % (VIP_VARIABLE, forwarder, value)
        )
    return vip


def _vip_pairs(pairs: list[tuple[str, str]], hostvars: Mapping) -> dict[str, dict]:
    """Per VIP (as a string with its prefix): its forwarders and their one inner gateway.

    Invariant: every forwarder of a VIP forwards to the same inner gateway, and every forwarder of an
    inner gateway with a VIP has that same VIP.
    """
    vips: dict[str, dict] = {}
    by_inner: dict[str, set[str]] = {}
    for forwarder, target in pairs:
        vip = _vip_of(forwarder, hostvars[forwarder])
        by_inner.setdefault(target, set()).add(str(vip) if vip else "")
        if vip is None:
            continue
        entry = vips.setdefault(str(vip), {"inner": target, "forwarders": []})
        if entry["inner"] != target:
            raise AnsibleFilterError(
                "dmz_settings: the forwarders of %s %s forward to %s and %s; a VIP needs one inner security "
                "gateway (each connection manager's grant opens a session at its own gateway only)"
                % (VIP_VARIABLE, vip, entry["inner"], target)
            )
        entry["forwarders"].append(forwarder)
    for target, found in by_inner.items():
        if len(found) > 1:
            raise AnsibleFilterError(
                "dmz_settings: the forwarders of %s have different %s (%s); its connection manager hands out one"
                % (target, VIP_VARIABLE, ", ".join(sorted(v or "none" for v in found)))
            )
    return vips


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
    vips = _vip_pairs(pairs, hostvars)
    inner_vips = {entry["inner"]: vip for vip, entry in vips.items()}
    if inventory_hostname in inner_vips:
        out["external_pcoip_ip"].append(str(ipaddress.ip_interface(inner_vips[inventory_hostname]).ip))
    elif out["forwarders"]:
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
    result: dict = {key: list(dict.fromkeys(values)) for key, values in out.items()}
    if vips:
        own = [vip for vip, entry in vips.items() if inventory_hostname in entry["forwarders"]]
        result["forwarder_vip"] = own
        result["listen_address"] = [str(ipaddress.ip_interface(vip).ip) for vip in own]
        result["forwarder_vip_pairs"] = {
            VIP_GROUP_PREFIX + str(ipaddress.ip_interface(vip).ip).replace(".", "_"): entry["forwarders"]
            for vip, entry in vips.items()
        }
    return result


class FilterModule:
    def filters(self):
        return {"dmz_settings": dmz_settings}
