#!/usr/bin/env bash
# make molecule: `molecule test -s <name>` for every scenario directory under molecule/ that has
# a molecule.yml (none is fine). Every scenario runs; the script fails if any of them failed.
# Arguments: scenario names to run instead of all of them.
set -uo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv=$VENV_DIR
cd "$REPO_ROOT" || exit
scenarios=("$@")
if ((${#scenarios[@]} == 0)); then
    for file in molecule/*/molecule.yml; do
        [[ -f $file ]] && scenarios+=("$(basename "$(dirname "$file")")")
    done
fi
if ((${#scenarios[@]} == 0)); then
    log "no Molecule scenarios"
    exit 0
fi

# The scenarios find this checkout's collection themselves (.config/molecule/config.yml).
export PATH=$venv/bin:$PATH
failed=()
for scenario in "${scenarios[@]}"; do
    start=$(now)
    log "molecule test -s $scenario"
    if "$venv/bin/molecule" test -s "$scenario"; then
        log "molecule $scenario: ok ($(($(now) - start)) s)"
    else
        log "molecule $scenario: FAILED ($(($(now) - start)) s)"
        failed+=("$scenario")
    fi
done
((${#failed[@]} == 0)) || die "Molecule scenarios failed: ${failed[*]}"
