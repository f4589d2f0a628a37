"""Offline stand-in for the pip bootstrap script of ansible-test (its "get-pip").

ansible-test creates each sanity test's virtualenv without pip and bootstraps pip with a script
it downloads from a CI file host, which the project machines cannot reach. hack/sanity.sh puts
this file in ansible-test's cache under the expected name instead. It installs the pip that
ships with Python (ensurepip), then lets that pip install what ansible-test asks for (the pinned
pip version) from the package index, with the machine's usual pip configuration.
"""

import subprocess
import sys

# ansible-test passes get-pip's own options; plain pip does not know them.
GET_PIP_ONLY = ("--no-setuptools", "--no-wheel")

# In a child process: ensurepip empties PIP_* and points PIP_CONFIG_FILE at /dev/null in the
# environment of the process that runs it, which would hide the machine's pip configuration
# (index, certificates) from the install below.
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
