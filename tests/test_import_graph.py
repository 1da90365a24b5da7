"""The package's import graph flows one way: no moemerge module imports, directly or through others, a
module that imports it back. Imports are read from the source with ast (also those inside functions and
under TYPE_CHECKING), so a cycle hidden behind a late import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # tests/ sits in the repository root
PACKAGE = ROOT / "moemerge"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The moemerge modules `path` imports (`from moemerge.x import y` counts x, or x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def import_graph(package: Path) -> dict[str, set[str]]:
    files = {module_name(p, package.parent): p for p in package.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path a -> ... -> a, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_moemerge_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40, "the package was not found"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_search_finds_a_cycle_through_a_late_import(tmp_path):
    package = tmp_path / "moemerge"
    (package / "inputs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inputs" / "__init__.py").write_text("")
    (package / "inputs" / "sources.py").write_text("def f():\n    from moemerge.hub import fetch\n")
    (package / "hub.py").write_text("from moemerge.inputs import sources\n")
    graph = import_graph(package)
    assert graph["moemerge.hub"] == {"moemerge.inputs", "moemerge.inputs.sources"}
    assert find_cycle(graph) == ["moemerge.hub", "moemerge.inputs.sources", "moemerge.hub"]
