#!/usr/bin/env bash
# make test: lint first (it fails fast), then the pytest suite and the Molecule scenarios side by
# side. Both spend most of their time waiting on containers starting, Ansible round trips and the
# services' deadlines, so on two cores the pair takes little more than the longer of the two.
# The Molecule side runs MOLECULE_JOBS scenarios at a time (default 1: with pytest that makes two
# streams for two cores; more overloads the machine until the scenarios' own failover and upgrade
# checks time out). Its output goes to build/molecule/ and each scenario is summed up when it ends
# (a failed one is printed whole). Both sides always run to the end; the script fails if either failed.
set -uo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$REPO_ROOT" || exit
started=$(now)
"$REPO_ROOT/hack/lint.sh" || die "lint failed"

mkdir -p build
MOLECULE_JOBS=${MOLECULE_JOBS:-1} MOLECULE_SUMMARY=1 "$REPO_ROOT/hack/molecule.sh" &
molecule_pid=$!
"$REPO_ROOT/hack/pytest.sh" "$@"
pytest_status=$?
wait "$molecule_pid"
molecule_status=$?

log "make test: $(($(now) - started)) s (pytest: exit $pytest_status, Molecule: exit $molecule_status)"
((pytest_status == 0)) || die "pytest failed"
((molecule_status == 0)) || die "Molecule failed"
