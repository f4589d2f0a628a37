#!/usr/bin/env bash
# make molecule: `molecule test -s <name>` for every scenario directory under molecule/ that has
# a molecule.yml (none is fine). Every scenario runs; the script fails if any of them failed.
# Arguments: scenario names to run instead of all of them.
#
# MOLECULE_JOBS scenarios run at once (default 2). A scenario is mostly waiting on containers
# starting and on Ansible round trips, so two of them share two cores well; each has its own
# networks, host containers and state directory, so they cannot see each other. Each scenario's
# output goes to build/molecule/<name>.log and is printed whole when it ends, never interleaved.
set -uo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv=$VENV_DIR
cd "$REPO_ROOT" || exit
jobs=${MOLECULE_JOBS:-2}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "MOLECULE_JOBS must be a positive integer, not '$jobs'"
scenarios=("$@")
if ((${#scenarios[@]} == 0)); then
    # The longest first, so that the last ones to start are short and the slots end together.
    for scenario in broker-ha ha upgrade identity multisite tenants lan dmz default; do
        [[ -f molecule/$scenario/molecule.yml ]] && scenarios+=("$scenario")
    done
    for file in molecule/*/molecule.yml; do
        [[ -f $file ]] || continue
        scenario=$(basename "$(dirname "$file")")
        [[ " ${scenarios[*]} " == *" $scenario "* ]] || scenarios+=("$scenario")
    done
fi
if ((${#scenarios[@]} == 0)); then
    log "no Molecule scenarios"
    exit 0
fi

# The scenarios find this checkout's collection themselves (.config/molecule/config.yml); the link
# is made here once rather than by scenarios racing each other in their prepare step.
export PATH=$venv/bin:$PATH
mkdir -p build/collections/ansible_collections/gatehouse build/molecule
ln -sfn ../../../.. build/collections/ansible_collections/gatehouse/access

# Runs one scenario into its log; the exit status is the scenario's.
run_scenario() {
    local scenario=$1 start status
    start=$(now)
    "$venv/bin/molecule" test -s "$scenario" >"build/molecule/$scenario.log" 2>&1 </dev/null
    status=$?
    echo "$(($(now) - start))" >"build/molecule/$scenario.seconds"
    return "$status"
}

# Prints a finished scenario's log (with MOLECULE_SUMMARY=1, only the play recaps and the verify
# result unless it failed) and its result; records a failure.
failed=()
report() {
    local scenario=$1 status=$2 seconds
    seconds=$(cat "build/molecule/$scenario.seconds" 2>/dev/null || echo "?")
    if [[ ${MOLECULE_SUMMARY:-0} == 1 && $status == 0 ]]; then
        log "molecule test -s $scenario (summary; whole output in build/molecule/$scenario.log)"
        sed 's/\x1b\[[0-9;]*m//g' "build/molecule/$scenario.log" |
            grep -E 'PLAY RECAP| : ok=|INFO .*(Running|Executed)|=+ .*(passed|failed|error).* =+' || true
    else
        log "molecule test -s $scenario (output follows)"
        cat "build/molecule/$scenario.log"
    fi
    if ((status == 0)); then
        log "molecule $scenario: ok ($seconds s)"
    else
        log "molecule $scenario: FAILED ($seconds s)"
        failed+=("$scenario")
    fi
}

declare -A running=() # pid -> scenario
started=$(now)
log "Molecule: ${scenarios[*]} (${jobs} at a time)"
for scenario in "${scenarios[@]}"; do
    while ((${#running[@]} >= jobs)); do
        wait -n -p pid
        status=$?
        report "${running[$pid]}" "$status"
        unset "running[$pid]"
    done
    run_scenario "$scenario" &
    running[$!]=$scenario
done
while ((${#running[@]} > 0)); do
    wait -n -p pid
    status=$?
    report "${running[$pid]}" "$status"
    unset "running[$pid]"
done
log "Molecule: ${#scenarios[@]} scenarios in $(($(now) - started)) s"
((${#failed[@]} == 0)) || die "Molecule scenarios failed: ${failed[*]}"
