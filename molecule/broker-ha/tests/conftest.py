import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "_shared"))

from conftest_common import groups, hostvars

__all__ = ["groups", "hostvars"]
