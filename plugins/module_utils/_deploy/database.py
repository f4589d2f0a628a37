# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Logic of the database module: one node of the broker's highly available PostgreSQL cluster.

A node runs two containers of the image gatehouse/database (Debian's packages of PostgreSQL 15,
Patroni and etcd): ``<prefix>-etcd``, a member of the etcd cluster that holds the leader key,
and, unless the node is an etcd-only witness, ``<prefix>-patroni``, Patroni managing a
PostgreSQL server. Everything goes through the deploy engine: ``data/etcd.yml`` and
``data/patroni.yml`` (no secret in either) are written atomically and mounted read-only at
/etc/gatehouse-database, the TLS files of ``certs/`` at /etc/gatehouse-tls, the three
passwords as files of mode 0600 in ``secrets/`` at /secrets; the etcd data lives in ``etcd/``,
PostgreSQL's in ``pgdata/``.

Invariants:

- The passwords never reach the environment, a command line, the compose file, a diff or a
  container label: the image merges the superuser and replication passwords into a 0600 copy
  of patroni.yml on its tmpfs /tmp, and the broker's password is read by the post-bootstrap
  step. They are used when the cluster is bootstrapped; the password files do not enter the
  containers' spec hashes, so changing one later restarts nothing.
- The rendered files depend only on the options (same options, same bytes): a second run with
  the same options changes nothing.
- ``loop_wait + 2 * retry_timeout <= ttl`` (Patroni's own rule): a primary that cannot renew its
  leader key demotes itself before the key expires, so there is never a second primary.
- Every check (options, TLS material, free disk, free ports) runs before anything is changed.
- The data (``etcd/``, ``pgdata/``) survives ``state=absent`` unless ``purge`` is set.
"""

from __future__ import annotations

import os
import re
import socket

from ansible_collections.gatehouse.access.plugins.module_utils._common.files import PlannedDir, PlannedFile
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as dep
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import engine
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils._ops import preflight

MANAGED_BY = "gatehouse.access.database"
IMAGE = "database"
ETCD, PATRONI = "etcd", "patroni"
PG_PORT, API_PORT, CLIENT_PORT, PEER_PORT = 5432, 8008, 2379, 2380
ETCD_CONFIG, PATRONI_CONFIG = "etcd.yml", "patroni.yml"
SECRETS = "secrets"
PASSWORDS = ("superuser", "replication", "broker")
ETCD_DATA, PG_DATA = "etcd", "pgdata"
# Inside the containers (gatehouse/database).
CONFIG_DIR, TLS_DIR, SECRETS_DIR = "/etc/gatehouse-database", "/etc/gatehouse-tls", "/secrets"
ETCD_DIR, PG_DIR = "/var/lib/gatehouse-etcd", "/var/lib/postgresql/data"
PG_BIN = "/usr/lib/postgresql/15/bin"
# The private directory on the tmpfs /tmp: configuration with the passwords, pgpass, socket.
RUNTIME = "/tmp/gatehouse-database"  # noqa: S108 - inside the container, a tmpfs
SUPERUSER, REPLICATION_USER = "postgres", "replicator"
GIB = 1024**3
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SQL_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9.-]{1,253}$")
_RESERVED_ROLES = (SUPERUSER, REPLICATION_USER)

ARGUMENT_SPEC: dict = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "name": {"type": "str", "required": True},
    "address": {"type": "str"},
    "members": {
        "type": "list",
        "elements": "dict",
        "options": {
            "name": {"type": "str", "required": True},
            "address": {"type": "str", "required": True},
        },
    },
    "patroni": {"type": "bool", "default": True},
    "cluster_name": {"type": "str", "default": "gatehouse"},
    "superuser_password": {"type": "str", "no_log": True},
    "replication_password": {"type": "str", "no_log": True},
    "broker_password": {"type": "str", "no_log": True},
    "broker_database": {"type": "str", "default": "gatehouse"},
    "broker_role": {"type": "str", "default": "gatehouse"},
    "ssl_cert": {"type": "path"},
    "ssl_key": {"type": "path"},
    "ca_cert": {"type": "path"},
    "ttl": {"type": "int", "default": 10},
    "loop_wait": {"type": "int", "default": 2},
    "retry_timeout": {"type": "int", "default": 4},
    "synchronous_mode": {"type": "bool", "default": True},
    "max_connections": {"type": "int", "default": 100},
    "min_free_disk_gb": {"type": "float", "default": 2.0},
    "data_dir": {"type": "path", "default": "/opt/gatehouse/database"},
    "purge": {"type": "bool", "default": False},
    "image_tag": dep.COMMON_ARGUMENT_SPEC["image_tag"],
    "image_source": dep.COMMON_ARGUMENT_SPEC["image_source"],
    "registry": dep.COMMON_ARGUMENT_SPEC["registry"],
    "network_mode": {"type": "str", "default": "bridge"},
    "publish_address": {"type": "str"},
    "host_label": dep.COMMON_ARGUMENT_SPEC["host_label"],
    "name_prefix": {"type": "str", "default": "gatehouse-db"},
    "docker_host": dep.COMMON_ARGUMENT_SPEC["docker_host"],
    "wait_timeout": dep.COMMON_ARGUMENT_SPEC["wait_timeout"],
    "container_limits": dep.COMMON_ARGUMENT_SPEC["container_limits"],
}
REQUIRED_TOGETHER = [("ssl_cert", "ssl_key", "ca_cert")]
REQUIRED_IF = [
    ("image_source", "registry", ["registry"]),
    ("state", "present", ["address", "members", "ssl_cert", "ssl_key", "ca_cert"]),
]


def container_names(prefix: str) -> dict:
    return {ETCD: "%s-etcd" % prefix, PATRONI: "%s-patroni" % prefix}


def host_port(address: str, port: int) -> str:
    return "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)


# ------------------------------------------------------------------ validation


def _check_address(value: str, label: str, errors: list[str]) -> None:
    if dep.parse_ip(value) is None and not _HOST_RE.match(value):
        errors.append("%s %r is neither an IP address nor a DNS name" % (label, value))


def validate(params: dict) -> None:
    """Check every option; raises dep.ValidationError listing all problems."""
    errors: list[str] = []
    dep.check_place(params, "database", errors)
    if not _NAME_RE.match(params["name"]):
        errors.append("name %r must be lower-case letters, digits and '-' (at most 63)" % params["name"])
    if params["state"] == "absent":
        if errors:
            raise dep.ValidationError(errors)
        return
    if params["purge"]:
        errors.append("purge is only used with state=absent (it deletes the etcd and PostgreSQL data)")
    _check_address(params["address"], "address", errors)
    names, addresses = set(), set()
    for member in params["members"]:
        if not _NAME_RE.match(member["name"]):
            errors.append("members: name %r must be lower-case letters, digits and '-'" % member["name"])
        _check_address(member["address"], "members: %s: address" % member["name"], errors)
        if member["name"] in names:
            errors.append("members names %s twice" % member["name"])
        if member["address"] in addresses:
            errors.append("members lists the address %s twice" % member["address"])
        names.add(member["name"])
        addresses.add(member["address"])
    mine = [m for m in params["members"] if m["name"] == params["name"]]
    if not mine:
        errors.append(
            "members must list this node (name %s) too: it is the initial etcd cluster" % params["name"]
        )
    elif mine[0]["address"] != params["address"]:
        errors.append(
            "members gives %s the address %s, but address is %s"
            % (params["name"], mine[0]["address"], params["address"])
        )
    if len(params["members"]) % 2 == 0:
        errors.append(
            "members lists %d etcd members: use an odd number (3 or 5); an even one tolerates no more "
            "failures than one member fewer" % len(params["members"])
        )
    if params["patroni"]:
        for option in ("superuser_password", "replication_password", "broker_password"):
            value = params[option]
            if not value:
                errors.append("%s is required for a Patroni node (patroni=true)" % option)
            elif "\n" in value or "\r" in value or len(value) < 12:
                errors.append("%s must be one line of at least 12 characters" % option)
    for option in ("broker_database", "broker_role"):
        if not _SQL_NAME_RE.match(params[option]):
            errors.append(
                "%s %r must be a lower-case SQL name (letters, digits, '_'; at most 63)"
                % (option, params[option])
            )
    if params["broker_role"] in _RESERVED_ROLES:
        errors.append("broker_role cannot be %s (a role of the cluster itself)" % params["broker_role"])
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", params["cluster_name"]):
        errors.append("cluster_name %r must be letters, digits, '_' or '-'" % params["cluster_name"])
    ttl, loop_wait, retry = params["ttl"], params["loop_wait"], params["retry_timeout"]
    if loop_wait < 1 or retry < 1 or ttl < 5:
        errors.append("ttl must be at least 5, loop_wait and retry_timeout at least 1 (seconds)")
    elif loop_wait + 2 * retry > ttl:
        errors.append(
            "loop_wait + 2 * retry_timeout (%d) must not exceed ttl (%d): a primary that cannot reach etcd "
            "must demote itself before its leader key expires" % (loop_wait + 2 * retry, ttl)
        )
    if not 10 <= params["max_connections"] <= 10000:
        errors.append("max_connections must be between 10 and 10000")
    if params["min_free_disk_gb"] < 0:
        errors.append("min_free_disk_gb must be 0 (no check) or more")
    mode = params["network_mode"]
    if mode not in ("bridge", "host") and not (
        mode.startswith("container:") and len(mode) > len("container:")
    ):
        errors.append("network_mode must be bridge, host or container:<name>, got %r" % mode)
    publish = params.get("publish_address")
    if publish:
        if mode != "bridge":
            errors.append(
                "publish_address is only used with network_mode=bridge (the containers publish their ports "
                "on it); with network_mode=%s the ports are not published" % mode
            )
        if dep.parse_ip(publish) is None:
            errors.append("publish_address %r must be an IP address of the host" % publish)
    for service in (ETCD, PATRONI):
        if params.get("container_limits"):
            try:
                ctr.hardening(service, params["container_limits"])
            except ctr.ContainerError as exc:
                errors.append(str(exc))
    dep.check_image(params, errors)
    if errors:
        raise dep.ValidationError(errors)


# ------------------------------------------------------------------ rendering


def tls_paths() -> dict:
    return {"cert": TLS_DIR + "/cert.pem", "key": TLS_DIR + "/key.pem", "ca": TLS_DIR + "/ca.pem"}


def etcd_yml(params: dict) -> bytes:
    """etcd's configuration file: TLS with client certificates on the client and peer ports."""
    tls = tls_paths()
    security = {
        "cert-file": tls["cert"],
        "key-file": tls["key"],
        "trusted-ca-file": tls["ca"],
        "client-cert-auth": True,
    }
    initial = ",".join(
        "%s=https://%s" % (m["name"], host_port(m["address"], PEER_PORT)) for m in params["members"]
    )
    document = {
        "name": params["name"],
        "data-dir": ETCD_DIR,
        "listen-client-urls": "https://0.0.0.0:%d" % CLIENT_PORT,
        "advertise-client-urls": "https://%s" % host_port(params["address"], CLIENT_PORT),
        "listen-peer-urls": "https://0.0.0.0:%d" % PEER_PORT,
        "initial-advertise-peer-urls": "https://%s" % host_port(params["address"], PEER_PORT),
        "initial-cluster": initial,
        # Used only when the member starts with an empty data directory.
        "initial-cluster-state": "new",
        "initial-cluster-token": "gatehouse-%s" % params["cluster_name"],
        # Patroni speaks etcd's v3 API through its JSON gateway, off when a configuration file
        # does not turn it on.
        "enable-grpc-gateway": True,
        "client-transport-security": security,
        "peer-transport-security": security,
        # etcd's defaults (100 ms heartbeat, 1 s election): a new etcd leader well within Patroni's ttl.
        "heartbeat-interval": 100,
        "election-timeout": 1000,
        "auto-compaction-mode": "periodic",
        "auto-compaction-retention": "1h",
        "log-level": "warn",
        "logger": "zap",
    }
    header = (
        "# etcd member of the Gatehouse database cluster (docs/broker-ha.md).\n"
        "# Written by the gatehouse.access.database module; changes here are overwritten.\n"
    )
    return (header + dep.to_yaml(document) + "\n").encode("utf-8")


def patroni_yml(params: dict) -> bytes:
    """Patroni's configuration without the passwords (the image adds them from /secrets)."""
    tls = tls_paths()
    ssl_client = {"sslmode": "verify-full", "sslrootcert": tls["ca"]}
    document = {
        "scope": params["cluster_name"],
        "namespace": "/gatehouse/",
        "name": params["name"],
        "log": {"level": "INFO"},
        "restapi": {
            "listen": "0.0.0.0:%d" % API_PORT,
            "connect_address": host_port(params["address"], API_PORT),
            "certfile": tls["cert"],
            "keyfile": tls["key"],
            "cafile": tls["ca"],
            # Reading (GET /primary, /replica, /health) needs no certificate; changing anything
            # (switchover, restart, configuration) needs a client certificate of the CA.
            "verify_client": "optional",
        },
        "ctl": {"certfile": tls["cert"], "keyfile": tls["key"], "cacert": tls["ca"]},
        "etcd3": {
            "hosts": [host_port(m["address"], CLIENT_PORT) for m in params["members"]],
            "protocol": "https",
            "cacert": tls["ca"],
            "cert": tls["cert"],
            "key": tls["key"],
        },
        "bootstrap": {
            "dcs": {
                "ttl": params["ttl"],
                "loop_wait": params["loop_wait"],
                "retry_timeout": params["retry_timeout"],
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": params["synchronous_mode"],
                "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "max_connections": params["max_connections"],
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_keep_size": "256MB",
                        "password_encryption": "scram-sha-256",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
            "post_bootstrap": "/usr/local/bin/gatehouse-database post-bootstrap %s %s"
            % (params["broker_database"], params["broker_role"]),
        },
        "postgresql": {
            "listen": "0.0.0.0:%d" % PG_PORT,
            "connect_address": host_port(params["address"], PG_PORT),
            "data_dir": PG_DIR + "/15",
            "bin_dir": PG_BIN,
            "pgpass": RUNTIME + "/pgpass",
            # Patroni's own connections, replication ones included, use the socket: the certificate
            # names the node's address, not localhost.
            "use_unix_socket": True,
            "use_unix_socket_repl": True,
            # A new replica copies the primary at once instead of waiting for a spread checkpoint.
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {
                "superuser": dict({"username": SUPERUSER}, **ssl_client),
                "replication": dict({"username": REPLICATION_USER}, **ssl_client),
            },
            "parameters": {
                "unix_socket_directories": RUNTIME,
                "ssl": "on",
                "ssl_cert_file": tls["cert"],
                "ssl_key_file": tls["key"],
                "ssl_ca_file": tls["ca"],
                "ssl_min_protocol_version": "TLSv1.2",
            },
            "pg_hba": [
                "local all all scram-sha-256",
                "local replication %s scram-sha-256" % REPLICATION_USER,
                "hostssl replication %s all scram-sha-256" % REPLICATION_USER,
                "hostssl all all all scram-sha-256",
                "hostnossl all all all reject",
            ],
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }
    header = (
        "# Patroni node of the Gatehouse database cluster (docs/broker-ha.md); the passwords are added\n"
        "# from /secrets when the container starts. Written by the gatehouse.access.database module;\n"
        "# changes here are overwritten. bootstrap.dcs is read once, when the cluster is bootstrapped.\n"
    )
    return (header + dep.to_yaml(document) + "\n").encode("utf-8")


def published(mode: str, ports: tuple[int, ...], address: str | None = None) -> list[dict]:
    """The ports published in bridge mode: on every host address, or only on ``address``."""
    if mode != "bridge":
        return []
    ports_spec = [{"host": p, "container": p, "protocol": "tcp"} for p in ports]
    if address:
        for port in ports_spec:
            port["host_ip"] = address
    return ports_spec


def container_specs(params: dict, image: str, host_label: str) -> dict:
    data_dir = params["data_dir"]
    mode = params["network_mode"]
    names = container_names(params["name_prefix"])
    config = {"source": os.path.join(data_dir, engine.DATA), "target": CONFIG_DIR, "read_only": True}
    certs = {"source": os.path.join(data_dir, engine.CERTS), "target": TLS_DIR, "read_only": True}
    # What the etcd member's and the Patroni node's containers share.
    base = {
        "image": image,
        "network_mode": mode,
        "network": None,
        "restart_policy": "unless-stopped",
        "container_limits": params.get("container_limits"),
    }

    def spec(service: str, ports: tuple, mounts: list, stop_timeout: int) -> dict:
        return dict(
            base,
            service=service,
            name=names[service],
            command=[service],  # the image's entry point runs etcd or patroni by that name
            labels={
                ctr.LABEL_ROLE: "database-" + service,
                ctr.LABEL_HOST: host_label,
                ctr.LABEL_MANAGED: MANAGED_BY,
            },
            mounts=[config, certs, *mounts],
            ports=published(mode, ports, params.get("publish_address")),
            stop_timeout=stop_timeout,
        )

    etcd_data = {"source": os.path.join(data_dir, ETCD_DATA), "target": ETCD_DIR, "read_only": False}
    specs = {ETCD: spec(ETCD, (CLIENT_PORT, PEER_PORT), [etcd_data], 15)}
    if params["patroni"]:
        secrets = {"source": os.path.join(data_dir, SECRETS), "target": SECRETS_DIR, "read_only": True}
        pg_data = {"source": os.path.join(data_dir, PG_DATA), "target": PG_DIR, "read_only": False}
        # Patroni stops PostgreSQL (fast shutdown, a checkpoint) and releases its leader key.
        specs[PATRONI] = spec(PATRONI, (PG_PORT, API_PORT), [secrets, pg_data], 60)
    return specs


# ------------------------------------------------------------------ preflight


def preflight_checks(cli, params: dict, specs: dict, errors: list[str]) -> dict:
    """Free disk under data_dir and, for containers still to be created, free host ports."""
    where = preflight.existing_ancestor(params["data_dir"])
    stat = os.statvfs(where)
    free = stat.f_bavail * stat.f_frsize
    needed = int(params["min_free_disk_gb"] * GIB)
    if free < needed:
        errors.append(
            "only %.1f GiB free on the file system of %s; the database node needs min_free_disk_gb=%s GiB"
            % (free / GIB, where, params["min_free_disk_gb"])
        )
    busy: list[int] = []
    # Bridge mode with publish_address publishes on that address only: another node's or program's
    # listener on another address of the host does not take the port.
    address = params.get("publish_address") or "0.0.0.0"
    if params.get("publish_address") and not address_local(address):
        errors.append(
            "publish_address %s is not an address of this host: Docker cannot publish the ports on it"
            % address
        )
    elif params["network_mode"] in ("bridge", "host"):
        for spec in specs.values():
            if ctr.find_container(cli, spec["name"]) is not None:
                continue  # its ports are its own
            ports = (
                [p["host"] for p in spec["ports"]]
                if params["network_mode"] == "bridge"
                else ([CLIENT_PORT, PEER_PORT] if spec["service"] == ETCD else [PG_PORT, API_PORT])
            )
            busy += [port for port in ports if not port_free(port, address)]
    if busy:
        errors.append(
            "port(s) %s already in use on %s; the database node needs 5432, 8008, 2379 and 2380"
            % (
                ", ".join(str(p) for p in sorted(busy)),
                address if params.get("publish_address") else "this host",
            )
        )
    return {"free_disk_gb": round(free / GIB, 1), "busy_ports": sorted(busy)}


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def address_local(address: str) -> bool:
    """Whether ``address`` is an address of this host (a socket can be bound to it)."""
    with socket.socket(_family(address), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def port_free(port: int, address: str = "0.0.0.0") -> bool:
    """Whether a listener could bind ``address``:``port`` (0.0.0.0: every address of the host)."""
    with socket.socket(_family(address), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ driver


def run(module) -> dict:
    return engine.run_by_state(module, validate, install, uninstall)


def uninstall(cli, params: dict, check_mode: bool) -> dict:
    """Remove the containers and the files; the etcd and PostgreSQL data only with ``purge``."""
    data_dir = params["data_dir"]
    secrets = os.path.join(data_dir, SECRETS)
    return engine.uninstall(
        cli,
        check_mode,
        data_dir,
        list(container_names(params["name_prefix"]).values()),
        data_files=(ETCD_CONFIG, PATRONI_CONFIG),
        cert_files=(),
        managed_by=MANAGED_BY,
        more_files=[os.path.join(secrets, "%s.password" % n) for n in PASSWORDS],
        more_dirs=[secrets],
        kept=(
            [os.path.join(data_dir, ETCD_DATA), os.path.join(data_dir, PG_DATA)],
            "etcd and PostgreSQL data in %s" % data_dir,
            params["purge"],
        ),
    )


def install(module, cli, params: dict) -> dict:
    check_mode = module.check_mode
    data_dir = params["data_dir"]
    data = os.path.join(data_dir, engine.DATA)
    certs_dir = os.path.join(data_dir, engine.CERTS)
    secrets_dir = os.path.join(data_dir, SECRETS)
    host_label = params["host_label"] or dep.default_host_label()
    errors: list[str] = []
    warnings: list[str] = []
    engine.check_network_target(cli, params, errors)
    tls, material = dep.provided_files(
        params,
        ("ssl_cert", os.path.join(certs_dir, "cert.pem")),
        ("ssl_key", os.path.join(certs_dir, "key.pem")),
        ("ca_cert", os.path.join(certs_dir, "ca.pem")),
        errors,
        warnings,
    )
    refs, ids, loaded = engine.resolve_images(
        cli, dict(params, bundle_path=None), [IMAGE], check_mode, errors
    )
    specs = container_specs(params, refs[IMAGE], host_label)
    facts = preflight_checks(cli, params, specs, errors)
    if errors:
        raise dep.ValidationError(errors)
    uid, gid = engine.service_owner()
    if uid is None:
        warnings.append(engine.NOT_ROOT % "etcd and Patroni run")
    files = [
        PlannedFile(os.path.join(data, ETCD_CONFIG), etcd_yml(params), 0o644, uid, gid),
        *tls,
    ]
    dirs = [
        *engine.data_dirs(data_dir, uid, gid),
        PlannedDir(os.path.join(data_dir, ETCD_DATA), 0o700, uid, gid),
    ]
    if params["patroni"]:
        files.append(PlannedFile(os.path.join(data, PATRONI_CONFIG), patroni_yml(params), 0o644, uid, gid))
        files += [
            PlannedFile(
                os.path.join(secrets_dir, "%s.password" % name),
                (params["%s_password" % name] + "\n").encode("utf-8"),
                0o600,
                uid,
                gid,
                secret=True,
            )
            for name in PASSWORDS
        ]
        dirs += [
            PlannedDir(secrets_dir, 0o700, uid, gid),
            # PostgreSQL wants its data directory private to its user.
            PlannedDir(os.path.join(data_dir, PG_DATA), 0o700, uid, gid),
        ]
    tls_names = ("cert.pem", "key.pem", "ca.pem")
    containers = [engine.Container(specs[ETCD], reads=(ETCD_CONFIG, *tls_names))]
    if params["patroni"]:
        # The passwords are not among the files read: they only matter at the bootstrap.
        containers.append(engine.Container(specs[PATRONI], reads=(PATRONI_CONFIG, *tls_names)))
    names = container_names(params["name_prefix"])
    deployment = engine.Deployment(
        data_dir,
        files,
        dirs,
        containers,
        {ETCD: ids[IMAGE], PATRONI: ids[IMAGE]},
        loaded,
        retired=[] if params["patroni"] else [names[PATRONI]],
    )
    deployment.plan(cli)
    deployment.apply(cli, check_mode, params["wait_timeout"])
    members = [m["name"] for m in params["members"]]
    config = {
        "data_dir": data_dir,
        "image": refs[IMAGE],
        "network_mode": params["network_mode"],
        "publish_address": params.get("publish_address"),
        "name": params["name"],
        "address": params["address"],
        "members": members,
        "patroni": params["patroni"],
        "etcd_endpoints": ["https://%s" % host_port(m["address"], CLIENT_PORT) for m in params["members"]],
        "postgresql": host_port(params["address"], PG_PORT) if params["patroni"] else None,
        "rest_api": "https://%s" % host_port(params["address"], API_PORT) if params["patroni"] else None,
        "timings": {
            "ttl": params["ttl"],
            "loop_wait": params["loop_wait"],
            "retry_timeout": params["retry_timeout"],
        },
        "certificate": dep.certs.certificate_facts(material.leaf) if material is not None else None,
        "preflight": facts,
        "host_label": host_label,
    }
    return deployment.result(config, warnings)
