# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: discovery_fqdns
short_description: FQDNs a device tries in Management Console DNS-based discovery, in order
version_added: 0.1.0
description:
  - Returns the fully qualified domain names a PCoIP device composes during Management Console (MC) DNS-based
    discovery, in the order it attempts them, for one cycle of the algorithm.
  - The device first uses the domain name from DHCP option 15 (O(domain)), prefixed with the discovery prefix,
    then proceeds one level up the domain hierarchy per attempt; the last domain name attempted has a single
    dot. It then does the same with the host name from DHCP option 12 (O(hostname)), which is assumed to include
    the domain name. (The device waits 5 minutes between the two series and after the second, then starts again;
    the delays are in the result with O(details).)
  - Either O(domain) or O(hostname) may be empty, as a DHCP server may not return the option; then only the
    other one's names are returned. A name without a dot yields no attempt. It is an error when no attempt
    remains.
  - Names are normalised as a resolver treats them, blanks and one trailing dot removed and lower-cased. Labels
    are 1 to 63 letters, digits, V(-) or V(_) (real prefixes such as V(pcoip_mc1) contain underscores), not
    starting or ending with V(-); names longer than 253 characters are refused.
  - Use it to create the DNS records the devices will find, or to check which record a device will hit first.
author:
  - Gatehouse contributors (@gatehouse)
options:
  _terms:
    description:
      - One or more discovery prefixes (the PCoIP MC DNS-Based Discovery Prefix setting). Each prefix gives its own
        series of names, in the order of the prefixes.
    type: list
    elements: str
    required: true
  domain:
    description: Domain name from DHCP option 15, for example V(sales.europe.companyname.com).
    type: str
    default: ""
  hostname:
    description:
      - Host name from DHCP option 12, including the domain name, for example
        V(hostmachine1.sales.europe.companyname.com).
    type: str
    default: ""
  details:
    description:
      - Return one dictionary per attempt instead of the bare name, with the attempt's number and timing (see
        RV(_raw)).
    type: bool
    default: false
  resolve:
    description:
      - Resolve every name with the controller's resolver and tell which resolve (implies O(details)); the first
        attempt that resolves is the record a device finds.
      - The controller's view of DNS may differ from the devices' (split horizon, another DHCP-given server).
        A name that does not resolve costs the resolver's timeout.
    type: bool
    default: false
notes:
  - C(lookup) joins list results with commas; use C(query) (or C(wantlist=true)) to get a list.
"""

EXAMPLES = r"""
- name: The names a device with the documented DHCP answers tries, in order
  ansible.builtin.debug:
    msg: >-
      {{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1',
               domain='sales.europe.companyname.com',
               hostname='hostmachine1.sales.europe.companyname.com') }}
  # pcoip_mc1.sales.europe.companyname.com, pcoip_mc1.europe.companyname.com, pcoip_mc1.companyname.com,
  # pcoip_mc1.hostmachine1.sales.europe.companyname.com, pcoip_mc1.sales.europe.companyname.com,
  # pcoip_mc1.europe.companyname.com, pcoip_mc1.companyname.com

- name: The record a device finds first when the DHCP server sends only its host name (option 12)
  ansible.builtin.set_fact:
    first_discovery_name: >-
      {{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1', hostname='zc1.branch.example.com') | first }}
  # pcoip_mc1.zc1.branch.example.com

- name: Which discovery record a device hits first, checked against DNS
  ansible.builtin.assert:
    that: hits | length > 0
    fail_msg: "No discovery name resolves; the devices will not find the Management Console"
    success_msg: "Devices find {{ (hits | first).fqdn }} at attempt {{ (hits | first).attempt }}"
  vars:
    hits: >-
      {{ query('gatehouse.access.discovery_fqdns', 'pcoip_mc1', domain='sales.europe.companyname.com',
               resolve=true) | selectattr('resolves') }}
"""

RETURN = r"""
_raw:
  description:
    - The FQDNs in the order the device attempts them (one cycle; repeated names are kept).
    - With O(details) or O(resolve), one dictionary per attempt instead.
    - After the last attempt the device waits 300 seconds and starts the cycle again.
  type: list
  elements: raw
  contains:
    attempt:
      description: The attempt's number in the cycle, from 1 (counted per prefix).
      type: int
    fqdn:
      description: The name attempted.
      type: str
    prefix:
      description: The discovery prefix, normalised.
      type: str
    dhcp_option:
      description: The DHCP option the name derives from, V(15) (domain name) or V(12) (host name).
      type: int
    delay:
      description:
        - Seconds the device waits before this attempt, beyond the previous attempt's transmission timeout; 300
          before the first host-name attempt that follows domain attempts, otherwise 0.
      type: int
    addresses:
      description: With O(resolve), the addresses the name resolves to on the controller (empty when it does not).
      type: list
      elements: str
    resolves:
      description: With O(resolve), whether the name resolves.
      type: bool
"""

from ansible.errors import AnsibleError  # noqa: E402
from ansible.plugins.lookup import LookupBase  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._ops.discovery import (  # noqa: E402
    DiscoveryError,
    discovery_attempts,
    resolve,
)


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        domain = self.get_option("domain")
        hostname = self.get_option("hostname")
        resolving = self.get_option("resolve")
        details = self.get_option("details") or resolving
        if not terms:
            raise AnsibleError("discovery_fqdns needs at least one discovery prefix")
        attempts = []
        for prefix in terms:
            try:
                attempts.extend(discovery_attempts(prefix, domain, hostname))
            except DiscoveryError as exc:
                raise AnsibleError("discovery_fqdns: %s" % exc) from None
        if resolving:
            known = {}  # a cycle repeats names: each is looked up once
            for attempt in attempts:
                if attempt["fqdn"] not in known:
                    known[attempt["fqdn"]] = resolve(attempt["fqdn"])
                attempt["addresses"] = known[attempt["fqdn"]]
                attempt["resolves"] = bool(attempt["addresses"])
        return attempts if details else [attempt["fqdn"] for attempt in attempts]
