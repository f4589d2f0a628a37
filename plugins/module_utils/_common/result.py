# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one way a module of the collection ends (private to the collection).

A module's logic returns a result dict; ``finish()`` turns it into the module's answer:

- ``warnings_list`` (optional) becomes Ansible warnings, in order, and is not returned;
- ``diff`` is returned in diff mode only, and only when it holds something;
- ``failed`` (optional) ends the module with fail_json, which needs ``msg``; every other key is
  returned as it is, on success and on failure.

Logic that has to stop early raises ``Failure`` with the keys of its failed result.
"""

from __future__ import annotations


class Failure(Exception):
    """Ends the module as failed with ``msg`` and the further keys of ``result``."""

    def __init__(self, msg: str, **result) -> None:
        super().__init__(msg)
        self.result = dict(result, failed=True, msg=msg)


def finish(module, result: dict, keep_diff: bool = False) -> None:
    """End ``module`` with ``result`` (see the module docstring); does not return.

    ``keep_diff`` returns ``diff`` as it is, also outside diff mode and when empty: the halb
    module has always done so and playbooks may read it.
    """
    result = dict(result)
    for warning in result.pop("warnings_list", None) or []:
        module.warn(warning)
    diff = result.pop("diff", None)
    if (keep_diff and diff is not None) or (module._diff and diff):
        result["diff"] = diff
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


def fail(module, msg: str, **result) -> None:
    """End ``module`` as failed with ``msg`` (a refused option, a missing library); does not return."""
    finish(module, Failure(msg, **result).result)
