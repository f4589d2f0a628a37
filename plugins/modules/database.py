#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: database
short_description: Deploy one node of the broker's highly available PostgreSQL cluster (Patroni and etcd)
version_added: 0.1.0
description:
  - Runs on one Docker host a member of the etcd cluster (container C(<prefix>-etcd)) and, unless O(patroni=false),
    a Patroni node managing PostgreSQL 15 (container C(<prefix>-patroni)), both from the image C(gatehouse/database)
    (Debian's packages of PostgreSQL, Patroni and etcd). Three such nodes make a cluster; the broker reaches its
    primary with a multi-host URL and C(target_session_attrs=read-write).
  - Writes the data directory O(data_dir) - C(docker-compose.yaml), C(data/etcd.yml), C(data/patroni.yml),
    C(certs/) (the TLS files), C(secrets/) (the passwords, files of mode 0600) - and keeps the etcd data in
    C(etcd/) and PostgreSQL's in C(pgdata/), owned by uid 10001 (the containers' user).
  - All traffic uses TLS with the certificate O(ssl_cert) - PostgreSQL's clients and replication (C(hostssl) only,
    SCRAM passwords, the replicas verify the primary with C(sslmode=verify-full)), etcd's clients and peers (client
    certificates of O(ca_cert) required), Patroni's REST API (HTTPS; changes need a client certificate of
    O(ca_cert)).
  - Patroni runs with synchronous replication (C(synchronous_mode), not strict - a primary without a synchronous
    standby goes on alone), so that only a standby that has every committed transaction is promoted, and with
    C(use_pg_rewind), so that an old primary rejoins as a replica. With the default timings a failover completes
    within about 10 seconds of the primary's loss.
  - At the bootstrap of the cluster (on the first primary) the role O(broker_role) with the password
    O(broker_password) and its database O(broker_database) are created.
  - Every option, the TLS material, the free disk space under O(data_dir) and (for containers still to be created)
    the host ports 5432, 8008, 2379 and 2380 are checked before anything is changed. Files are written atomically;
    the same options twice report no change.
  - The guide is C(docs/broker-ha.md) in the collection.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.deploy.container_limits
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows C(etcd.yml) and C(patroni.yml) before and after; passwords and the private key are never
        shown (not even a hash of a password).
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - cryptography >= 42.0 on the target
  - Docker engine >= 20.10
options:
  state:
    description:
      - V(present) writes the data directory and runs the node's containers.
      - V(absent) removes the containers and the files the module wrote; the data only with O(purge=true).
    type: str
    choices: [present, absent]
    default: present
  name:
    description: Name of this node, its etcd member and its Patroni member (lower-case letters, digits, C(-)).
    type: str
    required: true
  address:
    description:
      - The address (IP or DNS name) the other nodes and the broker reach this node at; advertised by etcd and
        Patroni and named by O(ssl_cert) (a SAN). Required with O(state=present).
    type: str
  members:
    description:
      - Every node of the cluster, this one included - the initial etcd cluster and the etcd endpoints Patroni uses.
        An odd number, 3 or 5. Required with O(state=present).
      - A member's data directory, once made, keeps its cluster; adding a member later takes etcd's C(member add).
    type: list
    elements: dict
    suboptions:
      name:
        description: The member's O(name).
        type: str
        required: true
      address:
        description: The member's O(address).
        type: str
        required: true
  patroni:
    description:
      - V(true) runs a Patroni node (PostgreSQL) next to the etcd member; V(false) makes an etcd-only witness, and
        removes a Patroni container of an earlier run (its data stays).
    type: bool
    default: true
  cluster_name:
    description: Name of the Patroni cluster (its C(scope)); the same on every node.
    type: str
    default: gatehouse
  superuser_password:
    description:
      - Password of PostgreSQL's superuser C(postgres) (Patroni's own connections, C(pg_rewind)). At least 12
        characters; the same on every node. Required when O(patroni=true).
      - Written to C(secrets/superuser.password) (0600); never in the environment, a command line, the diff or the
        output. Set at the bootstrap; changing it later takes C(ALTER ROLE) too.
    type: str
  replication_password:
    description: Password of the replication role C(replicator), like O(superuser_password).
    type: str
  broker_password:
    description: Password of O(broker_role), like O(superuser_password); the broker's C(database_password).
    type: str
  broker_database:
    description: The broker's database, created at the bootstrap and owned by O(broker_role).
    type: str
    default: gatehouse
  broker_role:
    description: The broker's login role, created at the bootstrap.
    type: str
    default: gatehouse
  ssl_cert:
    description:
      - PEM certificate of this node on the target, naming O(address). It serves PostgreSQL, etcd and the REST API
        and is this node's client certificate towards etcd and the other nodes, so it needs both the server and
        the client usage (the M(gatehouse.access.certificate) module's server certificates have both).
      - Required with O(state=present), together with O(ssl_key) and O(ca_cert).
    type: path
  ssl_key:
    description: The private key of O(ssl_cert) on the target (copied with mode 0600, never shown).
    type: path
  ca_cert:
    description: The CA (PEM) that issued the nodes' certificates; the only CA etcd, PostgreSQL and Patroni trust.
    type: path
  ttl:
    description:
      - Seconds the primary's leader key lives in etcd without being renewed. A failover starts when it expires.
      - O(loop_wait) + 2 * O(retry_timeout) must not exceed it. Read at the bootstrap of the cluster only (later,
        C(patronictl edit-config)).
    type: int
    default: 10
  loop_wait:
    description: Seconds between two runs of Patroni's loop (the primary renews its key each time).
    type: int
    default: 2
  retry_timeout:
    description: Seconds Patroni retries etcd and PostgreSQL before it gives up (a primary then demotes itself).
    type: int
    default: 4
  synchronous_mode:
    description:
      - Synchronous replication to one standby, and only that standby may be promoted - no committed transaction
        is lost at a failover. Not strict - with no standby left the primary goes on alone.
      - Read at the bootstrap of the cluster only.
    type: bool
    default: true
  max_connections:
    description: PostgreSQL's C(max_connections) (read at the bootstrap of the cluster only).
    type: int
    default: 100
  min_free_disk_gb:
    description: Free space (GiB) required on the file system of O(data_dir) before the node is deployed; V(0) skips.
    type: float
    default: 2.0
  data_dir:
    description: The data directory.
    type: path
    default: /opt/gatehouse/database
  purge:
    description: With O(state=absent), also delete the etcd and PostgreSQL data (C(etcd/), C(pgdata/)).
    type: bool
    default: false
  image_tag:
    description: Tag of the C(gatehouse/database) image. The default is the version of this collection.
    type: str
    default: 0.1.0
  image_source:
    description:
      - V(local) uses the image already on the Docker host (C(make images)); V(registry) pulls it from O(registry)
        when it is missing.
    type: str
    choices: [local, registry]
    default: local
  registry:
    description: Registry prefix for O(image_source=registry), like V(registry.example.com:5000).
    type: str
  network_mode:
    description:
      - V(bridge) runs the containers on Docker's default bridge and publishes 5432 and 8008 (Patroni) and 2379 and
        2380 (etcd) on the host.
      - V(host) runs them in the host's network namespace (the same ports).
      - V(container:<name>) shares the network namespace of another container (tests).
    type: str
    default: bridge
  publish_address:
    description:
      - With O(network_mode=bridge), the IP address of the host on which the containers publish 5432, 8008, 2379
        and 2380 - for a host with several addresses, where the database should answer on one of them only (or
        where another service holds these ports on another address). Unset, they are published on every address
        of the host.
      - The host port check of the preflight then looks at this address only, and it must be an address of the
        host. Refused with O(network_mode=host) or V(container:<name>), before anything is changed.
      - O(address) stays what the other nodes and the broker connect to; normally it is this address (or a DNS name
        of it).
    type: str
  host_label:
    description: Value of the C(gatehouse.host) label of the containers. Defaults to the target's host name.
    type: str
  name_prefix:
    description: Prefix of the container names (C(<prefix>-etcd), C(<prefix>-patroni)).
    type: str
    default: gatehouse-db
  wait_timeout:
    description:
      - Seconds to wait for a (re)started container to be up; one that exits right after its start fails the task
        with its last log lines. V(0) does not wait. The cluster itself forms once enough members run.
    type: int
    default: 60
notes:
  - C(gatehouse/database) is built by C(make images); it is not yet part of the dark-site bundle.
  - Deploy all members (the role P(gatehouse.access.database#role) does) - etcd has no quorum, and Patroni no
    leader, until a majority of the members run.
seealso:
  - module: gatehouse.access.broker
  - module: gatehouse.access.certificate
"""

EXAMPLES = r"""
- name: A node of a three-node cluster
  gatehouse.access.database:
    name: db1
    address: 10.0.0.31
    members:
      - {name: db1, address: 10.0.0.31}
      - {name: db2, address: 10.0.0.32}
      - {name: db3, address: 10.0.0.33}
    superuser_password: "{{ vault_database_superuser_password }}"
    replication_password: "{{ vault_database_replication_password }}"
    broker_password: "{{ vault_broker_database_password }}"
    ssl_cert: /etc/gatehouse/pki/db1.pem
    ssl_key: /etc/gatehouse/pki/db1.key
    ca_cert: /etc/gatehouse/pki/ca.pem

- name: A node on a host with several addresses, its ports published on the database network's only
  gatehouse.access.database:
    name: db2
    address: 10.0.0.32
    publish_address: 10.0.0.32
    members:
      - {name: db1, address: 10.0.0.31}
      - {name: db2, address: 10.0.0.32}
      - {name: db3, address: 10.0.0.33}
    superuser_password: "{{ vault_database_superuser_password }}"
    replication_password: "{{ vault_database_replication_password }}"
    broker_password: "{{ vault_broker_database_password }}"
    ssl_cert: /etc/gatehouse/pki/db2.pem
    ssl_key: /etc/gatehouse/pki/db2.key
    ca_cert: /etc/gatehouse/pki/ca.pem

- name: An etcd-only witness as the third member
  gatehouse.access.database:
    name: db3
    address: 10.0.0.33
    patroni: false
    members:
      - {name: db1, address: 10.0.0.31}
      - {name: db2, address: 10.0.0.32}
      - {name: db3, address: 10.0.0.33}
    ssl_cert: /etc/gatehouse/pki/db3.pem
    ssl_key: /etc/gatehouse/pki/db3.key
    ca_cert: /etc/gatehouse/pki/ca.pem

- name: Remove the node and its data
  gatehouse.access.database:
    name: db1
    state: absent
    purge: true
"""

RETURN = r"""
changed_files:
  description: Files and directories written (with O(state=absent), removed); in check mode, those that would be.
  returned: always
  type: list
  elements: str
containers:
  description: Containers that were (or would be) created, recreated, started or removed.
  returned: always
  type: list
  elements: dict
  sample: [{name: gatehouse-db-etcd, action: create}, {name: gatehouse-db-patroni, action: create}]
images_loaded:
  description: Images pulled from O(registry).
  returned: O(state=present)
  type: list
  elements: str
config:
  description: The effective configuration.
  returned: O(state=present)
  type: dict
  contains:
    etcd_endpoints:
      description: The etcd client URLs of the members.
      type: list
      elements: str
      sample: ["https://10.0.0.31:2379"]
    postgresql:
      description: This node's PostgreSQL as V(host:port), V(null) for an etcd-only witness.
      type: str
      sample: 10.0.0.31:5432
    rest_api:
      description: This node's Patroni REST API (C(/primary), C(/replica), C(/health)), V(null) for a witness.
      type: str
      sample: https://10.0.0.31:8008
    publish_address:
      description: The host address the ports are published on (O(publish_address)); V(null) for every address.
      type: str
      sample: 10.0.0.31
    timings:
      description: ttl, loop_wait and retry_timeout of the bootstrap configuration.
      type: dict
    preflight:
      description: Free disk (GiB) under O(data_dir) and the host ports found busy.
      type: dict
left_behind:
  description: With O(state=absent), what was kept (the data unless O(purge), files the module did not write).
  returned: O(state=absent)
  type: list
  elements: str
errors:
  description: Every problem found in the options and the preflight checks, when the module fails.
  returned: failure
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as deploy  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import database as _database  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_database.ARGUMENT_SPEC,
        required_together=_database.REQUIRED_TOGETHER,
        required_if=_database.REQUIRED_IF,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _database.run)


if __name__ == "__main__":
    main()
