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
# package list, DEBIAN_IMAGE_RECIPE and every file of files/images/NAME but its documentation
# (*.md); when an image with that label exists it is only (re)tagged. FORCE_DEBIAN_IMAGE=1 rebuilds anyway.
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
# Names the recipe (debian_rootfs in lib.sh, the import below) in the label: give it a new value
# when the recipe changes, so that the images are rebuilt (tests/unit/test_image_recipe.py fails
# until then). Its value is the sha256 of this script from when the recipe was written out here
# (the label then hashed the script itself), so the images built then stay current.
DEBIAN_IMAGE_RECIPE=bc2b50dd069ba17f05171f5ddfda89cd53de37499246ad912963910a37de911a

description='' files=() hooks=() changes=()
# shellcheck source=/dev/null
source "$src/image.conf"
[[ -n $description ]] || die "files/images/$name/image.conf sets no description"

SUITE=$(debian_suite)
read_packages "$src/packages.txt"
# Documentation (*.md) does not go into the image.
files_hash=$(cd "$src" && find . -type f ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
    sha256sum | cut -d' ' -f1)
hash=$(printf '%s\n' "suite=$SUITE" "${packages[@]}" "files=$files_hash" "script=$DEBIAN_IMAGE_RECIPE" |
    sha256sum | cut -d' ' -f1)

if [[ -z ${FORCE_DEBIAN_IMAGE:-} ]] && tag_current_image "$tag" "$label" "$title" "$hash"; then
    exit 0
fi

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
customize=()
for hook in "${hooks[@]}"; do customize+=(--customize-hook="$hook"); done
import_changes=()
for change in "${changes[@]}"; do import_changes+=(--change "$change"); done
debian_rootfs "$SUITE" "$rootfs" "$(IFS=,; echo "${packages[*]}")" \
    "${customize[@]}" --customize-hook="sync-in $stage /"

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
