"""make test turns skips into failures (tests/conftest.py, GATEHOUSE_NO_SKIP=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

SAMPLE = """
import pytest

def test_needs_an_engine():
    pytest.skip("no Docker engine")

def test_plain():
    pass

@pytest.mark.xfail(reason="a known defect")
def test_known():
    assert False
"""


def _run(tmp_path: Path, no_skip: str) -> subprocess.CompletedProcess[str]:
    tree = tmp_path / "tests"
    (tree / "integration").mkdir(parents=True, exist_ok=True)
    shutil.copy(TESTS / "conftest.py", tree / "conftest.py")
    shutil.copy(TESTS / "integration" / "collection_helpers.py", tree / "integration")
    (tree / "test_sample.py").write_text(SAMPLE)
    env = dict(os.environ, GATEHOUSE_NO_SKIP=no_skip)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=line", "-p", "no:cacheprovider", str(tree)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_a_skip_fails_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, "1")
    assert run.returncode == 1, run.stdout
    assert "1 failed, 1 passed, 1 xfailed" in run.stdout
    assert "skipped, which GATEHOUSE_NO_SKIP=1 does not allow: Skipped: no Docker engine" in run.stdout


def test_skips_allowed_when_asked(tmp_path: Path) -> None:
    run = _run(tmp_path, "0")
    assert run.returncode == 0, run.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in run.stdout
