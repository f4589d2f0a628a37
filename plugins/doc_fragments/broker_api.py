# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # Connection options of the modules that drive the broker's admin REST API.
    DOCUMENTATION = r"""
options:
  broker_url:
    description:
      - Base URL of the broker, V(https://<host>:<port>), for example V(https://broker.example.com:443)
        or V(https://127.0.0.1:8443) on the broker host itself. A trailing C(/api/v1) is accepted.
      - Only HTTPS is accepted; the broker serves the admin API on its TLS port.
      - The request is made from the host the task runs on; use C(delegate_to) or run the task on the
        broker host when the controller cannot reach the broker.
    type: str
    required: true
  admin_token:
    description:
      - The broker's C(AdminToken) (bearer token of the admin API).
      - If not set, the value of the E(GATEHOUSE_ADMIN_TOKEN) environment variable is used.
      - It is sent in the C(Authorization) header only and never returned or logged.
    type: str
    required: true
  ca_cert:
    description:
      - PEM file with the certificate authority that signed the broker's certificate, on the host the task
        runs on. Without it the system's trust store is used.
    type: path
    aliases: [ca_path]
  validate_certs:
    description:
      - Verify the broker's TLS certificate and host name. Disable only for throw-away test setups with
        self-signed certificates; use O(ca_cert) instead.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for each answer of the broker.
    type: int
    default: 30
attributes:
  action_group:
    description: Use C(group/gatehouse.access.broker_api) in C(module_defaults) to set the connection options
      once for all broker object modules.
    support: full
    membership:
      - gatehouse.access.broker_api
notes:
  - The broker reports whether a write changed the object, and runs writes in check mode in a transaction
    it rolls back, so check mode and diff mode report what a real run would do.
  - Object names compare case-insensitively at the broker; the stored spelling is kept.
seealso:
  - module: gatehouse.access.broker
    description: Deploys the broker whose admin API these modules drive.
"""
