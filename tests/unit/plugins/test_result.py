"""finish(): the one way every module of the collection ends (module_utils._common.result)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration"))
importlib.import_module("collection_helpers").ensure_importable()
result_utils = importlib.import_module(
    "ansible_collections.gatehouse.access.plugins.module_utils._common.result"
)


class Ended(Exception):
    pass


class Module:
    def __init__(self, diff: bool) -> None:
        self._diff = diff
        self.warnings: list[str] = []
        self.ended: tuple[str, dict] | None = None

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def exit_json(self, **result) -> None:
        self.ended = ("exit", result)
        raise Ended

    def fail_json(self, **result) -> None:
        self.ended = ("fail", result)
        raise Ended


def end(result: dict, diff: bool = False, keep_diff: bool = False) -> Module:
    module = Module(diff)
    with pytest.raises(Ended):
        result_utils.finish(module, result, keep_diff=keep_diff)
    return module


def test_warnings_become_warnings_and_are_not_returned() -> None:
    module = end({"changed": True, "warnings_list": ["one", "two"]})
    assert module.warnings == ["one", "two"]
    assert module.ended == ("exit", {"changed": True})


@pytest.mark.parametrize(
    ("diff_mode", "diff", "returned"),
    [(True, [{"before": "a", "after": "b"}], True), (False, [{"before": "a"}], False), (True, [], False)],
)
def test_diff_only_in_diff_mode_and_only_when_there_is_one(
    diff_mode: bool, diff: list, returned: bool
) -> None:
    module = end({"changed": False, "diff": diff}, diff=diff_mode)
    assert ("diff" in module.ended[1]) is returned


def test_keep_diff_returns_it_as_it_is() -> None:
    assert end({"changed": False, "diff": []}, keep_diff=True).ended == (
        "exit",
        {"changed": False, "diff": []},
    )
    assert end({"changed": False}, keep_diff=True).ended == ("exit", {"changed": False})


def test_failed_result_fails_with_its_keys_after_its_warnings() -> None:
    module = end({"failed": True, "msg": "no", "changed": False, "warnings_list": ["careful"]})
    assert module.warnings == ["careful"]
    assert module.ended == ("fail", {"msg": "no", "changed": False})


def test_failure_and_fail_carry_msg_and_keys() -> None:
    failure = result_utils.Failure("broken", changed=True, changed_files=["/x"])
    assert str(failure) == "broken"
    assert failure.result == {"failed": True, "msg": "broken", "changed": True, "changed_files": ["/x"]}
    module = Module(False)
    with pytest.raises(Ended):
        result_utils.fail(module, "missing library", exception="trace")
    assert module.ended == ("fail", {"msg": "missing library", "exception": "trace"})
