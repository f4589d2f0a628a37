#!/usr/bin/env bash
# gatehouse/firewalld-test: a host with firewalld for the tests of the firewall role, or a plain
# client, chosen by the command:
#
#   firewalld  the system bus (dbus-daemon) and firewalld (nftables backend) in the foreground,
#              managing the container's own network namespace. Needs --cap-add NET_ADMIN
#              (nftables) and NET_RAW; not --privileged.
#   idle       does nothing until stopped (a client container: docker exec ... python3 -c ...).
#   health     exits 0 when firewalld answers on the bus (docker exec ... health).
#
# firewalld starts from its shipped configuration at every start of a new container (zone public,
# ssh and dhcpv6-client); the entrypoint prints "gatehouse-firewalld: ready" once it answers.
set -euo pipefail

die() { printf 'gatehouse-firewalld: %s\n' "$*" >&2; exit 1; }
say() { printf 'gatehouse-firewalld: %s\n' "$*"; }

run_firewalld() {
    local i
    mkdir -p /run/dbus
    rm -f /run/dbus/pid
    # dbus-daemon forks into the background and writes its pid; firewalld stays in the foreground
    # (tini is PID 1 and stops both).
    dbus-daemon --system --fork
    firewalld --nofork --nopid &
    local pid=$!
    for ((i = 0; i < 150; i++)); do
        if firewall-cmd --state >/dev/null 2>&1; then
            say ready
            wait "$pid"
            exit $?
        fi
        kill -0 "$pid" 2>/dev/null || die "firewalld exited at start (see the output above)"
        sleep 0.2
    done
    die "firewalld did not answer within 30 s"
}

case ${1:-firewalld} in
firewalld) run_firewalld ;;
idle) exec sleep infinity ;;
health) exec firewall-cmd --state ;;
*) exec "$@" ;;
esac
