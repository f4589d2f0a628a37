#!/usr/bin/env bash
# gatehouse/registry-test health check: the registry answers GET /v2/ with 200, on the port of
# REGISTRY_HTTP_ADDR when the environment overrides config.yml's :5000 (bash's /dev/tcp: the
# image has no HTTP client).
set -euo pipefail
addr=${REGISTRY_HTTP_ADDR:-:5000}
exec 3<>"/dev/tcp/127.0.0.1/${addr##*:}"
printf 'GET /v2/ HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 2 _version status _rest <&3
[[ $status == 200 ]]
