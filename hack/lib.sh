# Shared helpers of the hack/ scripts (sourced, not executed).
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

# The virtualenv of the tool chain: $VENV (relative to the checkout) or .venv.
VENV_DIR=${VENV:-.venv}
[[ $VENV_DIR == /* ]] || VENV_DIR=$REPO_ROOT/$VENV_DIR
export VENV_DIR

# The one version of Gatehouse lives in galaxy.yml.
gatehouse_version() {
    sed -n 's/^version:[[:space:]]*["'\'']\{0,1\}\([^"'\''[:space:]]*\).*/\1/p' "$REPO_ROOT/galaxy.yml" | head -n1
}

# Service images built by `make images` and shipped in the dark-site bundle.
# shellcheck disable=SC2034  # used by the scripts that source this file
GATEHOUSE_IMAGES=(broker cm sg agent halb)
# Images only the tests, the Molecule scenarios and the demo use (not shipped in the bundle).
# identity-test (the directory and RADIUS server of the integration tests), registry-test (the
# image registry of the image_source=registry tests), firewalld-test (the firewalld host of the
# firewall role's test), ee-base (the base of the ansible-builder test) and postgres (the broker's
# PostgreSQL of the database tests) are no Dockerfile builds: hack/build-debian-image.sh imports
# them from Debian packages.
# shellcheck disable=SC2034
GATEHOUSE_TEST_IMAGES=(node identity-test registry-test firewalld-test ee-base postgres)
# The monitoring server of the monitoring role (and the promtool of the rule tests), imported from
# Debian's prometheus package by hack/build-debian-image.sh; not (yet) in the dark-site bundle.
# shellcheck disable=SC2034
GATEHOUSE_MONITORING_IMAGES=(prometheus)
# The broker's highly available database (Patroni, PostgreSQL 15 and etcd; the database module and
# role), imported from Debian's packages by hack/build-debian-image.sh; not (yet) in the dark-site
# bundle.
# shellcheck disable=SC2034
GATEHOUSE_DATABASE_IMAGES=(database)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# mmdebstrap, installed from Debian on a fresh machine (the README's two commands do all set-up).
ensure_mmdebstrap() {
    command -v mmdebstrap >/dev/null && return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing mmdebstrap from Debian"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap) </dev/null >&2 ||
            die "could not install mmdebstrap (apt-get install mmdebstrap)"
    else
        die "mmdebstrap is not installed (apt-get install mmdebstrap)"
    fi
}

# seconds since the epoch, for the timings the scripts report
now() { date +%s; }

# ---------------------------------------------------------------- images imported from Debian
# gatehouse/base (build-base-image.sh) and the test server images (build-debian-image.sh) are
# root file systems that mmdebstrap writes and `docker import` turns into one-layer images,
# labelled with a hash of what went into them.

# The Debian suite of the images: $SUITE, or the host's VERSION_CODENAME.
debian_suite() {
    local suite=${SUITE:-}
    if [[ -z $suite ]]; then
        # shellcheck disable=SC1091
        suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    fi
    [[ -n $suite ]] || die "cannot tell the Debian suite of this host; set SUITE=bookworm"
    echo "$suite"
}

# read_packages FILE: the array `packages` from FILE (one a line, # comments), sorted and unique.
read_packages() {
    mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' | sort -u)
    ((${#packages[@]})) || die "$1 lists no package"
}

# current_image TAG LABEL TITLE HASH: the id of the imported image titled TITLE whose LABEL is
# HASH (TAG itself when it is one), or nothing. Images built FROM it inherit its labels: only a
# one-layer image is the imported one.
current_image() {
    local tag=$1 label=$2 title=$3 hash=$4 id
    _is_imported() {
        [[ $(docker image inspect --format \
            '{{len .RootFS.Layers}} {{index .Config.Labels "org.opencontainers.image.title"}} {{index .Config.Labels "'"$label"'"}}' \
            "$1" 2>/dev/null) == "1 $title $hash" ]]
    }
    if _is_imported "$tag"; then
        docker image inspect --format '{{.Id}}' "$tag"
        return 0
    fi
    for id in $(docker images --quiet --no-trunc --filter "label=$label=$hash" \
        --filter "label=org.opencontainers.image.title=$title"); do
        if _is_imported "$id"; then
            echo "$id"
            return 0
        fi
    done
}

# tag_current_image TAG LABEL TITLE HASH: when current_image finds one, tag it TAG and say so;
# fails when there is none (the caller builds).
tag_current_image() {
    local existing
    existing=$(current_image "$@")
    [[ -n $existing ]] || return 1
    docker tag "$existing" "$1"
    log "$1 is current (sha256 ${4:0:12}, image ${existing:7:12})"
}

# debian_rootfs SUITE TARBALL PACKAGES [MMDEBSTRAP_ARGUMENT...]: a minbase root file system of
# SUITE with PACKAGES (comma-separated) in TARBALL; the arguments (more hooks) come after the
# common steps. Documentation, man pages and translations are of no use in a service image
# (copyright files stay); apt lists and caches are dropped so that no image holds a stale package
# index. MMDEBSTRAP_MIRRORS adds mirror arguments (a local mirror).
debian_rootfs() {
    local suite=$1 tarball=$2 include=$3
    shift 3
    ensure_mmdebstrap
    # The hook is expanded by mmdebstrap ($1 is the root directory), hence single quotes.
    # shellcheck disable=SC2016,SC2086
    mmdebstrap --variant=minbase --include="$include" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log' \
        "$@" \
        --quiet "$suite" "$tarball" ${MMDEBSTRAP_MIRRORS:-} </dev/null
}
