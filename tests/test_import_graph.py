"""The package's import graph flows one way: no moemerge module imports, directly or through others, a
module that imports it back, and no package folder (inputs, gates, formats, output, tools, hub) imports one
that imports it back. Beyond that, every import goes down the layers docs/layout.md states (its `layers`
block): output/ does not reach into tools/, gates/ not into formats/. Imports are read from the source with
ast (also those inside functions and under TYPE_CHECKING), so a cycle hidden behind a late import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # tests/ sits in the repository root
PACKAGE = ROOT / "moemerge"
LAYOUT = ROOT / "docs" / "layout.md"


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


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with each package folder's modules merged into one node (`moemerge.inputs.recipe` ->
    `moemerge.inputs`); a top-level module such as `moemerge.errors` is a node of its own."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    merged: dict[str, set[str]] = {package(name): set() for name in graph}
    for name, targets in graph.items():
        merged[package(name)] |= {package(target) for target in targets} - {package(name)}
    return merged


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


def stated_layers(text: str) -> dict[str, int]:
    """The `layers` block of a layout page: each package folder or top-level module (`moemerge` is the
    package's __init__) → its layer, 0 the lowest."""
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    layers: dict[str, int] = {}
    for line in block.splitlines():
        number, *names = line.split()
        layers |= dict.fromkeys(names, int(number))
    return layers


def short(node: str) -> str:
    return node.removeprefix("moemerge.")


def upward_imports(packages: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import between package nodes that does not go to a lower layer: beside (same layer) or above."""
    return [
        f"{short(node)} -> {short(target)}"
        for node, targets in sorted(packages.items())
        for target in sorted(targets)
        if layers[short(target)] >= layers[short(node)]
    ]


def test_docs_layout_gives_every_folder_and_top_level_module_one_layer():
    packages = package_graph(import_graph(PACKAGE))
    text = LAYOUT.read_text(encoding="utf-8")
    block = text.split("```layers\n", 1)[1].split("```", 1)[0].split()
    named = [word for word in block if not word.isdigit()]
    assert len(named) == len(set(named)), "a name appears on two layers"
    assert set(stated_layers(text)) == {short(node) for node in packages}


def test_imports_go_down_the_layers_docs_layout_states():
    packages = package_graph(import_graph(PACKAGE))
    assert upward_imports(packages, stated_layers(LAYOUT.read_text(encoding="utf-8"))) == []


def test_an_import_beside_or_above_breaks_the_layers():
    """output -> tools (beside), gates -> formats (beside), inputs -> output (above): each named once;
    output -> gates (below) is fine."""
    layers = stated_layers("text\n```layers\n0  inputs\n1  formats gates\n2  output tools\n```\n")
    packages = {
        "moemerge.inputs": {"moemerge.output"},
        "moemerge.gates": {"moemerge.formats", "moemerge.inputs"},
        "moemerge.formats": {"moemerge.inputs"},
        "moemerge.output": {"moemerge.gates", "moemerge.tools"},
        "moemerge.tools": set(),
    }
    assert upward_imports(packages, layers) == ["gates -> formats", "inputs -> output", "output -> tools"]


def test_no_import_cycle_among_moemerge_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40, "the package was not found"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_among_moemerge_packages():
    graph = package_graph(import_graph(PACKAGE))
    assert {"moemerge.inputs", "moemerge.gates", "moemerge.formats", "moemerge.output"} <= set(graph)
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


def test_packages_merge_into_one_node_and_their_cycle_is_found(tmp_path):
    """inputs.prompts -> gates.trained and gates.compute -> inputs.recipe: no module cycle, a package one."""
    package = tmp_path / "moemerge"
    for folder in ("inputs", "gates"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "inputs" / "recipe.py").write_text("from moemerge.errors import x\n")
    (package / "inputs" / "prompts.py").write_text("from moemerge.gates.trained import split_prompts\n")
    (package / "gates" / "trained.py").write_text("")
    (package / "gates" / "compute.py").write_text("from moemerge.inputs import recipe\n")
    graph = import_graph(package)
    assert find_cycle(graph) is None
    packages = package_graph(graph)
    assert packages == {
        "moemerge": set(),
        "moemerge.errors": set(),
        "moemerge.inputs": {"moemerge.errors", "moemerge.gates"},
        "moemerge.gates": {"moemerge.inputs"},
    }
    assert find_cycle(packages) == ["moemerge.gates", "moemerge.inputs", "moemerge.gates"]
