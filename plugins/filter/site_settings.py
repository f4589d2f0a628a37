# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: site_settings
short_description: The multi-site settings of one host, from the inventory's sites
version_added: 0.1.0
description:
  - Works out, for one host, what the sites of a multi-site deployment (C(docs/multisite.md)) need of
    each other. A host's site is its C(gatehouse_site) variable, set as a group variable on each site's
    inventory group; hosts without it (the broker, monitoring) belong to no site.
  - The gateway of a site (C(site_gateways)) is the first C(cmsg) host of the site with the security
    gateway enabled, at the first entry of its C(cmsg_external_pcoip_ip) (default its C(gatehouse_address))
    and its C(cmsg_pcoip_port) (4172). Every CM/SG node gets the same map; a node's own site in it is not used.
  - With more than one site every C(cmsg) and C(halb) host must belong to a site, and every C(cmsg) host must
    have the same non-empty C(cmsg_grant_secret) (a grant sealed at one site is opened at another); the filter
    fails otherwise, naming the hosts, never the secret.
  - Without any C(gatehouse_site) the result is empty (C(site) empty, no sites), and single-site deployments get
    exactly what they got before.
extends_documentation_fragment:
  - gatehouse.access.inventory
author:
  - Gatehouse contributors (@gatehouse)
"""

EXAMPLES = r"""
- name: Deploy a CM/SG node of a site with the gateways of every site
  gatehouse.access.cmsg:
    accept_policies: true
    site: "{{ (groups | gatehouse.access.site_settings(hostvars, inventory_hostname)).site }}"
    site_gateways: "{{ (groups | gatehouse.access.site_settings(hostvars, inventory_hostname)).site_gateways }}"
"""

RETURN = r"""
_value:
  description:
    - C(site) - this host's site (its C(gatehouse_site)); empty for a host of no site.
    - C(sites) - every site of the inventory, sorted; empty without sites.
    - C(site_gateways) - site to C(host:port) (C([IPv6]:port)) of one security gateway of that site.
    - C(cmsg_hosts), C(halb_hosts), C(desktop_hosts) - the inventory names of this host's site's C(cmsg),
      C(halb) and C(desktops) hosts; empty for a host of no site.
    - C(halb_pairs) - site to the inventory names of its C(halb) hosts, in inventory order (each site's
      HALB pair; C(playbooks/site.yml) makes a group of each).
    - C(addresses) - the same hosts' addresses by group (C(cmsg), C(halb), C(desktops)) as the other nodes
      reach them (firewall sources; a HALB node's C(halb_address) and C(gatehouse_dmz_address) too, as for
      the whole inventory in C(playbooks/vars/gatehouse.yml)).
  type: dict
  sample: {"site": "site1", "sites": ["site1", "site2"],
           "site_gateways": {"site1": "203.0.113.21:4172", "site2": "198.51.100.21:4172"},
           "cmsg_hosts": ["cmsg1-s1"], "halb_hosts": ["halb1-s1"], "desktop_hosts": ["desk1-s1"],
           "halb_pairs": {"site1": ["halb1-s1"], "site2": ["halb1-s2"]},
           "addresses": {"cmsg": ["10.1.0.21"], "halb": ["10.1.0.41"], "desktops": ["10.1.0.31"]}}
"""

from collections.abc import Mapping  # noqa: E402

from ansible.errors import AnsibleFilterError  # noqa: E402
from ansible.module_utils.parsing.convert_bool import boolean  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.inventory import node_address  # noqa: E402

GROUPS = {"cmsg": "cmsg", "halb": "halb", "desktops": "desktops"}
PCOIP_PORT = 4172


def _site(node: Mapping) -> str:
    return str(node.get("gatehouse_site") or "")


def _gateway(host: str, node: Mapping) -> str:
    external = node.get("cmsg_external_pcoip_ip") or []
    if isinstance(external, str):
        external = [external]
    address = str(external[0]) if external else node_address(host, node)
    port = int(node.get("cmsg_pcoip_port", PCOIP_PORT))
    return "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)


def _check_multisite(groups: Mapping, hostvars: Mapping, sites: list[str]) -> None:
    """More than one site: every CM/SG and HALB node in a site, one grant secret on every CM/SG node."""
    for group in ("cmsg", "halb"):
        outside = [host for host in groups.get(group, []) if not _site(hostvars[host])]
        if outside:
            raise AnsibleFilterError(
                "site_settings: the inventory has the sites %s, but %s of the %s group belong to none; set "
                "gatehouse_site on each site's group" % (", ".join(sites), ", ".join(outside), group)
            )
    secrets = {host: str(hostvars[host].get("cmsg_grant_secret") or "") for host in groups.get("cmsg", [])}
    missing = sorted(host for host, secret in secrets.items() if not secret)
    if missing:
        raise AnsibleFilterError(
            "site_settings: the sites %s need one grant secret shared by every CM/SG node; set "
            "cmsg_grant_secret (from a vault) for the cmsg group - missing on %s"
            % (", ".join(sites), ", ".join(missing))
        )
    if len(set(secrets.values())) > 1:
        raise AnsibleFilterError(
            "site_settings: the sites %s need one grant secret shared by every CM/SG node, but the cmsg hosts "
            "have different cmsg_grant_secret values; set it once for the cmsg group" % ", ".join(sites)
        )


def site_settings(groups: Mapping, hostvars: Mapping, inventory_hostname: str):
    """The settings of inventory_hostname; without any gatehouse_site, empty ones only."""
    members = {group: list(groups.get(name, [])) for group, name in GROUPS.items()}
    every = list(dict.fromkeys(host for hosts in members.values() for host in hosts))
    sites = sorted({_site(hostvars[host]) for host in every} - {""})
    if len(sites) > 1:
        _check_multisite(groups, hostvars, sites)
    gateways: dict[str, str] = {}
    for host in members["cmsg"]:
        node = hostvars[host]
        site = _site(node)
        if (
            site
            and site not in gateways
            and boolean(node.get("cmsg_enable_security_gateway", True), strict=False)
        ):
            gateways[site] = _gateway(host, node)
    pairs: dict[str, list[str]] = {}
    for host in members["halb"]:
        site = _site(hostvars[host])
        if site:
            pairs.setdefault(site, []).append(host)
    own = _site(hostvars[inventory_hostname]) if inventory_hostname in hostvars else ""
    same = {
        group: [h for h in hosts if own and _site(hostvars[h]) == own] for group, hosts in members.items()
    }
    addresses: dict[str, list[str]] = {}
    for group, hosts in same.items():
        found = []
        for host in hosts:
            node = hostvars[host]
            found.append(node_address(host, node))
            if group == "halb":
                found.extend(
                    str(node[key]) for key in ("halb_address", "gatehouse_dmz_address") if node.get(key)
                )
        addresses[group] = list(dict.fromkeys(found))
    return {
        "site": own,
        "sites": sites,
        "site_gateways": gateways,
        "cmsg_hosts": same["cmsg"],
        "halb_hosts": same["halb"],
        "desktop_hosts": same["desktops"],
        "halb_pairs": pairs,
        "addresses": addresses,
    }


class FilterModule:
    def filters(self):
        return {"site_settings": site_settings}
