#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: certificate
short_description: Check and prepare TLS material for the connection manager and security gateway
version_added: 0.1.0
description:
  - Validates a certificate, its private key and its chain by the rules of the connection manager (CM) and
    security gateway (SG), or creates a private key with a certificate signing request, or a self-signed
    certificate for demonstrations and tests.
  - "Rules: only RSA keys are supported, at least 2048 bits; keys below 3072 bits are accepted with a warning
    (3072 bits recommended). DSA keys and any other non-RSA key types are refused. Certificates signed with
    MD5 are refused, and so are SHA-1 signatures because current TLS stacks reject them (the self-signature
    of a root certificate at the end of the chain is not checked, clients never verify it)."
  - Files must be base64 PEM. A DER file is refused, or converted to PEM in place with O(convert_der=true).
  - The private key must match the certificate. The chain (the certificates after the first one in
    O(certificate_path) followed by those in O(chain_path)) must be ordered leaf first, each certificate
    directly followed by its issuer; the root may be left out.
  - Expired and not yet valid certificates are refused; a warning is given when a certificate expires in less
    than O(expiry_warn_days) days. Wildcard certificates are supported and reported (RV(certificate.is_wildcard)).
  - O(state=check) never changes anything except the DER to PEM conversion asked for with O(convert_der).
  - The private key file is always written with mode V(0600), certificates and requests with V(0644).
  - An existing private key is never replaced silently. If it does not match O(key_size) or cannot be read,
    the module fails unless O(force=true).
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows summaries (subject, names, key size, fingerprints), never key material.
  platform:
    platforms: posix
requirements:
  - cryptography >= 42.0 on the managed host
options:
  state:
    description:
      - V(check) validates existing material at O(certificate_path), O(privatekey_path) and O(chain_path).
      - V(csr) ensures an RSA private key at O(privatekey_path) and a certificate signing request at
        O(csr_path) to submit to a certificate authority.
      - V(selfsigned) ensures an RSA private key at O(privatekey_path) and a self-signed certificate at
        O(certificate_path), for demonstrations and tests.
    type: str
    choices: [check, csr, selfsigned]
    default: check
  certificate_path:
    description:
      - The certificate (PEM, or DER with O(convert_der)). It may hold the chain after the leaf.
      - Required with O(state=check) and O(state=selfsigned).
    type: path
  privatekey_path:
    description:
      - The private key. With O(state=check) the key is optional; when given it must match the certificate.
      - Required with O(state=csr) and O(state=selfsigned).
    type: path
  chain_path:
    description:
      - A file with the intermediate (and optionally root) certificates, like the seed's C(CAcertificate.pem).
        A leading copy of the leaf certificate is ignored.
      - Only with O(state=check).
    type: path
  csr_path:
    description:
      - Where to write the certificate signing request (PEM). Required with O(state=csr).
    type: path
  convert_der:
    description:
      - With O(state=check), convert DER encoded files to PEM in place (atomically) instead of refusing them.
        Converted keys become PKCS#8 PEM with mode V(0600).
    type: bool
    default: false
  expiry_warn_days:
    description:
      - Warn when a certificate expires in fewer days than this.
      - With O(state=selfsigned) a certificate that expires within this many days is renewed.
    type: int
    default: 30
  common_name:
    description:
      - The subject common name, the fully qualified domain name of the server (or C(*.domain) for a wildcard
        certificate). Always added to the subject alternative names.
      - Required with O(state=csr) and O(state=selfsigned).
    type: str
  subject_alt_names:
    description:
      - Additional subject alternative names, C(DNS:name), C(IP:address) or a bare name or address (an IP
        address is recognised). DNS names are lower-cased, trailing dots removed.
    type: list
    elements: str
    default: []
  country_name:
    description: Two-letter ISO country code of the subject.
    type: str
  state_or_province_name:
    description: State or province of the subject.
    type: str
  locality_name:
    description: Locality (city) of the subject.
    type: str
  organization_name:
    description:
      - Organization of the subject. These characters are refused, as the product documentation requires -
        < > ~ ! @ # $ % ^ * / \ ( ) ? . , &
    type: str
  organizational_unit_name:
    description:
      - Organizational unit of the subject. The same characters as in O(organization_name) are refused.
    type: str
  key_size:
    description:
      - Size of a generated RSA key in bits; at least 2048, 3072 recommended.
      - An existing key of another size is not replaced unless O(force=true).
    type: int
    default: 3072
  digest:
    description: Hash of the request or self-signed certificate signature.
    type: str
    choices: [sha256, sha384, sha512]
    default: sha384
  valid_days:
    description:
      - Validity of a self-signed certificate in days; must be larger than O(expiry_warn_days).
      - Changing it does not by itself renew an existing certificate.
    type: int
    default: 365
  force:
    description:
      - Regenerate the private key and the request or certificate even when they are current.
    type: bool
    default: false
notes:
  - The rules follow the certificate requirements of the connection manager and security gateway; the services
    refuse RSA keys below 2048 bits at start, so checking here fails early with a clear message.
"""

EXAMPLES = r"""
- name: Check the certificate, key and chain an operator received from the CA
  gatehouse.access.certificate:
    state: check
    certificate_path: /root/certs/certificate.pem
    privatekey_path: /root/certs/private.key
    chain_path: /root/certs/CAcertificate.pem
  register: tls

- name: Show the expiry date and whether it is a wildcard certificate
  ansible.builtin.debug:
    msg: "{{ tls.certificate.not_after }} wildcard={{ tls.certificate.is_wildcard }}"

- name: Convert a DER certificate from the CA to PEM in place
  gatehouse.access.certificate:
    state: check
    certificate_path: /root/certs/certificate.crt
    convert_der: true

- name: Create a 3072-bit RSA key and a SHA-384 signing request to send to the CA
  gatehouse.access.certificate:
    state: csr
    privatekey_path: /root/certs/private.key
    csr_path: /root/certs/server.csr
    common_name: cmsg.example.com
    subject_alt_names:
      - DNS:cmsg1.example.com
    country_name: CA
    state_or_province_name: British Columbia
    locality_name: Burnaby
    organization_name: Example Corporation
    organizational_unit_name: Global Support Services

- name: Create a self-signed certificate for a demonstration host
  gatehouse.access.certificate:
    state: selfsigned
    privatekey_path: /opt/gatehouse/cmsg/certs/key.pem
    certificate_path: /opt/gatehouse/cmsg/certs/cert.pem
    common_name: cmsg.demo.example
    subject_alt_names:
      - IP:192.0.2.10
      - IP:2001:db8::10
    valid_days: 90
"""

RETURN = r"""
certificate:
  description: Facts about the (leaf) certificate.
  returned: when O(state=check) or O(state=selfsigned)
  type: dict
  contains:
    path:
      description: Path of the certificate (with O(state=selfsigned)).
      type: str
      returned: when O(state=selfsigned)
    subject:
      description: Subject in RFC 4514 form.
      type: str
      sample: CN=cmsg.example.com,O=Example
    common_name:
      description: Subject common name.
      type: str
      sample: cmsg.example.com
    issuer:
      description: Issuer in RFC 4514 form.
      type: str
    subject_alt_names:
      description: Subject alternative names, C(DNS:...) and C(IP:...).
      type: list
      elements: str
      sample: [DNS:cmsg.example.com, IP:192.0.2.10]
    serial_number:
      description: Serial number in hexadecimal.
      type: str
    not_before:
      description: Start of validity, UTC, ISO 8601.
      type: str
    not_after:
      description: End of validity, UTC, ISO 8601.
      type: str
      sample: "2027-01-31T12:00:00Z"
    days_remaining:
      description: Whole days until O(certificate_path) expires (negative when expired).
      type: int
    signature_algorithm:
      description: Signature algorithm name.
      type: str
      sample: sha384WithRSAEncryption
    signature_hash:
      description: Hash of the signature.
      type: str
      sample: sha384
    key_type:
      description: Type of the public key (RSA, DSA, EC (curve), ...).
      type: str
      sample: RSA
    key_size:
      description: Size of the public key in bits.
      type: int
      sample: 3072
    is_wildcard:
      description: Whether the certificate covers a wildcard name.
      type: bool
    wildcard_names:
      description: The wildcard names (C(*.example.com)).
      type: list
      elements: str
    self_signed:
      description: Whether the certificate is signed by its own key.
      type: bool
    fingerprint_sha256:
      description: SHA-256 fingerprint of the certificate, like C(openssl x509 -fingerprint -sha256).
      type: str
    public_key_fingerprint_sha256:
      description: SHA-256 of the DER SubjectPublicKeyInfo.
      type: str
    format:
      description: Format the file had (V(pem) or V(der)).
      type: str
chain:
  description: Facts about each chain certificate in order (same keys as RV(certificate)).
  returned: when O(state=check) or O(state=selfsigned)
  type: list
  elements: dict
privatekey:
  description: Facts about the private key; never the key itself.
  returned: when a private key is checked or generated
  type: dict
  contains:
    path:
      description: Path of the key.
      type: str
    key_type:
      description: Key type.
      type: str
    key_size:
      description: Key size in bits.
      type: int
    public_key_fingerprint_sha256:
      description: SHA-256 of the DER SubjectPublicKeyInfo; equal to the certificate's when they match.
      type: str
    mode:
      description: File mode (octal string).
      type: str
      sample: "0600"
    format:
      description: Format of the key file.
      type: str
csr:
  description: Facts about the certificate signing request.
  returned: when O(state=csr)
  type: dict
  contains:
    path:
      description: Path of the request.
      type: str
    subject:
      description: Subject in RFC 4514 form.
      type: str
    common_name:
      description: Subject common name.
      type: str
    subject_alt_names:
      description: Requested subject alternative names.
      type: list
      elements: str
    signature_algorithm:
      description: Signature algorithm.
      type: str
      sample: sha384WithRSAEncryption
    signature_hash:
      description: Hash of the signature.
      type: str
    key_type:
      description: Key type.
      type: str
    key_size:
      description: Key size in bits.
      type: int
    public_key_fingerprint_sha256:
      description: SHA-256 of the DER SubjectPublicKeyInfo.
      type: str
privatekey_generated:
  description: Whether a new private key was (or, in check mode, would be) generated.
  returned: when O(state=csr) or O(state=selfsigned)
  type: bool
converted:
  description: Files converted (or, in check mode, to be converted) from DER to PEM.
  returned: when O(state=check) succeeds
  type: list
  elements: str
errors:
  description: Every rule violation found, when the module fails.
  returned: failure
  type: list
  elements: str
  sample:
    - certificate /root/certs/certificate.pem has a 1024-bit RSA key, at least 2048 bits are required (3072 recommended)
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import fail, finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._crypto import certificate as certificate_utils  # noqa: E402

# Options that only make sense for some states; anything else is refused so mistakes are visible.
_SUBJECT_OPTIONS = {
    "privatekey_path",
    "common_name",
    "subject_alt_names",
    "country_name",
    "state_or_province_name",
    "locality_name",
    "organization_name",
    "organizational_unit_name",
    "key_size",
    "digest",
    "force",
}
STATE_OPTIONS = {
    "check": {"certificate_path", "privatekey_path", "chain_path", "convert_der", "expiry_warn_days"},
    "csr": _SUBJECT_OPTIONS | {"csr_path"},
    "selfsigned": _SUBJECT_OPTIONS | {"certificate_path", "valid_days", "expiry_warn_days"},
}
DEFAULTS = {
    "convert_der": False,
    "expiry_warn_days": 30,
    "subject_alt_names": [],
    "key_size": 3072,
    "digest": "sha384",
    "valid_days": 365,
    "force": False,
}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["check", "csr", "selfsigned"], "default": "check"},
            "certificate_path": {"type": "path"},
            "privatekey_path": {"type": "path"},
            "chain_path": {"type": "path"},
            "csr_path": {"type": "path"},
            "convert_der": {"type": "bool", "default": False},
            "expiry_warn_days": {"type": "int", "default": 30},
            "common_name": {"type": "str"},
            "subject_alt_names": {"type": "list", "elements": "str", "default": []},
            "country_name": {"type": "str"},
            "state_or_province_name": {"type": "str"},
            "locality_name": {"type": "str"},
            "organization_name": {"type": "str"},
            "organizational_unit_name": {"type": "str"},
            "key_size": {"type": "int", "default": 3072},
            "digest": {"type": "str", "choices": ["sha256", "sha384", "sha512"], "default": "sha384"},
            "valid_days": {"type": "int", "default": 365},
            "force": {"type": "bool", "default": False},
        },
        required_if=[
            ("state", "check", ["certificate_path"]),
            ("state", "csr", ["privatekey_path", "csr_path", "common_name"]),
            ("state", "selfsigned", ["privatekey_path", "certificate_path", "common_name"]),
        ],
        supports_check_mode=True,
    )
    if not certificate_utils.HAS_CRYPTOGRAPHY:
        fail(
            module,
            missing_required_lib("cryptography >= 42.0"),
            exception=certificate_utils.CRYPTOGRAPHY_IMPORT_ERROR,
        )
    if certificate_utils.cryptography_too_old():
        fail(module, missing_required_lib("cryptography >= 42.0 (a newer version)"))

    state = module.params["state"]
    stray = sorted(
        name
        for name, value in module.params.items()
        if name != "state"
        and name not in STATE_OPTIONS[state]
        and value is not None
        and value != DEFAULTS.get(name, None)
    )
    if stray:
        fail(module, "option(s) %s cannot be used with state=%s" % (", ".join(stray), state))
    if module.params["expiry_warn_days"] < 0:
        fail(module, "expiry_warn_days must not be negative")
    if module.params["valid_days"] < 1:
        fail(module, "valid_days must be at least 1")

    finish(module, certificate_utils.run(module.params, module.check_mode))


if __name__ == "__main__":
    main()
