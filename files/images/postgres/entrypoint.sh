#!/usr/bin/env bash
# gatehouse-postgres server [postgres options] | health: the PostgreSQL server of
# gatehouse/postgres (see README.md).
#
# server: at the first start (no $PGDATA/PG_VERSION) initdb (UTF-8, locale C.UTF-8, SCRAM), then
# the role $POSTGRES_USER with the password of $POSTGRES_PASSWORD_FILE (or $POSTGRES_PASSWORD)
# and its database $POSTGRES_DB, owned by it. At every start: the server certificate of
# $POSTGRES_TLS_DIR (server.crt, server.key) when it holds one, so TLS is optional; remote
# clients log in with their password (scram-sha-256) over TCP, the superuser only over the
# socket. The password never appears in the output.
set -euo pipefail
bin=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
sockets=/var/lib/postgresql
tls_dir=${POSTGRES_TLS_DIR:-/etc/gatehouse-postgres/tls}
say() { printf 'gatehouse-postgres: %s\n' "$*"; }

password() {
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        head -n 1 "$POSTGRES_PASSWORD_FILE" | tr -d '\r\n'
    else
        printf '%s' "${POSTGRES_PASSWORD:-}"
    fi
}

init() {
    user=${POSTGRES_USER:-gatehouse}
    db=${POSTGRES_DB:-$user}
    secret=$(password)
    [ -n "$secret" ] || { say "POSTGRES_PASSWORD_FILE or POSTGRES_PASSWORD is required"; exit 1; }
    "$bin/initdb" -D "$PGDATA" --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
unix_socket_directories = '$sockets'
password_encryption = 'scram-sha-256'
include = 'gatehouse-tls.conf'
CONF
    : >"$PGDATA/gatehouse-tls.conf"
    cat >"$PGDATA/pg_hba.conf" <<CONF
local all postgres peer
local all all scram-sha-256
host all postgres all reject
host all all all scram-sha-256
CONF
    "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w -s start
    # psql variables quote the names and the password: nothing of them reaches a command line.
    PGUSER_NAME=$user PGDB_NAME=$db PGSECRET=$secret "$bin/psql" -h "$sockets" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -q <<'SQL'
\getenv name PGUSER_NAME
\getenv db PGDB_NAME
\getenv secret PGSECRET
CREATE ROLE :"name" LOGIN PASSWORD :'secret';
CREATE DATABASE :"db" OWNER :"name";
SQL
    "$bin/pg_ctl" -D "$PGDATA" -w -s stop
    say "initialised $PGDATA: role $user, database $db"
}

tls() {
    if [ -s "$tls_dir/server.crt" ] && [ -s "$tls_dir/server.key" ]; then
        # The server wants its key private to it: copied, never used from the mount.
        install -m 0644 "$tls_dir/server.crt" "$PGDATA/server.crt"
        install -m 0600 "$tls_dir/server.key" "$PGDATA/server.key"
        printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >"$PGDATA/gatehouse-tls.conf"
        say "TLS on"
    else
        printf '# TLS off: no server.crt and server.key in %s\n' "$tls_dir" >"$PGDATA/gatehouse-tls.conf"
    fi
}

[ $# -gt 0 ] || set -- server
case $1 in
server)
    shift
    [ -s "$PGDATA/PG_VERSION" ] || init
    tls
    say "ready to start"
    # Further arguments go to postgres (e.g. -c name=value). docker stop's SIGTERM becomes
    # SIGINT, PostgreSQL's fast shutdown: SIGTERM would wait for every client to disconnect.
    "$bin/postgres" -D "$PGDATA" "$@" &
    pid=$!
    trap 'kill -INT "$pid" 2>/dev/null' TERM INT
    status=0
    while :; do
        # Interrupted by the trap (status > 128) while postgres shuts down: wait again.
        if wait "$pid"; then status=0; else status=$?; fi
        kill -0 "$pid" 2>/dev/null || break
    done
    exit "$status"
    ;;
health)
    exec "$bin/pg_isready" -q -h "$sockets" -U postgres
    ;;
*)
    exec "$@"
    ;;
esac
