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
# image registry of the image_source=registry tests) and firewalld-test (the firewalld host of the
# firewall role's test) are no Dockerfile builds: hack/build-debian-image.sh imports them from
# Debian packages.
# shellcheck disable=SC2034
GATEHOUSE_TEST_IMAGES=(node identity-test registry-test firewalld-test)
# The monitoring server of the monitoring role (and the promtool of the rule tests), imported from
# Debian's prometheus package by hack/build-debian-image.sh; not (yet) in the dark-site bundle.
# shellcheck disable=SC2034
GATEHOUSE_MONITORING_IMAGES=(prometheus)

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
