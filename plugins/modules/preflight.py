#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: preflight
short_description: Check the system requirements of a connection manager and security gateway host
version_added: 0.1.0
description:
  - Measures the host and checks the minimum system requirements of the connection manager (CM) and security
    gateway (SG), like the installer does before it installs anything.
  - "Requirements: 2 or more CPUs, 4 GB of RAM, 4 GB of swap space, 10 GB of free disk space (unless
    O(ignore_disk_req=true)), Docker engine 20.10.0 or higher, and neither podman nor buildah installed (they
    conflict with Docker). The documentation also asks for 2.5 GHz CPUs; the clock is reported and a warning
    given below it, but it is not a failed check because virtual machines often report a lower current clock."
  - Every check runs; when any fails the module fails with all of them in RV(failed_checks) and all measured
    values in RV(facts).
  - It never changes anything; C(changed) is always V(false).
  - "Units: MB are MiB (1024 x 1024 bytes), GB are GiB. Memory and swap get a tolerance
    (O(memory_tolerance_percent), 10% by default) because the kernel reports less than the nominal size: a
    machine with 4 GB of RAM shows about 3.7 to 3.9 GB in C(MemTotal) after firmware and kernel reservations,
    and a 4 GB swap area shows 4 KB less. With the defaults, 3686 MB of RAM (and of swap) pass."
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
  diff_mode:
    support: none
    details:
      - This action does not modify state.
  platform:
    platforms: posix
requirements:
  - Linux (C(/proc/meminfo))
  - the C(docker) command on the managed host for the Docker check
options:
  min_cpus:
    description: Minimum number of usable CPUs. Change it only for tests or lab hosts.
    type: int
    default: 2
  min_cpu_mhz:
    description: CPU clock below which a warning is given (never a failure); V(0) disables the warning.
    type: int
    default: 2500
  min_memory_mb:
    description: Minimum RAM in MB (MiB), before the tolerance. Change it only for tests or lab hosts.
    type: int
    default: 4096
  min_swap_mb:
    description:
      - Minimum swap space in MB (MiB), before the tolerance. V(0) disables the check (for example on hosts that
        deliberately run without swap, against the documented minimum). Change it only for tests or lab hosts.
    type: int
    default: 4096
  memory_tolerance_percent:
    description:
      - How much less than O(min_memory_mb) and O(min_swap_mb) is accepted, in percent (0 to 49).
    type: int
    default: 10
  min_disk_gb:
    description: Minimum free disk space in GB (GiB) at O(disk_path). Change it only for tests or lab hosts.
    type: float
    default: 10
  disk_path:
    description:
      - Where the free space is measured. When the path does not exist yet, its nearest existing parent is
        measured (reported as RV(facts.disk_path_checked)).
    type: path
    default: /opt
  ignore_disk_req:
    description:
      - Do not fail on the disk space requirement (the installer's C(--ignore-disk-req)); a warning is given.
    type: bool
    default: false
  check_docker:
    description: Check the Docker engine version. Disable on hosts where Docker is installed later.
    type: bool
    default: true
  min_docker_version:
    description: Minimum Docker engine (server) version.
    type: str
    default: 20.10.0
  conflicting_commands:
    description: Commands whose presence is a conflict with Docker.
    type: list
    elements: str
    default: [podman, buildah]
"""

EXAMPLES = r"""
- name: Check the documented system requirements
  gatehouse.access.preflight:

- name: Check a lab host without swap and with a small disk, keep the result
  gatehouse.access.preflight:
    min_swap_mb: 0
    ignore_disk_req: true
  register: preflight

- name: Show what was measured
  ansible.builtin.debug:
    msg: "{{ preflight.facts.memory_mb }} MB RAM, Docker {{ preflight.facts.docker.server_version }}"

- name: Collect the results of several hosts without stopping the play
  gatehouse.access.preflight:
    disk_path: /opt/gatehouse
  register: preflight_report
  failed_when: false

- name: List what is missing
  ansible.builtin.debug:
    msg: "{{ preflight_report.failed_checks | map(attribute='msg') | list }}"
"""

RETURN = r"""
failed_checks:
  description: The checks that failed, each with its name and a message; empty when all pass.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "swap", "msg": "swap is 0 MB, at least 4096 MB required (3686 MB accepted: 10% tolerance ...)"}]
checks:
  description:
    - Every check with C(name) (cpus, memory, swap, disk, docker, conflicting_packages), C(passed), C(measured),
      C(required) and C(msg). Disabled checks are absent.
  returned: always
  type: list
  elements: dict
facts:
  description: Everything measured.
  returned: always
  type: dict
  contains:
    cpus:
      description: Online CPUs.
      type: int
    usable_cpus:
      description: CPUs this process may run on (the affinity mask); used for the check.
      type: int
    cpu_mhz:
      description: Highest current clock in C(/proc/cpuinfo), or null.
      type: float
    memory_mb:
      description: C(MemTotal) in MiB.
      type: int
    swap_mb:
      description: C(SwapTotal) in MiB.
      type: int
    disk_path:
      description: O(disk_path).
      type: str
    disk_path_checked:
      description: The existing directory that was measured.
      type: str
    disk_free_gb:
      description: Free space for unprivileged users in GiB.
      type: float
    disk_total_gb:
      description: Size of the file system in GiB.
      type: float
    os:
      description: C(name), C(id), C(version_id), C(pretty_name) from C(/etc/os-release), C(kernel), C(architecture).
      type: dict
    docker:
      description: C(cli) path, C(client_version), C(server_version), C(error) (why the engine was not reachable).
      type: dict
    conflicting_commands:
      description: Conflicting commands found, name to path.
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import DOCKER_HOST_OPTION  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._ops import preflight as preflight_utils  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "min_cpus": {"type": "int", "default": 2},
            "min_cpu_mhz": {"type": "int", "default": 2500},
            "min_memory_mb": {"type": "int", "default": 4096},
            "min_swap_mb": {"type": "int", "default": 4096},
            "memory_tolerance_percent": {"type": "int", "default": 10},
            "min_disk_gb": {"type": "float", "default": 10},
            "disk_path": {"type": "path", "default": "/opt"},
            "ignore_disk_req": {"type": "bool", "default": False},
            "check_docker": {"type": "bool", "default": True},
            "min_docker_version": {"type": "str", "default": preflight_utils.DEFAULT_MIN_DOCKER},
            "docker_host": DOCKER_HOST_OPTION,
            "conflicting_commands": {"type": "list", "elements": "str", "default": ["podman", "buildah"]},
        },
        supports_check_mode=True,
    )

    def run_command(argv):
        return module.run_command(argv, environ_update={"LC_ALL": "C"})

    def find_binary(name):
        # PATH plus the sbin directories (get_bin_path adds them), like the shell of an administrator.
        return module.get_bin_path(name)

    finish(module, preflight_utils.run(module.params, run_command, find_binary))


if __name__ == "__main__":
    main()
