#!/usr/bin/env bash
# ansible-test sanity on exactly what the collection ships, as Galaxy's importer does: the
# files a commit would hold (hack/export-tree.sh: tracked plus untracked files that .gitignore
# does not exclude) are built into the collection tarball (galaxy.yml build_ignore applies),
# which is unpacked to a temporary <tmp>/ansible_collections/gatehouse/access - ansible-test
# needs that layout, and a copy outside the checkout keeps it from consulting git.
#
# ansible-test runs with the venv's Python (--python 3.11, --local); each sanity test that needs
# tools of its own (pylint, yamllint, voluptuous, ...) gets a virtualenv that ansible-test creates
# and fills from PyPI on first use (cached in ~/.ansible/test). The test of the shell scripts
# needs the program from the Debian package of that name; the PowerShell test is skipped
# without pwsh.
#
# Arguments are passed to ansible-test, e.g. hack/sanity.sh --test validate-modules
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

venv=$VENV_DIR
python_version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# ansible-test bootstraps pip in its test virtualenvs with a script from a CI file host that is
# unreachable here; provide the offline stand-in under the name it looks for.
pip_version=$(cd / && "$venv/bin/python" -c 'import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="'"$python_version"'"))["pip"])')
get_pip=$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py
if [[ ! -f $get_pip ]]; then
    mkdir -p "$(dirname "$get_pip")"
    cp "$REPO_ROOT/hack/ansible-test-get-pip.py" "$get_pip"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-sanity.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$REPO_ROOT/hack/build-collection.sh" "$work/dist" >/dev/null 2>&1 ||
    "$REPO_ROOT/hack/build-collection.sh" "$work/dist"
collection=$work/ansible_collections/gatehouse/access
mkdir -p "$collection"
tar -C "$collection" -xzf "$work/dist/gatehouse-access-$(gatehouse_version).tar.gz"
cd "$collection"
color=yes
[[ -n ${CI:-} || ! -t 1 ]] && color=no
PATH="$venv/bin:$PATH" "$venv/bin/ansible-test" sanity --local --python "$python_version" \
    --color "$color" "$@"
