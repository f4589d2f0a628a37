#!/usr/bin/env bash
# Entrypoint of gatehouse/halb: HAProxy (master-worker) and keepalived in the foreground.
#
# - Configuration: $HAPROXY_CONFIG (default /etc/haproxy/haproxy.cfg) and $KEEPALIVED_CONFIG
#   (default /etc/keepalived/keepalived.conf). A missing file is created from a valid
#   placeholder so the container starts before the halb module has rendered anything.
# - HAProxy runs with a master CLI socket (/run/haproxy-master.sock) and the master pid in
#   /run/haproxy.pid; a reload (SIGUSR2 to the master) starts new workers while the old ones
#   finish their connections, so no connection is dropped.
# - Signals: TERM/INT stop both daemons; HUP validates and reloads both
#   (same as `gatehouse-halb-reload`).
# - The container exits when either daemon exits, with that daemon's status.
set -uo pipefail

haproxy_cfg=${HAPROXY_CONFIG:-/etc/haproxy/haproxy.cfg}
keepalived_cfg=${KEEPALIVED_CONFIG:-/etc/keepalived/keepalived.conf}
placeholders=/usr/local/share/gatehouse

log() { printf '%s gatehouse-halb: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# ensure_config VAR PLACEHOLDER: when the file named by $VAR is missing, put the placeholder
# there; on a read-only mount, point $VAR at the placeholder itself.
ensure_config() {
    local -n path=$1
    [[ -e $path ]] && return
    if install -D -m 0644 "$2" "$path" 2>/dev/null; then
        log "no configuration at $path, starting with the placeholder"
    else
        log "no configuration at $path and it cannot be created, running the placeholder $2"
        path=$2
    fi
}

ensure_config haproxy_cfg "$placeholders/haproxy-placeholder.cfg"
ensure_config keepalived_cfg "$placeholders/keepalived-placeholder.conf"
export HAPROXY_CONFIG=$haproxy_cfg KEEPALIVED_CONFIG=$keepalived_cfg
# Pid files left by a previous run of this container would make keepalived refuse to start.
rm -f /run/haproxy.pid /run/haproxy-master.sock /run/keepalived.pid /run/vrrp.pid /run/checkers.pid
install -d -m 0755 /run/haproxy

haproxy -W -db -S /run/haproxy-master.sock,mode,600 -p /run/haproxy.pid -f "$haproxy_cfg" &
haproxy_pid=$!
keepalived --dont-fork --log-console --log-detail --use-file "$keepalived_cfg" &
keepalived_pid=$!
log "started haproxy (pid $haproxy_pid) and keepalived (pid $keepalived_pid)"

stopping=0
stop() {
    log "received $1, stopping haproxy and keepalived"
    stopping=1
    kill -TERM "$keepalived_pid" "$haproxy_pid" 2>/dev/null || true
}
reload() {
    log "received HUP, reloading"
    /usr/local/bin/gatehouse-halb-reload || log "reload refused, still running the previous configuration"
}
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'reload' HUP

alive() { kill -0 "$1" 2>/dev/null; }

while true; do
    exited=
    wait -n -p exited "$haproxy_pid" "$keepalived_pid"
    status=$?
    # A trapped signal interrupts wait without any child having exited (and unsets $exited).
    [[ -z ${exited:-} ]] && continue
    if [[ $exited == "$haproxy_pid" ]]; then name=haproxy other=$keepalived_pid; else name=keepalived other=$haproxy_pid; fi
    if (( stopping )); then
        wait "$other" 2>/dev/null
        log "stopped"
        exit 0
    fi
    log "$name exited with status $status, stopping the container"
    if alive "$other"; then
        kill -TERM "$other" 2>/dev/null
        wait "$other" 2>/dev/null
    fi
    exit $(( status == 0 ? 1 : status ))
done
