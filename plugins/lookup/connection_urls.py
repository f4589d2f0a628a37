# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: connection_urls
short_description: Primary and secondary connection manager URLs of a user population, in order
version_added: 0.1.0
description:
  - Returns the ordered list of connection manager URLs that the clients of a user population try, the first
    being the primary connection and the others the secondary connections (the seed's multi-site scenario).
    A client moves to the next URL when one does not answer (C(gatehouse-client --url) takes the list, comma
    separated, as C(lookup) joins it).
  - Each site is described once in O(sites) - its HALB virtual server address and its connection manager
    nodes - and each population in O(populations) as an ordered list of entries. An entry is a site name (the
    site's HALB virtual server), C(SITE:cms) (each connection manager node of the site, in order - the seed's
    local primary and secondary gateways of LAN users) or a literal C(https://host[:port]) URL.
  - A URL is returned once, at its first place. URLs are C(https://host[:port]), IPv6 addresses in brackets,
    port 443 left out, DNS names lower-cased.
  - Unknown populations, sites or keys, and addresses that are neither IP addresses nor DNS names, fail the
    lookup with a message naming them.
  - See the C(docs/multisite.md) page of the collection.
author:
  - Gatehouse contributors (@gatehouse)
options:
  _terms:
    description: One or more population names (keys of O(populations)); their lists are returned one after the other.
    type: list
    elements: str
    required: true
  sites:
    description:
      - Site name to its addresses. Keys of each site are C(vip) (the HALB virtual server's address clients reach,
        an IP address or DNS name), C(port) (of C(vip), default V(443)), C(cms) (the connection manager nodes'
        addresses, in order) and C(cm_port) (default V(443)). A site needs C(vip), C(cms) or both.
      - Site names are the desktops' and connection managers' C(site) (lower-case letters, digits, V(-), V(_)).
    type: dict
    default: {}
    vars:
      - name: gatehouse_sites
  populations:
    description:
      - Population name to its ordered entries (V(SITE), V(SITE:cms) or a C(https://) URL).
    type: dict
    default: {}
    vars:
      - name: gatehouse_populations
  details:
    description:
      - Return one dictionary per connection (see RV(_raw)) instead of the bare URL.
    type: bool
    default: false
notes:
  - C(lookup) joins list results with commas, the form C(gatehouse-client --url) takes; use C(query) (or
    C(wantlist=true)) to get a list.
"""

EXAMPLES = r"""
- name: The seed's multi-site connections, one list per user population
  ansible.builtin.debug:
    msg: "{{ item }}: {{ query('gatehouse.access.connection_urls', item, sites=sites, populations=populations) }}"
  loop: [lan-site1, lan-site2, wan]
  vars:
    sites:
      site1: {vip: vip.site1.example.com, cms: [cm1.site1.example.com, cm2.site1.example.com]}
      site2: {vip: vip.site2.example.com, cms: [cm1.site2.example.com, cm2.site2.example.com]}
    populations:
      lan-site1: ["site1:cms", site2]
      lan-site2: ["site2:cms", site1]
      wan: [site1, site2]
  # lan-site1: https://cm1.site1.example.com, https://cm2.site1.example.com, https://vip.site2.example.com
  # wan: https://vip.site1.example.com, https://vip.site2.example.com

- name: The test client with the WAN users' primary and secondary connections (lookup joins with commas)
  ansible.builtin.set_fact:
    wan_client_args: >-
      --url {{ lookup('gatehouse.access.connection_urls', 'wan',
                      sites={'site1': {'vip': '203.0.113.10'}, 'site2': {'vip': '198.51.100.10', 'port': 8443}},
                      populations={'wan': ['site1', 'site2']}) }}
  # --url https://203.0.113.10,https://198.51.100.10:8443

- name: One file per population for distribution to the clients (sites and populations from inventory variables)
  ansible.builtin.copy:
    dest: "/var/tmp/gatehouse-connections-{{ item }}.txt"
    content: "{{ query('gatehouse.access.connection_urls', item) | join('\n') }}\n"
    mode: "0644"
  loop: "{{ gatehouse_populations | default({}) | list }}"
  vars:
    gatehouse_sites:
      site1: {vip: 203.0.113.10}
      site2: {vip: 198.51.100.10}
    gatehouse_populations:
      wan: [site1, site2]
"""

RETURN = r"""
_raw:
  description:
    - The population's connection manager URLs, primary first.
    - With O(details), one dictionary per connection instead.
  type: list
  elements: raw
  contains:
    url:
      description: The URL, C(https://host[:port]).
      type: str
    site:
      description: The site the URL belongs to (empty for a literal URL entry).
      type: str
    kind:
      description: V(vip) (a site's HALB virtual server), V(cm) (a connection manager node) or V(url) (a literal entry).
      type: str
    population:
      description: The population the connection is listed for.
      type: str
    order:
      description: The connection's place in the population's list, from 1 (1 is the primary connection).
      type: int
"""

from ansible.errors import AnsibleError  # noqa: E402
from ansible.plugins.lookup import LookupBase  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.connection_urls import (  # noqa: E402
    ConnectionUrlsError,
    connection_list,
)


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        sites = self.get_option("sites")
        populations = self.get_option("populations")
        details = self.get_option("details")
        if not terms:
            raise AnsibleError("connection_urls needs at least one population name")
        result = []
        for population in terms:
            try:
                connections = connection_list(population, populations, sites)
            except ConnectionUrlsError as exc:
                raise AnsibleError("connection_urls: %s" % exc) from None
            for order, connection in enumerate(connections, start=1):
                if details:
                    result.append(dict(connection, population=population, order=order))
                else:
                    result.append(connection["url"])
        return result
