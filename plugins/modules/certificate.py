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

import datetime  # noqa: E402
import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import (  # noqa: E402
    file_mode,
    read_bytes,
    write_atomic,
)
from ansible_collections.gatehouse.access.plugins.module_utils._common.result import fail, finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._crypto import certificate as certs  # noqa: E402

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


def run(params: dict, check_mode: bool, now: datetime.datetime | None = None) -> dict:
    """The module's work on validated ``params``: the result, with ``failed`` set on refusal.

    ``warnings_list`` and ``diff`` are in the result for main() to pass on; nothing is written in
    check mode. ``now`` is for tests (renewal, expiry).
    """
    now = now or certs.utcnow()
    try:
        if params["state"] == "check":
            return _check(params, check_mode, now)
        return _generate(params, check_mode, now)
    except certs.CertificateError as exc:
        return {"failed": True, "msg": str(exc), "errors": [str(exc)], "changed": False}


def _check(params: dict, check_mode: bool, now: datetime.datetime) -> dict:
    material = certs.inspect_material(
        params["certificate_path"],
        params.get("privatekey_path"),
        params.get("chain_path"),
        convert_der=params["convert_der"],
        expiry_warn_days=params["expiry_warn_days"],
        now=now,
    )
    result = material.facts(now, params.get("privatekey_path"))
    result["warnings_list"] = material.findings.warnings
    if material.findings.errors:
        result["errors"] = material.findings.errors
        result["failed"] = True
        result["msg"] = "TLS material is not acceptable: " + "; ".join(material.findings.errors)
        return result
    converted = [conversion[0] for conversion in material.conversions]
    result["converted"] = converted
    result["changed"] = bool(converted)
    result["diff"] = {
        "before": {path: "DER" for path in converted},
        "after": {path: "PEM" for path in converted},
    }
    if not check_mode:
        for path, pem, mode in material.conversions:
            write_atomic(path, pem, mode)
    return result


def _generate(params: dict, check_mode: bool, now: datetime.datetime) -> dict:
    """state=csr or selfsigned: the key is kept while it fits, the request or certificate while it
    is current (same key, subject, names and digest; a certificate also valid beyond
    expiry_warn_days), and modes are repaired in place."""
    state = params["state"]
    bits = params["key_size"]
    certs.validate_key_size(bits)
    digest = params["digest"]
    certs.validate_digest(digest)
    name = certs.build_name(params)
    sans = certs.parse_subject_alt_names(
        params.get("subject_alt_names") or [], params["common_name"].rstrip(".")
    )
    key_path = params["privatekey_path"]
    out_path = params["csr_path"] if state == "csr" else params["certificate_path"]
    _require_dir(key_path, "privatekey_path")
    _require_dir(out_path, "csr_path" if state == "csr" else "certificate_path")
    if state == "selfsigned" and params["valid_days"] <= params["expiry_warn_days"]:
        raise certs.CertificateError(
            "valid_days (%d) must be larger than expiry_warn_days (%d), or the certificate would be renewed "
            "on every run" % (params["valid_days"], params["expiry_warn_days"])
        )

    key_mode_before = file_mode(key_path)
    key = _existing_key(key_path, params["force"], bits)
    if key is not None:
        key_before = _key_summary(key_path, key, key_mode_before)
    else:
        key_before = {"path": key_path, "exists": read_bytes(key_path) is not None}
    new_key = key is None
    if new_key:
        key = certs.generate_key(bits)

    load = certs.load_pem_csr if state == "csr" else certs.load_pem_certificate
    out_data = read_bytes(out_path)
    existing = load(out_data)
    out_before = _file_summary(out_path, existing, exists=out_data is not None)
    if state == "csr":
        current = not new_key and certs.csr_is_current(existing, key, name, sans, digest)
    else:
        current = not new_key and certs.selfsigned_is_current(
            existing, key, name, sans, digest, params["expiry_warn_days"], now
        )
    out_mode_before = file_mode(out_path)
    if current:
        out_obj = existing
        new_out = None
    else:
        if state == "csr":
            out_obj = certs.build_csr(key, name, sans, digest)
        else:
            out_obj = certs.build_selfsigned(key, name, sans, digest, params["valid_days"], now)
        new_out = certs.to_pem(out_obj)

    fix_key_mode = not new_key and key_mode_before != certs.KEY_MODE
    fix_out_mode = new_out is None and out_mode_before != certs.PUBLIC_MODE
    changed = new_key or new_out is not None or fix_key_mode or fix_out_mode

    if changed and not check_mode:
        if new_key:
            write_atomic(key_path, certs.private_key_pem(key), certs.KEY_MODE)
        elif fix_key_mode:
            os.chmod(key_path, certs.KEY_MODE)
        if new_out is not None:
            write_atomic(out_path, new_out, certs.PUBLIC_MODE)
        elif fix_out_mode:
            os.chmod(out_path, certs.PUBLIC_MODE)

    out_label = "csr" if state == "csr" else "certificate"
    result: dict = {
        "changed": changed,
        "privatekey_generated": new_key,
        "diff": {
            "before": {"privatekey": key_before, out_label: out_before},
            "after": {
                "privatekey": _key_summary(key_path, key, certs.KEY_MODE),
                out_label: _file_summary(out_path, out_obj),
            },
        },
        # Facts describe the state after the run (predicted in check mode).
        "privatekey": dict(
            certs.private_key_facts(key, None), path=key_path, mode=certs.mode_text(certs.KEY_MODE)
        ),
    }
    if state == "csr":
        result["csr"] = dict(certs.csr_facts(out_obj), path=out_path)
        result["warnings_list"] = []
        if bits < certs.RECOMMENDED_RSA_BITS:
            result["warnings_list"].append(
                "key_size %d meets the %d-bit minimum but %d bits or more are recommended"
                % (bits, certs.MIN_RSA_BITS, certs.RECOMMENDED_RSA_BITS)
            )
        return result
    findings = certs.Findings()
    certs.check_key_rules(out_obj.public_key(), "certificate %s" % out_path, findings)
    certs.check_validity(out_obj, "certificate %s" % out_path, findings, params["expiry_warn_days"], now)
    result["certificate"] = dict(certs.certificate_facts(out_obj, "pem", now), path=out_path)
    result["chain"] = []
    result["warnings_list"] = findings.warnings
    return result


def _existing_key(path: str, force: bool, bits: int):
    """The key to reuse, or None to generate one; a key that does not fit is never replaced without force."""
    data = read_bytes(path)
    if data is None or force:
        return None
    try:
        key, fmt = certs.load_private_key(data, "private key %s" % path)
    except certs.CertificateError as exc:
        raise certs.CertificateError(
            "%s; refusing to replace it, set force: true to regenerate" % exc
        ) from None
    kind, size = certs.key_kind(key.public_key())
    if kind != "RSA" or size != bits or fmt != "pem":
        raise certs.CertificateError(
            "private key %s exists as a %d-bit %s %s key but a %d-bit RSA PEM key is wanted; refusing to "
            "replace a private key, set force: true to regenerate it" % (path, size, kind, fmt.upper(), bits)
        )
    return key


def _require_dir(path: str, option: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise certs.CertificateError("directory %s of %s does not exist" % (directory, option))


# Diff summaries: what an operator needs to see change (names, sizes, fingerprints), never key material.


def _key_summary(path: str, key, mode: int | None) -> dict:
    facts = certs.private_key_facts(key)
    return {
        "path": path,
        "exists": True,
        "key_type": facts["key_type"],
        "key_size": facts["key_size"],
        "public_key_fingerprint_sha256": facts["public_key_fingerprint_sha256"],
        "mode": certs.mode_text(mode),
    }


def _file_summary(path: str, obj, exists: bool = True) -> dict:
    """``obj`` is the request or certificate read from ``path``, None when it is unreadable."""
    if not exists:
        return {"path": path, "exists": False}
    if obj is None:
        return {"path": path, "exists": True, "readable": False}
    return dict({"path": path, "exists": True}, **certs.summary(obj))


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
    if not certs.HAS_CRYPTOGRAPHY:
        fail(
            module,
            missing_required_lib("cryptography >= 42.0"),
            exception=certs.CRYPTOGRAPHY_IMPORT_ERROR,
        )
    if certs.cryptography_too_old():
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

    finish(module, run(module.params, module.check_mode))


if __name__ == "__main__":
    main()
