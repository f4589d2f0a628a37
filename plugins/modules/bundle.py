#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: bundle
short_description: Verify a Gatehouse dark-site bundle and load its images
version_added: 0.1.0
description:
  - Loads the container images of a dark-site bundle (C(make bundle) writes
    C(dist/gatehouse-bundle-<version>.tar.gz)) into the Docker engine of the target, for hosts that cannot reach
    any image registry - the counterpart of C(pcoip-cmsg-setup install --darksite-bundle-path).
  - The bundle holds C(images.tar) (C(docker save) of the service images), the collection tarball, the tarballs
    of the collections it depends on, C(manifest.json) (version, images with their ids and tags, files with their checksums) and C(SHA256SUMS).
  - "Checksums are verified first: an archive is unpacked into a private temporary directory while every member
    is hashed, the hashes are compared with C(SHA256SUMS), the manifest with C(SHA256SUMS), and the images the
    manifest lists with the C(docker save) manifest inside C(images.tar). A truncated, corrupt or modified
    bundle, or one with unexpected members (links, nested paths, unlisted files), is refused with a message that
    names the file at fault, and nothing is loaded."
  - Images whose tags already point at the manifest's image ids are left alone; when every image is present the
    module reports no change.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - Verifies the bundle and reports which images would be loaded; loads nothing.
  diff_mode:
    support: full
    details:
      - The diff shows the image id of every tag of the bundle before and after (V(null) when absent).
  platform:
    platforms: posix
requirements:
  - Docker SDK for Python (C(docker)) >= 6.0 on the target, for O(state=present).
options:
  path:
    description:
      - The bundle on the target - the C(.tar.gz) archive, or the directory it unpacks to
        (C(gatehouse-bundle-<version>/)).
    type: path
    required: true
  state:
    description:
      - V(present) verifies the bundle and loads the images that are not present with the manifest's ids.
      - V(verified) only verifies the bundle (checksums, manifest, the image list of C(images.tar)); it needs
        neither Docker nor the Docker SDK and never changes anything.
    type: str
    choices: [present, verified]
    default: present
  tmp_dir:
    description:
      - Directory in which an archive is unpacked for verification. It needs room for the unpacked bundle
        (about the size of C(images.tar)). The unpacked copy is removed at the end.
      - Default is the system's temporary directory.
    type: path
  timeout:
    description: Timeout in seconds of calls to the Docker engine; loading the images is one call.
    type: int
    default: 600
notes:
  - The collection tarballs in the bundle are verified but not installed; install them on the controller with
    C(ansible-galaxy collection install --offline *.tar.gz) in the unpacked bundle.
seealso:
  - module: gatehouse.access.cmsg
"""

EXAMPLES = r"""
- name: Copy the bundle to the dark-site host
  ansible.builtin.copy:
    src: dist/gatehouse-bundle-0.1.0.tar.gz
    dest: /var/tmp/gatehouse-bundle-0.1.0.tar.gz
    mode: "0600"

- name: Load the Gatehouse images from the bundle
  gatehouse.access.bundle:
    path: /var/tmp/gatehouse-bundle-0.1.0.tar.gz
  register: bundle

- name: Show what was loaded
  ansible.builtin.debug:
    msg: "{{ bundle.images | selectattr('loaded') | map(attribute='name') | list }}"

- name: Only check a bundle that was unpacked by hand (tar xzf), on a host without Docker
  gatehouse.access.bundle:
    path: /var/tmp/gatehouse-bundle-0.1.0
    state: verified
"""

RETURN = r"""
path:
  description: The bundle, as given.
  returned: when the bundle was verified
  type: str
  sample: /var/tmp/gatehouse-bundle-0.1.0.tar.gz
version:
  description: Gatehouse version of the bundle (from its manifest).
  returned: when the bundle was verified
  type: str
  sample: 0.1.0
images:
  description: The images of the bundle.
  returned: when the bundle was verified
  type: list
  elements: dict
  contains:
    name:
      description: Short name of the image (broker, cm, sg, agent, halb).
      type: str
      sample: cm
    id:
      description: Image id from the manifest.
      type: str
      sample: sha256:5da5371af791c2a6d0e0c1d3d0f0b8c9e5a6c4c1a7e6f1b2c3d4e5f60718293a
    tags:
      description: Tags of the image.
      type: list
      elements: str
      sample: [gatehouse/cm:0.1.0]
    present_before:
      description: Whether every tag already pointed at this id. Not returned for O(state=verified).
      type: bool
      returned: O(state=present)
    loaded:
      description: Whether the image was loaded (in check mode - would be loaded). Not returned for O(state=verified).
      type: bool
      returned: O(state=present)
files:
  description: The verified members of the bundle, except C(SHA256SUMS) itself.
  returned: when the bundle was verified
  type: list
  elements: dict
  contains:
    name:
      description: Member name.
      type: str
      sample: images.tar
    sha256:
      description: SHA-256 of the member.
      type: str
    size:
      description: Size in bytes.
      type: int
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import fail, finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import bundle as _bundle  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (  # noqa: E402
    DOCKER_HOST_OPTION,
    DOCKER_IMPORT_ERROR,
    HAS_DOCKER,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["present", "verified"], "default": "present"},
            "tmp_dir": {"type": "path"},
            "docker_host": DOCKER_HOST_OPTION,
            "timeout": {"type": "int", "default": 600},
        },
        supports_check_mode=True,
    )
    if module.params["timeout"] < 1:
        fail(module, "timeout must be at least 1 second")
    if module.params["state"] == "present" and not HAS_DOCKER:
        fail(module, missing_required_lib("docker"), exception=DOCKER_IMPORT_ERROR)
    finish(module, _bundle.run(module.params, module.check_mode, module._diff))


if __name__ == "__main__":
    main()
