#!/usr/bin/env bash
# gatehouse-halb-reload [all|haproxy|keepalived]: validate the configuration, then reload
# without dropping connections. Nothing is reloaded when a configuration is invalid.
# HAProxy: SIGUSR2 to the master (new workers, old ones drain); keepalived: SIGHUP.
set -euo pipefail

what=${1:-all}
haproxy_cfg=${HAPROXY_CONFIG:-/etc/haproxy/haproxy.cfg}
keepalived_cfg=${KEEPALIVED_CONFIG:-/etc/keepalived/keepalived.conf}

case $what in
    all | haproxy | keepalived) ;;
    *) echo "usage: gatehouse-halb-reload [all|haproxy|keepalived]" >&2; exit 2 ;;
esac

if [[ $what != keepalived ]] && ! haproxy -c -q -f "$haproxy_cfg"; then
    echo "gatehouse-halb-reload: $haproxy_cfg is invalid, nothing reloaded" >&2
    exit 1
fi
if [[ $what != haproxy ]] && ! keepalived -t -f "$keepalived_cfg" >/dev/null 2>&1; then
    keepalived -t -f "$keepalived_cfg" >&2 || true
    echo "gatehouse-halb-reload: $keepalived_cfg is invalid, nothing reloaded" >&2
    exit 1
fi
if [[ $what != keepalived ]]; then
    kill -USR2 "$(cat /run/haproxy.pid)"
fi
if [[ $what != haproxy ]]; then
    kill -HUP "$(cat /run/keepalived.pid)"
fi
echo "gatehouse-halb-reload: reloaded $what"
