"""The package's shape: no import cycles.

**Imports.** The graph has one node per module under ``src/clipforge`` (a package is its ``__init__``) and an
edge for every ``import`` in the module, at module level or inside a function alike: a function-local import
only delays a cycle to the first call, it does not remove it. ``from pkg import name`` is an import of
``pkg.name`` when that is a module, else of ``pkg``; relative imports are resolved. Importing ``a.b.c`` also
runs the ``__init__`` of ``a.b``, so it is an edge to ``a.b`` too, unless ``a.b`` is a package the importing
module itself lives in (Python has already run that ``__init__`` before the module).

The rule for packages that re-export:

- a package's ``__init__`` may import its own submodules (``clipforge/__init__.py`` gathers the public API;
  ``clipforge.objectives`` its objectives) -- it is the top of its package;
- no module imports from a package it lives in (no ``from clipforge import __version__`` inside clipforge, no
  ``from clipforge.objectives import get_objective`` inside ``clipforge.objectives``): it imports the
  submodule that defines the name. Shared code moves down to a module both can import
  (``clipforge.version``, ``clipforge.objectives.registry``);
- the graph has no cycle, so the packages form layers; ``docs/architecture.md`` draws them.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "clipforge"

# Edges that close a cycle, kept only until the one file each fix must edit is free. Each is listed with the cycle
# it closes and what would break it; nothing else may be added here. Empty since issue 13 moved the tower table
# (clipforge.tower_specs) and the shared errors (clipforge.errors) below config, model and checkpoint.
ALLOWED_EDGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _nearest_module(name: str, modules: dict) -> str:
    while name not in modules:
        name = name.rsplit(".", 1)[0]
    return name


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, is_package: bool, modules: dict) -> dict[str, int]:
    """The clipforge modules ``name`` imports explicitly, each with the line of its first import."""
    package = name if is_package else name.rsplit(".", 1)[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                out.setdefault(_nearest_module(target, modules), node.lineno)
    out.pop(name, None)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, with the package ``__init__`` edges the docstring describes."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        explicit = _imports(name, path, is_package, modules)
        own = set(_ancestors(name))
        edges = dict(explicit)
        for target, line in explicit.items():
            for package in _ancestors(target):
                if package not in own:
                    edges.setdefault(package, line)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_import_graph_sees_function_local_and_package_imports() -> None:
    graph = import_graph()
    # A function-local import: ContrastiveObjective.zero_shot_scorer imports eval.zeroshot when called.
    assert "clipforge.eval.zeroshot" in graph["clipforge.objectives.contrastive"]
    # ... and importing clipforge.eval.zeroshot runs clipforge/eval/__init__.py first.
    assert "clipforge.eval" in graph["clipforge.objectives.contrastive"]
    # A package __init__ importing its submodules.
    assert "clipforge.objectives.registry" in graph["clipforge.objectives"]
    # A module's own package is not an edge: Python ran that __init__ before the module.
    assert "clipforge.objectives" not in graph["clipforge.objectives.registry"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    for source, target in ALLOWED_EDGES:
        assert target in graph[source], f"allowed edge {source} -> {target} is gone: remove it from the list"
        del graph[source][target]
    problems = []
    for component in _cycles(graph):
        members = set(component)
        edges = [
            f"    {source} -> {target} (line {line})"
            for source in component
            for target, line in sorted(graph[source].items())
            if target in members
        ]
        problems.append("cycle among " + ", ".join(component) + ":\n" + "\n".join(edges))
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_no_module_imports_its_own_package() -> None:
    modules = _modules()
    offenders = []
    for name, (path, is_package) in modules.items():
        for target, line in _imports(name, path, is_package, modules).items():
            if target in _ancestors(name):
                offenders.append(f"{name} imports {target} (line {line}), a package it is part of")
    assert not offenders, "\n".join(offenders)
