#!/usr/bin/env bash
# export-tree.sh DEST: copy the files of the repository that a commit would contain (tracked
# files plus untracked files that .gitignore does not exclude) to DEST. Used to build the
# collection and to run ansible-test on exactly what would be shipped.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dest=${1:?usage: export-tree.sh DEST}
mkdir -p "$dest"
cd "$REPO_ROOT"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Files deleted in the work tree are still listed by git until the deletion is committed.
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do
            if [[ -e $file || -L $file ]]; then printf '%s\0' "$file"; fi
        done |
        tar --null --no-recursion -T - -cf - | tar -C "$dest" -xf -
else
    tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git \
        --exclude=__pycache__ --exclude=./.gatehouse-demo -cf - . | tar -C "$dest" -xf -
fi
