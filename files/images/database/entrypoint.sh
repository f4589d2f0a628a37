#!/usr/bin/env bash
# gatehouse-database etcd | patroni | post-bootstrap DATABASE ROLE CONNINFO | ctl ARGS...:
# one node of the Gatehouse database cluster (see README.md). The configuration is mounted at
# /etc/gatehouse-database (written by the gatehouse.access.database module), the TLS files at
# /etc/gatehouse-database/tls, the passwords at /secrets (files of mode 0600).
#
# etcd: the etcd member of etcd.yml. patroni: Patroni with patroni.yml, to which the superuser
# and replication passwords are added in a 0600 copy on the tmpfs /tmp. post-bootstrap: run by
# Patroni once, after initdb on the first primary: the broker's role (password of
# /secrets/broker.password) and its database. No password appears on a command line, in the
# environment or in the output.
set -euo pipefail
config=/etc/gatehouse-database
bin=/usr/lib/postgresql/15/bin
runtime=/tmp/gatehouse-database
say() { printf 'gatehouse-database: %s\n' "$*" >&2; }

[ $# -gt 0 ] || set -- patroni
case $1 in
etcd)
    shift
    exec /usr/bin/etcd --config-file "$config/etcd.yml" "$@"
    ;;
patroni)
    shift
    # The tmpfs /tmp of the container: Patroni's configuration with the passwords, its pgpass
    # file and PostgreSQL's socket, in a directory private to the service user.
    install -d -m 0700 "$runtime"
    python3 /usr/local/lib/gatehouse-database/render-patroni.py "$config/patroni.yml" "$runtime/patroni.yml"
    say "starting Patroni"
    exec /usr/bin/patroni "$runtime/patroni.yml"
    ;;
post-bootstrap)
    db=${2:?database} role=${3:?role} conninfo=${4:?connection string}
    secret=$(head -n 1 /secrets/broker.password | tr -d '\r\n')
    [ -n "$secret" ] || { say "/secrets/broker.password is empty"; exit 1; }
    # psql variables quote the names and the password: nothing of them reaches a command line.
    GH_ROLE=$role GH_DB=$db GH_SECRET=$secret "$bin/psql" "$conninfo" -v ON_ERROR_STOP=1 -q <<'SQL'
\getenv role GH_ROLE
\getenv db GH_DB
\getenv secret GH_SECRET
CREATE ROLE :"role" LOGIN PASSWORD :'secret';
CREATE DATABASE :"db" OWNER :"role";
SQL
    say "created the role $role and its database $db"
    ;;
ctl)
    shift
    exec /usr/bin/patronictl -c $runtime/patroni.yml "$@"
    ;;
*)
    exec "$@"
    ;;
esac
