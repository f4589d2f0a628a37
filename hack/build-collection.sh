#!/usr/bin/env bash
# make collection: dist/gatehouse-access-<version>.tar.gz, built by ansible-galaxy from the
# files a commit would hold (hack/export-tree.sh), so stray local files never ship.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv=$VENV_DIR
dist=${1:-$REPO_ROOT/dist}
work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-collection.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$REPO_ROOT/hack/export-tree.sh" "$work/ansible_collections/gatehouse/access"
mkdir -p "$dist"
"$venv/bin/ansible-galaxy" collection build --force --output-path "$dist" \
    "$work/ansible_collections/gatehouse/access" >/dev/null
log "$dist/gatehouse-access-$(gatehouse_version).tar.gz"
