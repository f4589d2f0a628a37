#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: support_bundle
short_description: Create a support bundle of a Gatehouse host with every secret redacted
version_added: 0.1.0
description:
  - The equivalent of C(pcoip-cmsg-setup diagnose --support-bundle) - an archive of logs and diagnostic data
    to hand to whoever troubleshoots the installation.
  - "Collects: the configuration below O(data_dir) (C(docker-compose.yaml), C(data/config.properties),
    C(data/SecurityGateway.conf), C(data/cmsg.env) and any other text file there) and below O(extra_paths)
    (broker, agent or HALB configuration directories); the state (C(docker inspect)) and the last
    O(log_lines) log lines (at most O(max_log_bytes)) of every container carrying the label
    O(container_label); the versions of the Gatehouse images (their labels), the Docker engine, Python and the
    operating system."
  - Writes them as a gzip-compressed tar archive at O(dest), with a C(manifest.json) that lists what was
    collected, what was skipped and why, and the redaction rule.
  - "Redaction rule, applied to every file, log and container description before it enters the archive:
    (1) PEM private key blocks are replaced as a whole and private key files are never copied, certificate and
    key files are only listed in C(certificates.json) with subject, expiry and fingerprints;
    (2) values of keys whose name (lower-cased, punctuation removed) contains secret, password, passwd,
    passphrase, token, credential, grant, cookie, jsessionid, apikey, privatekey, connecttag, sessiontag or
    authorization are replaced - this covers C(GrantSecret), C(AdminToken), C(AgentToken), passwords,
    C(JSESSIONID) cookie values, connect-tags and grants - in C(key=value), C(key: value), JSON,
    environment (C(KEY=value)) and XML (C(<key>value</key>)) forms;
    (3) values of other keys whose name contains C(key) (C(LicenseKey)) are replaced unless the value is an
    absolute path to a certificate or key file, so C(SslKey=/certs/key.pem) stays readable;
    (4) C(Authorization), C(Cookie) and similar header values, C(Bearer)/C(Basic) credentials, the argument
    of C(CONNECT) lines and passwords in URLs are replaced;
    (5) every secret value found this way (8 characters or more) is also replaced wherever else it appears.
    Before the archive is written it is checked for every secret value seen; if one remains the module fails
    and writes nothing."
  - Binary files (databases such as the broker's SQLite file, archives) are not copied; they are listed as
    skipped.
  - A bundle is a snapshot, not a state. As with the file-generating modules of community.crypto, an existing
    O(dest) is left alone (no change) unless O(force=true); use a dated file name to create a new bundle each
    time (see the examples). Changed is V(true) whenever an archive is written.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - Collects and redacts everything in memory and reports what the bundle would contain; writes nothing.
  diff_mode:
    support: full
    details:
      - The diff shows whether O(dest) existed and the members of the new archive.
  platform:
    platforms: posix
requirements:
  - Docker SDK for Python (C(docker)) >= 6.0 on the managed host, to collect containers and logs; without it
    the bundle holds files and versions only and the manifest says so.
  - cryptography on the managed host to describe certificates (subjects, fingerprints); without it they are
    listed by name, size and mode.
options:
  dest:
    description:
      - Path of the archive to write (C(.tar.gz)). Its directory must exist. The archive contains one top
        directory named after the file.
    type: path
    required: true
  force:
    description:
      - Replace O(dest) when it exists. Without it an existing O(dest) is left alone and nothing is collected.
    type: bool
    default: false
  mode:
    description:
      - Permissions of the archive. It holds host names, addresses and logs even after redaction, so it is
        readable by the owner only by default.
    type: str
    default: "0600"
  data_dir:
    description:
      - The connection manager / security gateway data directory (the seed's C(/opt/teradici/pcoipcm_data)).
        Missing is not an error (the host may run only a broker); the manifest notes it.
    type: path
    default: /opt/gatehouse/cmsg
  extra_paths:
    description:
      - More files or directories to collect by the same rules, for example the broker's, the agent's or the
        HALB's configuration directories.
    type: list
    elements: path
    default: []
  collect_containers:
    description: Collect the state of the labelled containers (and their logs, see O(collect_logs)).
    type: bool
    default: true
  collect_logs:
    description: Collect container logs.
    type: bool
    default: true
  container_label:
    description: Containers carrying this label are collected.
    type: str
    default: gatehouse.role
  log_lines:
    description: Number of log lines taken from the end of each container's log.
    type: int
    default: 10000
  max_log_bytes:
    description: At most this many bytes of each container's log (the end of it) are kept.
    type: int
    default: 5242880
  max_file_bytes:
    description: Files larger than this are not copied (listed as skipped).
    type: int
    default: 1048576
  max_files:
    description: At most this many files are examined below O(data_dir) and O(extra_paths) together.
    type: int
    default: 1000
  extra_secret_keys:
    description:
      - More key-name fragments whose values are redacted (matched like the built-in ones, case and punctuation
        ignored), for site-specific settings.
    type: list
    elements: str
    default: []
  extra_secrets:
    description:
      - Literal values that must not appear in the bundle (for example a password that a broken service logged
        without a key name). They are replaced wherever they appear.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Create a dated support bundle on the CM/SG host
  gatehouse.access.support_bundle:
    dest: "/var/tmp/gatehouse-support-{{ inventory_hostname }}-{{ ansible_facts['date_time']['iso8601_basic_short'] }}.tar.gz"
  register: bundle

- name: Fetch it to the controller
  ansible.builtin.fetch:
    src: "{{ bundle.dest }}"
    dest: support/
    flat: false

- name: Bundle a broker host with its configuration directory, replacing an older bundle
  gatehouse.access.support_bundle:
    dest: /var/tmp/gatehouse-support.tar.gz
    data_dir: /opt/gatehouse/cmsg
    extra_paths:
      - /opt/gatehouse/broker
    force: true

- name: Show what a bundle would contain, without writing it
  gatehouse.access.support_bundle:
    dest: /var/tmp/gatehouse-support-preview.tar.gz
  check_mode: true
"""

RETURN = r"""
dest:
  description: Path of the archive.
  returned: always
  type: str
size:
  description: Size of the archive written, in bytes.
  returned: when an archive was written
  type: int
members:
  description: Paths inside the archive.
  returned: when an archive was (or, in check mode, would be) written
  type: list
  elements: str
  sample: [gatehouse-support/manifest.json, gatehouse-support/files/opt/gatehouse/cmsg/data/config.properties]
collected_files:
  description: Files copied (redacted) into the archive.
  returned: when an archive was (or would be) written
  type: list
  elements: str
skipped:
  description: Files not copied, each with C(path) and C(reason).
  returned: when an archive was (or would be) written
  type: list
  elements: dict
certificates:
  description:
    - Certificate and key files found, with C(path), C(kind), C(mode), C(size) and for certificates their
      subjects, expiry and fingerprints; keys only with type, size and public key fingerprint.
  returned: when an archive was (or would be) written
  type: list
  elements: dict
containers:
  description: The labelled containers collected, with name, id, image, role, status, health and restart count.
  returned: when an archive was (or would be) written
  type: list
  elements: dict
redactions:
  description: Number of values redacted.
  returned: when an archive was (or would be) written
  type: int
notes:
  description: What could not be collected and why (missing data directory, Docker not reachable, ...).
  returned: when an archive was (or would be) written
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import DOCKER_HOST_OPTION  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._ops import support_bundle as bundle_utils  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "dest": {"type": "path", "required": True},
            "force": {"type": "bool", "default": False},
            "mode": {"type": "str", "default": "0600"},
            "data_dir": {"type": "path", "default": bundle_utils.DEFAULT_DATA_DIR},
            "extra_paths": {"type": "list", "elements": "path", "default": []},
            "collect_containers": {"type": "bool", "default": True},
            "collect_logs": {"type": "bool", "default": True},
            "container_label": {"type": "str", "default": "gatehouse.role"},
            "log_lines": {"type": "int", "default": 10000},
            "max_log_bytes": {"type": "int", "default": 5 * 1024 * 1024},
            "max_file_bytes": {"type": "int", "default": 1024 * 1024},
            "max_files": {"type": "int", "default": 1000},
            "docker_host": DOCKER_HOST_OPTION,
            "extra_secret_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
            "extra_secrets": {"type": "list", "elements": "str", "default": [], "no_log": True},
        },
        supports_check_mode=True,
    )
    result = bundle_utils.run(module.params, module.check_mode)
    # The notes are returned and warned about.
    finish(module, dict(result, warnings_list=result.get("notes", [])))


if __name__ == "__main__":
    main()
