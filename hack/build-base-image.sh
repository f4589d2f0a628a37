#!/usr/bin/env bash
# Build gatehouse/base:<version> from Debian packages without any registry:
# mmdebstrap (variant minbase, the host's Debian suite, default Debian mirrors) writes a root
# file system tarball that `docker import` turns into an image.
#
# The image is labelled with the sha256 of the normalised package list; when an image with
# that label exists it is only (re)tagged. FORCE_BASE=1 rebuilds anyway.
# Environment: BASE_TAG (default gatehouse/base:<version>), SUITE (default: the host's
# VERSION_CODENAME), MMDEBSTRAP_MIRRORS (optional, extra mirror arguments, e.g. a local mirror).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$(gatehouse_version)
base_tag=${BASE_TAG:-gatehouse/base:$version}
packages_file=$REPO_ROOT/files/images/base/packages.txt
label=gatehouse.base.packages-sha256

if [[ -z ${SUITE:-} ]]; then
    # shellcheck disable=SC1091
    SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
[[ -n $SUITE ]] || die "cannot tell the Debian suite of this host; set SUITE=bookworm"

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$packages_file" | grep -v '^$' | sort -u)
((${#packages[@]})) || die "$packages_file lists no package"
hash=$(printf '%s\n' "suite=$SUITE" "${packages[@]}" | sha256sum | cut -d' ' -f1)

# Images built FROM the base inherit its labels: only an imported image (one layer) titled
# gatehouse-base is the base itself.
is_base() {
    [[ $(docker image inspect --format \
        '{{len .RootFS.Layers}} {{index .Config.Labels "org.opencontainers.image.title"}} {{index .Config.Labels "'"$label"'"}}' \
        "$1" 2>/dev/null) == "1 gatehouse-base $hash" ]]
}
existing=
if is_base "$base_tag"; then
    existing=$(docker image inspect --format '{{.Id}}' "$base_tag")
else
    for id in $(docker images --quiet --no-trunc --filter "label=$label=$hash" \
        --filter "label=org.opencontainers.image.title=gatehouse-base"); do
        if is_base "$id"; then existing=$id; break; fi
    done
fi
if [[ -n $existing && -z ${FORCE_BASE:-} ]]; then
    docker tag "$existing" "$base_tag"
    log "$base_tag is up to date (package list sha256 ${hash:0:12}, image ${existing:7:12})"
    exit 0
fi

ensure_mmdebstrap

workdir=$REPO_ROOT/build/base
mkdir -p "$workdir"
rootfs=$(mktemp "$workdir/rootfs.XXXXXX.tar")
trap 'rm -f "$rootfs"' EXIT

start=$(now)
log "building $base_tag from Debian $SUITE: ${packages[*]}"
include=$(IFS=,; echo "${packages[*]}")
# Documentation, man pages and translations are of no use in a service image; the apt lists
# and caches are dropped so the image holds no stale package index. The hook is expanded by
# mmdebstrap ($1 is the root directory), hence single quotes.
# shellcheck disable=SC2016,SC2086
mmdebstrap --variant=minbase --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    --quiet "$SUITE" "$rootfs" ${MMDEBSTRAP_MIRRORS:-} </dev/null

docker import \
    --change "LABEL $label=$hash" \
    --change "LABEL org.opencontainers.image.title=gatehouse-base" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.source=https://github.com/gatehouse/access" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with the packages of files/images/base/packages.txt\"" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'CMD ["/bin/bash"]' \
    --message "gatehouse base from Debian $SUITE" \
    "$rootfs" "$base_tag" >/dev/null
log "built $base_tag in $(($(now) - start)) s"
