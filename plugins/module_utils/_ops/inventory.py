# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Facts about an inventory host that the collection's filters share (private to the collection).

``node`` is the host's ``hostvars`` entry. Invariants: a host's address is its
``gatehouse_address``, else its ``ansible_host``, else its inventory name, as playbooks/site.yml
uses it; a host runs its services in bridge mode unless ``gatehouse_network_mode`` names another
mode (``host`` or ``container:<name>``).
"""

from __future__ import annotations

from collections.abc import Mapping


def node_address(host: str, node: Mapping) -> str:
    """The address other hosts reach ``host`` at."""
    return str(node.get("gatehouse_address", node.get("ansible_host", host)))


def bridged(node: Mapping) -> bool:
    """Whether the host's services run in bridge mode (published ports, their own namespaces)."""
    return node.get("gatehouse_network_mode", "") in ("", "bridge")
