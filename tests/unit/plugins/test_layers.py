"""The module layer keeps the shape docs/architecture.md draws.

plugins/module_utils has one subpackage per concern, in layers: modules and lookups on top, then
the deployment modules on the engine (_deploy), then the product back-ends and operations (_halb,
_broker_api, _ops), then the shared backends (_docker, _crypto), then _common. A file imports only from its own subpackage or from a lower layer, no
subpackage imports in a cycle, and nothing sits flat in module_utils. The services under
files/services never import Ansible, and the plugins never import the services (they run on
managed hosts where the services are not installed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PLUGINS = REPO / "plugins"
MODULE_UTILS = PLUGINS / "module_utils"
PREFIX = "ansible_collections.gatehouse.access.plugins.module_utils."

# Lower number = lower layer. A package may import its own layer's package only if it is itself.
LAYERS = {
    "_common": 0,
    "_docker": 1,
    "_crypto": 1,
    "_deploy": 3,
    "_halb": 2,
    "_broker_api": 2,
    "_ops": 2,
}
TOP = 4  # plugins/modules, plugins/lookup


def _imports(path: Path) -> list[str]:
    """Dotted names a file imports from the collection's module_utils (``pkg.module`` or ``pkg``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX):
            rest = node.module[len(PREFIX) :]
            if "." in rest:
                found.append(rest)
            else:  # from ...module_utils._pkg import module
                found.extend(f"{rest}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend(a.name[len(PREFIX) :] for a in node.names if a.name.startswith(PREFIX))
    return found


def _package(path: Path) -> str:
    return path.relative_to(MODULE_UTILS).parts[0]


def _all_plugin_files() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_utils_file_is_in_a_known_subpackage_and_every_init_is_empty() -> None:
    for path in MODULE_UTILS.rglob("*.py"):
        rel = path.relative_to(MODULE_UTILS)
        assert len(rel.parts) == 2, f"{rel}: module_utils files live in a subpackage"
        assert rel.parts[0] in LAYERS, f"{rel}: unknown subpackage; add it to LAYERS and docs/architecture.md"
        if path.name == "__init__.py":
            assert path.read_text(encoding="utf-8") == "", f"{rel}: ansible-test wants empty __init__.py"
    for package in LAYERS:
        assert (MODULE_UTILS / package / "__init__.py").is_file(), package


@pytest.mark.parametrize("path", _all_plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_imports_go_down_the_layers(path: Path) -> None:
    inside = MODULE_UTILS in path.parents
    own = _package(path) if inside else None
    level = LAYERS[own] if own else TOP
    for name in _imports(path):
        target = name.split(".")[0]
        assert target in LAYERS, f"{path.name} imports {name}, which is not a module_utils subpackage"
        assert target == own or LAYERS[target] < level, (
            f"{path.relative_to(PLUGINS)} (layer {level}) imports {name} (layer {LAYERS[target]})"
        )
        module = MODULE_UTILS / (name.replace(".", "/") + ".py")
        assert module.is_file(), f"{path.relative_to(PLUGINS)} imports {name}, which does not exist"


def test_no_import_cycle_between_module_utils_files() -> None:
    graph = {}
    for path in MODULE_UTILS.rglob("*.py"):
        if path.name != "__init__.py":
            name = ".".join(path.relative_to(MODULE_UTILS).with_suffix("").parts)
            graph[name] = set(_imports(path)) - {name}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_services_and_plugins_do_not_import_each_other() -> None:
    services = REPO / "files" / "services" / "gatehouse"
    for path in services.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith(("ansible", "ansible_collections")), f"{path}: imports {name}"
    for path in _all_plugin_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("gatehouse"), (
                    f"{path}: imports the services ({node.module})"
                )


def test_the_layer_check_sees_a_violation(tmp_path: Path) -> None:
    """The parser finds both import forms, so a wrong import cannot slip past unseen."""
    sample = tmp_path / "x.py"
    sample.write_text(
        f"from {PREFIX}_deploy import cmsg as c\nfrom {PREFIX}_halb.render import normalize\n",
        encoding="utf-8",
    )
    assert _imports(sample) == ["_deploy.cmsg", "_halb.render"]
