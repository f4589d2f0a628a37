#!/usr/bin/env bash
# build-debian-image.sh NAME: build gatehouse/NAME:<version>, a test server image made from
# Debian packages without any registry: mmdebstrap (variant minbase, the host's Debian suite)
# installs files/images/NAME/packages.txt, the files that files/images/NAME/image.conf lists are
# copied in, and `docker import` turns the root file system into an image. Used for the images
# only the tests use (identity-test, registry-test); they are never shipped in the bundle.
#
# image.conf (bash, sourced) sets:
#   description  the image's description (label and import message)
#   files        "SOURCE DESTINATION MODE" lines: a file of the directory, its path in the image
#   hooks        extra mmdebstrap --customize-hook commands ($1 is the root directory)
#   changes      docker import --change instructions (EXPOSE, USER, ENTRYPOINT, CMD, HEALTHCHECK)
#
# The image is labelled gatehouse.NAME.sha256 with the sha256 of the suite, the normalised
# package list, this script and every file of files/images/NAME but its documentation (*.md);
# when an image with that label exists it is only (re)tagged. FORCE_DEBIAN_IMAGE=1 rebuilds anyway.
# Environment: DEBIAN_IMAGE_TAG (default ${REPOSITORY:-gatehouse/}NAME:<version>), SUITE
# (default: the host's VERSION_CODENAME), MMDEBSTRAP_MIRRORS (optional extra mirror arguments).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name=${1:?usage: build-debian-image.sh NAME (a directory of files/images with image.conf)}
src=$REPO_ROOT/files/images/$name
[[ -f $src/image.conf && -f $src/packages.txt ]] || die "files/images/$name has no image.conf and packages.txt"
version=$(gatehouse_version)
tag=${DEBIAN_IMAGE_TAG:-${REPOSITORY:-gatehouse/}$name:$version}
label=gatehouse.$name.sha256
title=gatehouse-$name

description='' files=() hooks=() changes=()
# shellcheck source=/dev/null
source "$src/image.conf"
[[ -n $description ]] || die "files/images/$name/image.conf sets no description"

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
if [[ -n $existing && -z ${FORCE_DEBIAN_IMAGE:-} ]]; then
    docker tag "$existing" "$tag"
    log "$tag is up to date (sha256 ${hash:0:12}, image ${existing:7:12})"
    exit 0
fi

ensure_mmdebstrap

workdir=$REPO_ROOT/build/$name
mkdir -p "$workdir"
stage=$(mktemp -d "$workdir/stage.XXXXXX")
rootfs=$(mktemp "$workdir/rootfs.XXXXXX.tar")
trap 'rm -rf "$stage" "$rootfs"' EXIT

# The files where the image's entrypoint and programs expect them.
for line in "${files[@]}"; do
    read -r file dest mode <<<"$line"
    [[ -n $mode && $dest == /* ]] || die "image.conf: '$line' is not SOURCE /DESTINATION MODE"
    install -D -m "$mode" "$src/$file" "$stage$dest"
done

start=$(now)
log "building $tag from Debian $SUITE: ${packages[*]}"
include=$(IFS=,; echo "${packages[*]}")
customize=()
for hook in "${hooks[@]}"; do customize+=(--customize-hook="$hook"); done
import_changes=()
for change in "${changes[@]}"; do import_changes+=(--change "$change"); done
# Like gatehouse/base: no documentation, no apt lists. The hooks are expanded by mmdebstrap
# ($1 is the root directory), hence single quotes.
# shellcheck disable=SC2016,SC2086
mmdebstrap --variant=minbase --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
    "${customize[@]}" \
    --customize-hook="sync-in $stage /" \
    --quiet "$SUITE" "$rootfs" ${MMDEBSTRAP_MIRRORS:-} </dev/null

docker import \
    --change "LABEL $label=$hash" \
    --change "LABEL org.opencontainers.image.title=$title" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.source=https://github.com/gatehouse/access" \
    --change "LABEL org.opencontainers.image.licenses=GPL-3.0-or-later" \
    --change "LABEL org.opencontainers.image.description=\"$description from Debian $SUITE\"" \
    --change "LABEL gatehouse.image=$name" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "${import_changes[@]}" \
    --message "gatehouse $name from Debian $SUITE" \
    "$rootfs" "$tag" >/dev/null
log "built $tag in $(($(now) - start)) s"
