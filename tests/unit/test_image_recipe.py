"""The Debian test images are rebuilt when their recipe changes.

hack/build-debian-image.sh labels each image with a hash that includes DEBIAN_IMAGE_RECIPE, a name
given by hand to the recipe: ``debian_rootfs`` of hack/lib.sh (mmdebstrap) and the script's
``docker import``. This test holds the fingerprint of the recipe under its current name, so a
change of the recipe fails here until DEBIAN_IMAGE_RECIPE gets a new value (and the fingerprint
below is recorded for it): images built by the old recipe are then no longer taken as current.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LIB = REPO_ROOT / "hack" / "lib.sh"
SCRIPT = REPO_ROOT / "hack" / "build-debian-image.sh"
# DEBIAN_IMAGE_RECIPE -> sha256 of the recipe's text.
RECIPES = {
    "bc2b50dd069ba17f05171f5ddfda89cd53de37499246ad912963910a37de911a": "a06c1e32d421a47c7de94c4e577db4a0ae415c2d5c2d6682253f2fa56a9098ed",
}


def _function(text: str, name: str) -> str:
    match = re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.S | re.M)
    assert match, f"{name}() is not in hack/lib.sh"
    return match.group(0)


def _import(text: str) -> str:
    match = re.search(r"^docker import \\\n.*?>/dev/null\n", text, re.S | re.M)
    assert match, "build-debian-image.sh has no docker import"
    return match.group(0)


def fingerprint() -> str:
    recipe = _function(LIB.read_text(), "debian_rootfs") + _import(SCRIPT.read_text())
    return hashlib.sha256(recipe.encode()).hexdigest()


def test_a_changed_recipe_gets_a_new_name() -> None:
    name = re.search(r"^DEBIAN_IMAGE_RECIPE=([0-9a-z.-]+)$", SCRIPT.read_text(), re.M)
    assert name, "build-debian-image.sh sets no DEBIAN_IMAGE_RECIPE"
    assert RECIPES.get(name.group(1)) == fingerprint(), (
        "the recipe of the Debian images changed: give DEBIAN_IMAGE_RECIPE in hack/build-debian-image.sh a "
        f"new value and record it here with the fingerprint {fingerprint()}"
    )


def test_the_fingerprint_covers_the_mmdebstrap_options_and_the_import() -> None:
    lib, script = LIB.read_text(), SCRIPT.read_text()
    assert "--variant=minbase" in _function(lib, "debian_rootfs")
    assert "LABEL gatehouse.image=$name" in _import(script)
