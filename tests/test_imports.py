"""Imports point one way, as DESIGN.md's layout says, and no module imports itself back.

The graph is read from the installed package's source (every `.py` file of `turnrl` and its
subpackages, parsed, never imported): an edge per `import turnrl...` / `from turnrl... import`,
wherever it is written (module level, a function, a class, a `TYPE_CHECKING` block). Direction:

    turnrl    -> everything
    tasks     -> agent, tools, sandboxes
    rl        -> agent, and the records in tools/base.py
    agent     -> tools/base.py only (tools are reached through the `Tool` protocol)
    tools     -> sandboxes
    sandboxes -> nothing
    any folder -> itself

Cycles: among imports that run when a module is imported (module level, outside
`TYPE_CHECKING`); an import inside a function runs later and cannot deadlock an import.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FOLDERS = ("turnrl", "agent", "tools", "sandboxes", "rl", "tasks")
"""The package's folders, by the name of the layer they hold (`turnrl` is the root)."""

ALLOWED: dict[str, frozenset[str]] = {
    "turnrl": frozenset(FOLDERS),
    "tasks": frozenset({"tasks", "agent", "tools", "sandboxes"}),
    "rl": frozenset({"rl", "agent"}),
    "agent": frozenset({"agent"}),
    "tools": frozenset({"tools", "sandboxes"}),
    "sandboxes": frozenset({"sandboxes"}),
}
"""Folders each folder may import from, besides `EXTRA_MODULES`."""

EXTRA_MODULES: dict[str, frozenset[str]] = {
    "rl": frozenset({"turnrl.tools.base"}),
    "agent": frozenset({"turnrl.tools.base"}),
}
"""Single modules of another folder a folder may import."""


@dataclass(frozen=True)
class Edge:
    """One import of a turnrl module by another."""

    source: str
    """The importing module (`turnrl.rl.rewards`)."""
    target: str
    """The imported module (`turnrl.tasks.grading`)."""
    where: str
    """File and line of the import statement."""
    at_import: bool
    """Runs when `source` is imported (module level, not under `TYPE_CHECKING`)."""


def _package_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the installed package."""
    modules: dict[str, Path] = {}
    for folder in FOLDERS:
        package = "turnrl" if folder == "turnrl" else f"turnrl.{folder}"
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, package
        (root,) = {Path(p) for p in spec.submodule_search_locations}
        for path in sorted(root.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDERS) else "turnrl"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.Module, module: str, is_package: bool
) -> list[tuple[str, list[str], int, bool]]:
    """`(imported module, names imported from it, line, runs at import)` of each statement."""
    out: list[tuple[str, list[str], int, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno, at_import) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rsplit(".", 1)[0]
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((base, [a.name for a in node.names], node.lineno, at_import))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, at_import)

    visit(tree, True)
    return out


def import_graph() -> list[Edge]:
    """Every import of a turnrl module by a turnrl module."""
    files = _package_files()
    edges: list[Edge] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.stem == "__init__"
        where = f"{_folder(module)}/{path.name}" if module != "turnrl" else "turnrl/__init__.py"
        for base, names, line, at_import in _imports(tree, module, is_package):
            if base != "turnrl" and not base.startswith("turnrl."):
                continue
            # `from turnrl.tools import base` imports the module `turnrl.tools.base`.
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in files] or [base]
            for target in targets:
                if target in files and target != module:
                    edges.append(Edge(module, target, f"{where}:{line}", at_import))
    return edges


def wrong_way(edges: list[Edge]) -> list[str]:
    """The edges DESIGN.md's direction forbids, one line each."""
    bad = []
    for e in edges:
        source, target = _folder(e.source), _folder(e.target)
        if target in ALLOWED[source] or e.target in EXTRA_MODULES.get(source, frozenset()):
            continue
        bad.append(f"{e.source} -> {e.target} ({e.where})")
    return sorted(set(bad))


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), over the imports
    that run at import time; each sorted, the list sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.at_import:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_the_graph_sees_every_folder_and_both_kinds_of_import() -> None:
    """The reader itself: it finds modules in every folder, and imports at module level, in
    functions and under `TYPE_CHECKING` (so an empty result below means something)."""
    edges = import_graph()
    assert {_folder(m) for m in _package_files()} == set(FOLDERS)
    assert any(e.at_import for e in edges) and any(not e.at_import for e in edges)
    by_pair = {(e.source, e.target): e for e in edges}
    # Known imports of each kind (a function-level and a TYPE_CHECKING one).
    assert by_pair[("turnrl.tasks.search_qa_config", "turnrl.tasks.search_qa")].at_import is False
    assert by_pair[("turnrl.tasks.suite_config", "turnrl.tasks.base")].at_import is False
    assert by_pair[("turnrl.config", "turnrl.tasks.registry")].at_import is True


def test_rules_and_cycle_finder_on_a_made_up_graph() -> None:
    edges = [
        Edge("turnrl.agent.runner", "turnrl.tools.base", "a", True),
        Edge("turnrl.agent.runner", "turnrl.tools.function", "b", True),
        Edge("turnrl.rl.rewards", "turnrl.tasks.grading", "c", False),
        Edge("turnrl.tasks.base", "turnrl.agent.records", "d", True),
        Edge("turnrl.tools.python", "turnrl.sandboxes.base", "e", True),
        Edge("turnrl.sandboxes.base", "turnrl.tools.base", "f", True),
        Edge("turnrl.config", "turnrl.rl.rewards", "g", True),
        Edge("turnrl.agent.graph", "turnrl.agent.runner", "h", True),
        Edge("turnrl.agent.runner", "turnrl.agent.graph", "i", True),
        Edge("turnrl.agent.records", "turnrl.agent.store", "j", False),
        Edge("turnrl.agent.store", "turnrl.agent.records", "k", True),
    ]
    assert wrong_way(edges) == [
        "turnrl.agent.runner -> turnrl.tools.function (b)",
        "turnrl.rl.rewards -> turnrl.tasks.grading (c)",
        "turnrl.sandboxes.base -> turnrl.tools.base (f)",
    ]
    assert cycles(edges) == [["turnrl.agent.graph", "turnrl.agent.runner"]]


def test_imports_point_one_way() -> None:
    bad = wrong_way(import_graph())
    assert bad == [], "imports against DESIGN.md's direction:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles (module level):\n" + "\n".join(map(" <-> ".join, found))


@pytest.mark.parametrize("module", ["turnrl.config", "turnrl.cli"])
def test_config_imports_no_heavy_library(module: str) -> None:
    """A run config loads without torch, transformers, peft, the HTTP client or the MCP SDK
    (checked in a fresh interpreter: this one has imported them all)."""
    heavy = ("torch", "transformers", "peft", "httpx", "mcp")
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == []


def test_loading_every_example_config_imports_no_heavy_library() -> None:
    """Validation too (the run-level checks), not only the import: `turnrl train --help` and a
    config error answer without loading a model library."""
    heavy = ("torch", "transformers", "peft", "httpx", "mcp")
    code = (
        "import sys, pathlib\n"
        "from turnrl.config import load_config\n"
        "for p in sorted(pathlib.Path('examples').glob('*.yaml')):\n"
        "    load_config(p)\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=root,
    )
    assert result.stdout.split() == []
