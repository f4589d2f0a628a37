# shellcheck shell=bash
# Sourced: make_collection_tree prints a temporary directory holding
# ansible_collections/gatehouse/access -> the checkout, for ANSIBLE_COLLECTIONS_PATH.
# The caller removes it (rm -rf).
make_collection_tree() {
    local tree
    tree=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-collections.XXXXXX")
    mkdir -p "$tree/ansible_collections/gatehouse"
    ln -s "$REPO_ROOT" "$tree/ansible_collections/gatehouse/access"
    echo "$tree"
}
