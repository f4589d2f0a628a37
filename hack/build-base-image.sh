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

SUITE=$(debian_suite)
read_packages "$packages_file"
hash=$(printf '%s\n' "suite=$SUITE" "${packages[@]}" | sha256sum | cut -d' ' -f1)

if [[ -z ${FORCE_BASE:-} ]] && tag_current_image "$base_tag" "$label" gatehouse-base "$hash"; then
    exit 0
fi

workdir=$REPO_ROOT/build/base
mkdir -p "$workdir"
rootfs=$(mktemp "$workdir/rootfs.XXXXXX.tar")
trap 'rm -f "$rootfs"' EXIT

start=$(now)
log "building $base_tag from Debian $SUITE: ${packages[*]}"
debian_rootfs "$SUITE" "$rootfs" "$(IFS=,; echo "${packages[*]}")"

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
