#!/usr/bin/env bash
# Build gatehouse/firewalld-test:<version>, the firewalld host of the firewall role's integration
# test (tests/integration/collection/test_firewall_real.py), from Debian packages without any
# registry: mmdebstrap (variant minbase, the host's Debian suite) installs
# files/images/firewalld-test/packages.txt, the entrypoint is copied in, and `docker import` turns
# the root file system into an image. The container's command chooses firewalld or an idle
# client (see files/images/firewalld-test/entrypoint.sh). Not a service image: never shipped in
# the bundle.
#
# The image is labelled with the sha256 of the suite, the normalised package list, this script
# and every file of files/images/firewalld-test but its README; when an image with that label
# exists it is only (re)tagged. FORCE_FIREWALLD=1 rebuilds anyway.
# Environment: FIREWALLD_TAG (default ${REPOSITORY:-gatehouse/}firewalld-test:<version>), SUITE
# (default: the host's VERSION_CODENAME), MMDEBSTRAP_MIRRORS (optional extra mirror arguments).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$(gatehouse_version)
tag=${FIREWALLD_TAG:-${REPOSITORY:-gatehouse/}firewalld-test:$version}
src=$REPO_ROOT/files/images/firewalld-test
label=gatehouse.firewalld-test.sha256
title=gatehouse-firewalld-test

if [[ -z ${SUITE:-} ]]; then
    # shellcheck disable=SC1091
    SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
[[ -n $SUITE ]] || die "cannot tell the Debian suite of this host; set SUITE=bookworm"

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$src/packages.txt" | grep -v '^$' | sort -u)
((${#packages[@]})) || die "$src/packages.txt lists no package"
# Documentation (*.md) does not go into the image.
files_hash=$(cd "$src" && find . -type f ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -d' ' -f1)
script_hash=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)
hash=$(printf '%s\n' "suite=$SUITE" "${packages[@]}" "files=$files_hash" "script=$script_hash" |
    sha256sum | cut -d' ' -f1)

is_current() {
    [[ $(docker image inspect --format \
        '{{len .RootFS.Layers}} {{index .Config.Labels "org.opencontainers.image.title"}} {{index .Config.Labels "'"$label"'"}}' \
        "$1" 2>/dev/null) == "1 $title $hash" ]]
}
existing=
if is_current "$tag"; then
    existing=$(docker image inspect --format '{{.Id}}' "$tag")
else
    for id in $(docker images --quiet --no-trunc --filter "label=$label=$hash"); do
        if is_current "$id"; then existing=$id; break; fi
    done
fi
if [[ -n $existing && -z ${FORCE_FIREWALLD:-} ]]; then
    docker tag "$existing" "$tag"
    log "$tag is up to date (sha256 ${hash:0:12}, image ${existing:7:12})"
    exit 0
fi

ensure_mmdebstrap

workdir=$REPO_ROOT/build/firewalld-test
mkdir -p "$workdir"
stage=$(mktemp -d "$workdir/stage.XXXXXX")
rootfs=$(mktemp "$workdir/rootfs.XXXXXX.tar")
trap 'rm -rf "$stage" "$rootfs"' EXIT

install -D -m 0755 "$src/entrypoint.sh" "$stage/usr/local/bin/gatehouse-firewalld"

start=$(now)
log "building $tag from Debian $SUITE: ${packages[*]}"
include=$(IFS=,; echo "${packages[*]}")
# Like gatehouse/base: no documentation, no apt lists. The hooks are expanded by mmdebstrap ($1 is
# the root directory), hence single quotes.
# shellcheck disable=SC2016,SC2086
mmdebstrap --variant=minbase --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    --customize-hook="sync-in $stage /" \
    --quiet "$SUITE" "$rootfs" ${MMDEBSTRAP_MIRRORS:-} </dev/null

docker import \
    --change "LABEL $label=$hash" \
    --change "LABEL org.opencontainers.image.title=$title" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.source=https://github.com/gatehouse/access" \
    --change "LABEL org.opencontainers.image.licenses=GPL-3.0-or-later" \
    --change "LABEL org.opencontainers.image.description=\"Gatehouse test host with firewalld (nftables) from Debian $SUITE\"" \
    --change "LABEL gatehouse.image=firewalld-test" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/gatehouse-firewalld"]' \
    --change 'CMD ["firewalld"]' \
    --message "gatehouse firewalld-test from Debian $SUITE" \
    "$rootfs" "$tag" >/dev/null
log "built $tag in $(($(now) - start)) s"
