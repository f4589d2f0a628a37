# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # The inputs of every filter that works a host's settings out of the inventory (dmz_settings,
    # monitoring_targets, site_settings, tenant_settings): groups | filter(hostvars, inventory_hostname).
    DOCUMENTATION = r"""
options:
  _input:
    description: The inventory's C(groups).
    type: dict
    required: true
  hostvars:
    description: The inventory's C(hostvars).
    type: dict
    required: true
  inventory_hostname:
    description: The host to work out.
    type: str
    required: true
"""
