#!/usr/bin/env bash
# make pytest: the unit, integration and security tests. Arguments are passed to pytest.
# A skipped test fails the run (GATEHOUSE_NO_SKIP=1, tests/conftest.py), and so does collecting
# no test at all: a missing engine, image or tool must not pass as green. GATEHOUSE_NO_SKIP=0
# allows skips on a workstation without Docker.
set -uo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv=$VENV_DIR
cd "$REPO_ROOT" || exit
paths=()
for dir in tests/unit tests/integration tests/security; do
    [[ -d $dir ]] && paths+=("$dir")
done
((${#paths[@]})) || die "no tests/unit, tests/integration or tests/security"
export GATEHOUSE_NO_SKIP=${GATEHOUSE_NO_SKIP:-1}
"$venv/bin/pytest" "${paths[@]}" "$@"
status=$?
((status != 5)) || log "pytest collected no tests"
exit "$status"
