# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # Options shared by the deployment modules (cmsg, broker).
    DOCUMENTATION = r"""
options:
  state:
    description:
      - V(present) writes the data directory and runs the containers.
      - V(absent) removes the containers, the Docker network and the files the module wrote.
    type: str
    choices: [present, absent]
    default: present
  ssl_cert:
    description:
      - Certificate (PEM, leaf first, optionally followed by its chain) on the target, copied to
        C(certs/cert.pem).
      - It is checked with the rules of M(gatehouse.access.certificate) (RSA of at least 2048 bits, no MD5 or
        SHA-1 signatures, valid now, chain order) and must match O(ssl_key).
      - Mutually exclusive with O(self_signed).
    type: path
  ssl_key:
    description:
      - Unencrypted private key (PEM) of O(ssl_cert) on the target, copied to C(certs/key.pem) with mode V(0600).
    type: path
  ca_cert:
    description:
      - The certificate authority chain of O(ssl_cert) on the target, copied to C(certs/ca.pem).
    type: path
  self_signed:
    description:
      - Create a self-signed 3072-bit RSA certificate and key in C(certs/) for tests and demonstrations.
      - Created once and kept on later runs as long as key and certificate in C(certs/) belong together.
    type: bool
    default: false
  log_level:
    description: Log level of the services.
    type: str
    choices: [debug, info, warn, error]
    default: info
  image_tag:
    description: Tag of the C(gatehouse/*) images. The default is the version of this collection.
    type: str
    default: 0.1.0
  image_source:
    description:
      - V(local) uses images already on the Docker host (built with C(make images) or loaded from
        O(bundle_path)); nothing is pulled.
      - V(registry) pulls missing images from O(registry); an image already on the Docker host is used as it is.
        In check mode nothing is pulled, but the registry is asked for each missing image, so that a registry
        that is down or lacks the tag fails the check run as it would fail the real run.
    type: str
    choices: [local, registry]
    default: local
  registry:
    description:
      - Registry prefix for O(image_source=registry), for example V(registry.example.com:5000) or
        V(registry.example.com/mirror). The images are pulled as C(<registry>/gatehouse/<name>:<image_tag>),
        for example C(registry.example.com:5000/gatehouse/cm:0.1.0).
      - The Docker engine must trust the registry (TLS certificate, or C(insecure-registries) in its
        C(daemon.json); registries on 127.0.0.0/8 are trusted without TLS) and, if it requires a login,
        the credentials of the user that runs the module (C(docker login)).
    type: str
  bundle_path:
    description:
      - A dark-site bundle on the target (C(make bundle)'s C(gatehouse-bundle-<version>.tar.gz), or that archive
        unpacked). It is used only when an image the module needs is missing, and verified first exactly as
        M(gatehouse.access.bundle) verifies it (C(SHA256SUMS), manifest, C(images.tar)); a bundle that fails the
        check fails the task before anything changes. An archive is unpacked to the temporary directory first.
    type: path
  network_mode:
    description:
      - V(bridge) runs the containers on a Docker bridge network and publishes their ports on the host.
      - V(host) runs them in the host's network namespace; the host's firewall forwards 443 to 8443 and
        80 to 8080 (role P(gatehouse.access.firewall#role)).
      - V(container:<name>) shares the network namespace of another container. Molecule and the demo use it
        so that every inventory host (a container) has its own address. The Docker engine resolves bind-mount
        sources on the real host, so O(data_dir) must be a path that is the same on the Docker host and on the
        target (mount a host directory at the same path into each host container).
    type: str
    default: bridge
  host_label:
    description: Value of the C(gatehouse.host) label of the containers. Defaults to the target's host name.
    type: str
  name_prefix:
    description: Prefix of the container and network names (C(<prefix>-<role>)).
    type: str
    default: gatehouse
  wait_timeout:
    description:
      - Seconds to wait for a (re)started container to be up; a container that exits right after its start
        fails the task with its last log lines. V(0) does not wait.
    type: int
    default: 60
"""

    # The container_limits option of the cmsg, broker and halb modules (one declaration:
    # _containers.CONTAINER_LIMITS_OPTION; the defaults are _containers.SERVICE_HARDENING).
    CONTAINER_LIMITS = r"""
options:
  container_limits:
    description:
      - Limits and hardening of the service containers (the same option in M(gatehouse.access.cmsg),
        M(gatehouse.access.broker) and M(gatehouse.access.halb)). Unset suboptions keep the defaults.
      - The containers always drop every capability except the ones their service needs (none for the connection
        manager, the security gateway and the broker, which run as uid 10001 and listen on ports of 1024 and above
        inside their containers), run with C(no-new-privileges) and have a tmpfs on C(/tmp).
    type: dict
    suboptions:
      memory:
        description:
          - Memory limit per container (Docker size, for example V(1g) or V(512m)). Default V(1g) for the connection
            manager, the security gateway and the HALB, V(512m) for the broker.
        type: str
      pids:
        description: Limit of processes and threads per container. Default V(512), V(1024) for the HALB.
        type: int
      nofile:
        description:
          - Open files limit (soft and hard). Default V(65536), capped at the limit the Docker engine itself has.
        type: int
      read_only:
        description: Read-only root file system. Default V(true).
        type: bool
      cap_add:
        description: Capabilities added to the ones the service needs (names without C(CAP_)). Default none.
        type: list
        elements: str
"""
