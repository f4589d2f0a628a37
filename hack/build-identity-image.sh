#!/usr/bin/env bash
# Build gatehouse/identity-test:<version>, the directory (OpenLDAP) and RADIUS (FreeRADIUS)
# server of the integration tests, from Debian packages without any registry: mmdebstrap
# (variant minbase, the host's Debian suite) installs files/images/identity-test/packages.txt,
# the files of that directory are copied in, and `docker import` turns the root file system
# into an image. The container's command chooses the server: slapd or radius (see
# files/images/identity-test/entrypoint.sh). Not a service image: never shipped in the bundle.
#
# The image is labelled with the sha256 of the suite, the normalised package list, this script
# and every file of files/images/identity-test but its README; when an image with that label exists it is only
# (re)tagged. FORCE_IDENTITY=1 rebuilds anyway.
# Environment: IDENTITY_TAG (default ${REPOSITORY:-gatehouse/}identity-test:<version>), SUITE
# (default: the host's VERSION_CODENAME), MMDEBSTRAP_MIRRORS (optional extra mirror arguments).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$(gatehouse_version)
tag=${IDENTITY_TAG:-${REPOSITORY:-gatehouse/}identity-test:$version}
src=$REPO_ROOT/files/images/identity-test
label=gatehouse.identity-test.sha256
title=gatehouse-identity-test

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
if [[ -n $existing && -z ${FORCE_IDENTITY:-} ]]; then
    docker tag "$existing" "$tag"
    log "$tag is up to date (sha256 ${hash:0:12}, image ${existing:7:12})"
    exit 0
fi

ensure_mmdebstrap

workdir=$REPO_ROOT/build/identity-test
mkdir -p "$workdir"
stage=$(mktemp -d "$workdir/stage.XXXXXX")
rootfs=$(mktemp "$workdir/rootfs.XXXXXX.tar")
trap 'rm -rf "$stage" "$rootfs"' EXIT

# The files as the entrypoint expects them inside the image.
install -D -m 0755 "$src/entrypoint.sh" "$stage/usr/local/bin/gatehouse-identity"
install -D -m 0644 -t "$stage/usr/local/share/gatehouse-identity" "$src/slapd-config.ldif" "$src/directory.ldif"
install -D -m 0644 -t "$stage/etc/gatehouse-identity/radius" "$src/radius/radiusd.conf"

start=$(now)
log "building $tag from Debian $SUITE: ${packages[*]}"
include=$(IFS=,; echo "${packages[*]}")
# Like gatehouse/base: no documentation, no apt lists. The configuration and database the
# Debian packages created at installation are dropped: the entrypoint writes its own at every
# start. The hooks are expanded by mmdebstrap ($1 is the root directory), hence single quotes.
# shellcheck disable=SC2016,SC2086
mmdebstrap --variant=minbase --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    --customize-hook='rm -rf "$1"/etc/ldap/slapd.d/* "$1"/var/lib/ldap/*' \
    --customize-hook="sync-in $stage /" \
    --quiet "$SUITE" "$rootfs" ${MMDEBSTRAP_MIRRORS:-} </dev/null

docker import \
    --change "LABEL $label=$hash" \
    --change "LABEL org.opencontainers.image.title=$title" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.source=https://github.com/gatehouse/access" \
    --change "LABEL org.opencontainers.image.licenses=GPL-3.0-or-later" \
    --change "LABEL org.opencontainers.image.description=\"Gatehouse test directory (OpenLDAP) and RADIUS server (FreeRADIUS) from Debian $SUITE\"" \
    --change "LABEL gatehouse.image=identity-test" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "EXPOSE 389 636 1812/udp" \
    --change 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/gatehouse-identity"]' \
    --change 'HEALTHCHECK --interval=2s --timeout=2s --start-period=10s CMD ["/usr/local/bin/gatehouse-identity", "health"]' \
    --message "gatehouse identity-test from Debian $SUITE" \
    "$rootfs" "$tag" >/dev/null
log "built $tag in $(($(now) - start)) s"
