#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: node_certificates
short_description: Issue a node's internal certificates from the deployment CA in one task
version_added: 0.1.0
description:
  - For every entry of O(certificates) makes a private key on the node (3072-bit RSA, mode V(0600)) unless one is
    there, a certificate request with the entry's DNS names, IP addresses and the URI subject alternative name
    C(urn:gatehouse:role:<role>), signs it on the controller with the deployment CA in O(ca_dir) and writes the
    certificate on the node. The key never leaves the node; the CA's key never leaves the controller.
  - A certificate is issued again only when it is missing, expires within O(renew_days) days, its names, key or
    role changed, or it was not issued by the CA in O(ca_dir) (after a CA rotation).
  - Copies the CA certificate to C(<directory>/ca.pem) on the node.
  - An action plugin of the same name does the controller's part; the node's part runs as this module, once to
    make keys and requests and, only when a certificate is issued, once more to write it.
  - The role M(gatehouse.access.pki) calls it; C(tasks_from=ca) of that role creates the CA.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
    details:
      - Keys and certificates that would be made are reported; nothing is written.
  diff_mode:
    support: full
    details:
      - The diff names each certificate with its subject alternative names and end of validity; never key material.
  platform:
    platforms: posix
requirements:
  - cryptography >= 42.0 on the controller and the managed host
options:
  ca_dir:
    description: Controller directory of the deployment CA (C(ca.pem), and C(ca.key) of mode V(0600)).
    type: path
    required: true
  directory:
    description: Node directory of C(ca.pem) and, by default, of C(<name>.pem) and C(<name>.key).
    type: path
    required: true
  certificates:
    description: The certificates of this node.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: File name of the certificate and key (letters, digits, C(.), C(_) and C(-)).
        type: str
        required: true
      role:
        description: The role the certificate names (C(urn:gatehouse:role:<role>)).
        type: str
        required: true
        choices: [broker, cm, sg, agent, halb, database]
      names:
        description: DNS names and IP addresses, told apart (added to O(certificates[].dns) and O(certificates[].ips)).
        type: list
        elements: str
        default: []
      dns:
        description: DNS names; the first is the common name.
        type: list
        elements: str
        default: []
      ips:
        description: IP addresses; the first is the common name when there is no DNS name.
        type: list
        elements: str
        default: []
      cert_path:
        description: The certificate's file on the node (default C(<directory>/<name>.pem)).
        type: path
      key_path:
        description: The key's file on the node (default C(<directory>/<name>.key)).
        type: path
  owner:
    description: Owner (name or numeric id) of keys and certificates on the node (the services' user).
    type: str
    default: "10001"
  group:
    description: Group (name or numeric id) of keys and certificates on the node.
    type: str
    default: "10001"
  cert_days:
    description: Validity in days of the certificates issued.
    type: int
    default: 825
  renew_days:
    description: Issue a certificate again when it expires within this many days.
    type: int
    default: 30
  ca_certificate:
    description:
      - Set by the action plugin (the content of C(<ca_dir>/ca.pem)); leave it unset.
    type: str
  issued:
    description:
      - Set by the action plugin (the certificates it signed, by entry name); leave it unset.
    type: dict
"""

EXAMPLES = r"""
- name: Issue the broker's certificate from the deployment CA
  gatehouse.access.node_certificates:
    ca_dir: "{{ lookup('ansible.builtin.env', 'HOME') }}/.gatehouse/secrets/ca"
    directory: /opt/gatehouse/pki
    certificates:
      - name: broker
        role: broker
        dns: [broker1.example.com]
        ips: [192.0.2.10]
"""

RETURN = r"""
issued:
  description: The entries whose certificate was issued (or, in check mode, would be).
  returned: always
  type: list
  elements: str
  sample: [broker]
fingerprints:
  description:
    - The SHA-256 of each certificate on the node after the task, by entry name (absent for one that check mode
      would issue). A service that reads the certificate can be restarted when it changes.
  returned: always
  type: dict
  sample: {broker: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}
keys_created:
  description: The entries whose private key was made on the node (or, in check mode, would be).
  returned: always
  type: list
  elements: str
  sample: [broker]
"""

import grp  # noqa: E402
import pwd  # noqa: E402

from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import read_bytes  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._common.files import (  # noqa: E402
    PlannedDir,
    PlannedFile,
)
from ansible_collections.gatehouse.access.plugins.module_utils._crypto import certificate as crypto  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._crypto.node_pki import (  # noqa: E402
    ARGUMENT_SPEC,
    KEY_BITS,
    entry_paths,
    request_for,
)

DIR_MODE = 0o755


def _id(value: str, lookup) -> int:
    return int(value) if value.isdigit() else lookup(value)


def _key(module: AnsibleModule, key_path: str, data: bytes):
    """The node's existing key at ``key_path``: an RSA key the services accept, or the module fails."""
    try:
        key, _fmt = crypto.load_private_key(data, key_path)
    except crypto.CertificateError as exc:
        module.fail_json(msg="%s; move it away to have a new key made" % exc)
    kind, bits = crypto.key_kind(key.public_key())
    if kind != "RSA" or bits < crypto.MIN_RSA_BITS:
        module.fail_json(
            msg="%s holds a %s %d-bit key; an RSA key of at least %d bits is needed (move it away to have "
            "a new one made)" % (key_path, kind, bits, crypto.MIN_RSA_BITS)
        )
    return key


def main() -> None:
    """The node's part. The action plugin has checked the entries and told their names apart. Without
    ``issued``: the directory, the CA copy and the keys, a request per entry and the current
    certificates. With ``issued``: the directory, the CA copy and those certificates, nothing else."""
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    if not crypto.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"), exception=crypto.CRYPTOGRAPHY_IMPORT_ERROR)
    params = module.params
    try:
        uid = _id(params["owner"], lambda name: pwd.getpwnam(name).pw_uid)
        gid = _id(params["group"], lambda name: grp.getgrnam(name).gr_gid)
    except KeyError as exc:
        module.fail_json(msg="unknown owner or group %s on the node" % exc)
    directory = params["directory"]
    planned: list[PlannedDir | PlannedFile] = [PlannedDir(directory, DIR_MODE)]
    if params["ca_certificate"] is not None:
        planned.append(
            PlannedFile(directory + "/ca.pem", params["ca_certificate"].encode("ascii"), crypto.PUBLIC_MODE)
        )
    requests: dict[str, str] = {}
    current: dict[str, str] = {}
    created: list[str] = []
    issued = params["issued"] or {}
    for entry in params["certificates"]:
        name = entry["name"]
        cert_path, key_path = entry_paths(directory, entry)
        if issued:
            if name in issued:
                planned.append(
                    PlannedFile(cert_path, issued[name].encode("ascii"), crypto.PUBLIC_MODE, uid, gid)
                )
            continue
        data = read_bytes(key_path)
        if data is None:
            created.append(name)
            if module.check_mode:
                continue  # no key, no request: the action reports the certificate as to be issued
            key = crypto.generate_key(KEY_BITS)
            data = crypto.private_key_pem(key)
        else:
            key = _key(module, key_path, data)
        planned.append(PlannedFile(key_path, data, crypto.KEY_MODE, uid, gid, hidden=True))
        requests[name] = request_for(entry, key).decode("ascii")
        existing = read_bytes(cert_path)
        if existing is not None:
            current[name] = existing.decode("ascii", "replace")
            planned.append(PlannedFile(cert_path, existing, crypto.PUBLIC_MODE, uid, gid))
    unknown = sorted(set(issued) - {entry["name"] for entry in params["certificates"]})
    if unknown:
        module.fail_json(msg="issued: %s is not one of the certificates" % ", ".join(unknown))
    changes = [item for item in planned if item.changed]
    if not module.check_mode:
        for item in changes:
            item.apply()
    module.exit_json(
        changed=bool(created or changes), requests=requests, current=current, keys_created=created, issued=[]
    )


if __name__ == "__main__":
    main()
