#!/usr/bin/env bash
# make lint: ruff (check + format), antsibull-changelog, ansible-lint (production profile) and
# ansible-test sanity. Every linter runs; the script fails if any of them failed.
set -uo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=hack/collection-tree.sh
source "$REPO_ROOT/hack/collection-tree.sh"

venv=$VENV_DIR
cd "$REPO_ROOT" || exit
failed=()
step() {
    local name=$1 start
    shift
    start=$(now)
    log "$name"
    if "$@"; then
        log "$name: ok ($(($(now) - start)) s)"
    else
        log "$name: FAILED ($(($(now) - start)) s)"
        failed+=("$name")
    fi
}

python_paths=(plugins files/services tests bench hack)
step "ruff check" "$venv/bin/ruff" check "${python_paths[@]}"
step "ruff format --check" "$venv/bin/ruff" format --check "${python_paths[@]}"
step "antsibull-changelog lint" "$venv/bin/antsibull-changelog" lint

tree=$(make_collection_tree)
trap 'rm -rf "$tree"' EXIT
# ansible-lint resolves gatehouse.access.* through this tree; offline (see .ansible-lint).
step "ansible-lint" env ANSIBLE_COLLECTIONS_PATH="$tree" PATH="$venv/bin:$PATH" \
    "$venv/bin/ansible-lint" --nocolor --format pep8
step "ansible-test sanity" "$REPO_ROOT/hack/sanity.sh"

if ((${#failed[@]})); then
    die "lint failed: ${failed[*]}"
fi
log "lint passed"
