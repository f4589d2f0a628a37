#!/usr/bin/env bash
# make images: gatehouse/base (only when its package list changed), the Python wheels of
# files/services, and one image per service, built with `docker build --network none` from a
# context that holds the wheels: the Python services (broker, cm, sg, agent) from the stage of that
# name in files/images/services/Dockerfile (--target <name>), the others from
# files/images/<name>/Dockerfile. The test images gatehouse/identity-test, gatehouse/registry-test,
# gatehouse/firewalld-test, gatehouse/ee-base and gatehouse/postgres, the monitoring server
# gatehouse/prometheus and the database cluster's gatehouse/database have no Dockerfile but an
# image.conf: hack/build-debian-image.sh imports them from Debian packages (and skips the build
# when their packages and files did not change).
#
# Environment:
#   BASE_IMAGE   base of all service images (default gatehouse/base:<version>, built here).
#                Another base, e.g. python:3.11-slim, is used as is and the build then runs
#                with the default network (the HALB image installs haproxy/keepalived by apt).
#   IMAGES       images to build (default: broker cm sg agent halb node identity-test registry-test
#                firewalld-test ee-base postgres prometheus database)
#   REPOSITORY   repository prefix of the tags (default gatehouse/, giving gatehouse/<name>:<version>)
#   PYTHON       the Python whose pip builds the wheels (default $VENV/bin/python); its
#                version must match the base image's python3 (3.11 for Debian bookworm).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$(gatehouse_version)
python=${PYTHON:-$VENV_DIR/bin/python}
read -r -a requested <<<"${IMAGES:-${GATEHOUSE_IMAGES[*]} ${GATEHOUSE_TEST_IMAGES[*]} ${GATEHOUSE_MONITORING_IMAGES[*]} ${GATEHOUSE_DATABASE_IMAGES[*]}}"
wheels=$REPO_ROOT/build/wheels
services=$REPO_ROOT/files/services
total_start=$(now)

docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"

# Images imported from Debian packages need neither the base image nor the wheels.
images=()
for name in "${requested[@]}"; do
    if [[ -f $REPO_ROOT/files/images/$name/image.conf ]]; then
        "$REPO_ROOT/hack/build-debian-image.sh" "$name"
    else
        images+=("$name")
    fi
done
if ((${#images[@]} == 0)); then
    log "images done in $(($(now) - total_start)) s"
    exit 0
fi
[[ -x $python ]] || die "$python not found; run 'make venv' first"

# --- base image
if [[ -n ${BASE_IMAGE:-} && ${BASE_IMAGE} != "gatehouse/base:$version" ]]; then
    base_image=$BASE_IMAGE
    network=default
    log "using base image $base_image (build with network)"
else
    base_image=gatehouse/base:$version
    network=none
    BASE_TAG=$base_image "$REPO_ROOT/hack/build-base-image.sh"
fi

# --- wheels: build/wheels/deps holds the third-party wheels (fetched again only when the
# dependencies change; needs PyPI or a pip cache), build/wheels/app the gatehouse wheel
# (rebuilt only when its sources change). Both are reproducible (SOURCE_DATE_EPOCH), so
# unchanged inputs keep the image layers cached.
step_start=$(now)
deps=$wheels/deps app=$wheels/app
mkdir -p "$deps" "$app"
deps_hash=$("$python" - "$services/pyproject.toml" <<'PY'
import hashlib, sys, sysconfig, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"].get("dependencies", [])
tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
print(hashlib.sha256("\n".join([tag, *sorted(deps)]).encode()).hexdigest())
PY
)
if [[ $(cat "$deps/.sha256" 2>/dev/null) != "$deps_hash" ]]; then
    log "fetching the third-party wheels"
    rm -rf "$deps" && mkdir -p "$deps"
    "$python" - "$services/pyproject.toml" >"$deps/requirements.txt" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"].get("dependencies", [])))
PY
    "$python" -m pip wheel --quiet --disable-pip-version-check --only-binary=:all: \
        --wheel-dir "$deps" --requirement "$deps/requirements.txt"
    echo "$deps_hash" >"$deps/.sha256"
fi
# An in-tree build of the C extension (make venv's editable install) is no source: skipped.
src_hash=$(cd "$services" && find . \( -name __pycache__ -o -name '*.egg-info' -o -name build -o -name '*.so' \) -prune \
    -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [[ $(cat "$app/.sha256" 2>/dev/null) != "$src_hash" ]] || ! compgen -G "$app/gatehouse-*.whl" >/dev/null; then
    log "building the gatehouse wheel"
    # Build from a clean copy: an in-tree build directory could carry deleted modules along.
    src=$REPO_ROOT/build/src/services
    rm -rf "$src" "$app" && mkdir -p "$src" "$app"
    tar -C "$services" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.so' --exclude=./build -cf - . | tar -C "$src" -xf -
    SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check \
        --no-deps --no-build-isolation --wheel-dir "$app" "$src"
    echo "$src_hash" >"$app/.sha256"
fi
log "wheels ready in $(($(now) - step_start)) s"

# --- service images
# The stages of the shared Dockerfile of the Python services ("FROM runtime AS <name>").
services_dir=$REPO_ROOT/files/images/services
mapfile -t service_stages < <(sed -n 's/^FROM runtime AS \([a-z-]*\)$/\1/p' "$services_dir/Dockerfile")
declare -A prepared=()
for name in "${images[@]}"; do
    step_start=$(now)
    dockerfile_dir=$REPO_ROOT/files/images/$name
    target=()
    if [[ " ${service_stages[*]} " == *" $name "* ]]; then
        dockerfile_dir=$services_dir
        target=(--target "$name")
    fi
    [[ -f $dockerfile_dir/Dockerfile ]] || die "no Dockerfile in files/images/$name nor a stage $name in files/images/services/Dockerfile"
    # One context per Dockerfile, prepared once per run (the four service stages share theirs).
    context=$REPO_ROOT/build/images/$(basename "$dockerfile_dir")
    if [[ -z ${prepared[$context]:-} ]]; then
        prepared[$context]=1
        rm -rf "$context" && mkdir -p "$context"
        cp -a "$dockerfile_dir/." "$context/"
        if grep -q '^COPY wheels/' "$dockerfile_dir/Dockerfile"; then
            cp -r "$deps" "$context/wheels"
            cp -r "$app" "$context/app"
            rm -f "$context/wheels/.sha256" "$context/app/.sha256"
        fi
    fi
    # An image with its own requirements.txt (gatehouse/node) gets those wheels as pywheels/,
    # fetched again only when the list changes.
    if [[ -f $dockerfile_dir/requirements.txt ]]; then
        extra=$wheels/$name
        extra_hash=$(sha256sum <"$dockerfile_dir/requirements.txt" | cut -d" " -f1)
        if [[ $(cat "$extra/.sha256" 2>/dev/null) != "$extra_hash" ]]; then
            log "fetching the wheels of files/images/$name/requirements.txt"
            rm -rf "$extra" && mkdir -p "$extra"
            "$python" -m pip wheel --quiet --disable-pip-version-check --only-binary=:all: \
                --wheel-dir "$extra" --requirement "$dockerfile_dir/requirements.txt"
            cp "$dockerfile_dir/requirements.txt" "$extra/requirements.txt"
            echo "$extra_hash" >"$extra/.sha256"
        fi
        cp -r "$extra" "$context/pywheels"
        rm -f "$context/pywheels/.sha256"
    fi
    tag=${REPOSITORY:-gatehouse/}$name:$version
    build_log=$REPO_ROOT/build/images/$name.log
    if ! docker build --network "$network" "${target[@]}" \
        --build-arg "BASE_IMAGE=$base_image" --build-arg "VERSION=$version" \
        --tag "$tag" "$context" >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        die "building $tag failed (full log: build/images/$name.log)"
    fi
    id=$(docker image inspect --format '{{.Id}}' "$tag")
    log "$tag ${id:7:12} ($(($(now) - step_start)) s)"
done
log "images done in $(($(now) - total_start)) s"
