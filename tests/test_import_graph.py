"""The shape of the code: no import circle, no module over 400 lines, and search/ never imports exporter/.

The graph is read from the source (``ast``), not by importing anything, and it counts every import
of a project module: at module level, inside a function, and under ``if TYPE_CHECKING:`` alike. A
circle that only type checkers or one code path walk is still a circle for a reader. Importing
``a.b.c`` also runs the packages ``a`` and ``a.b`` first, so an import reaches those ``__init__``
modules too, except the packages the importing module itself lives in (a package importing its own
modules is how packages work, not a circle).

Tests are left out of the graph and of the line limit: they import the whole project by design, and a
test file grows with the cases it checks rather than with what one module does.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "exporter", "scripts")
MAX_LINES = 400

Graph = dict[str, set[str]]


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``module``'s source names in an import statement, wherever it stands."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if submodule in modules else base)
    return {n for n in names if n in modules}


def import_graph(modules: dict[str, Path] | None = None) -> Graph:
    """Module -> the project modules importing it runs (named ones and the packages above them)."""
    modules = module_files() if modules is None else modules
    graph: Graph = {}
    for module, path in modules.items():
        own = {module, *_ancestors(module)}
        targets = set()
        for name in _imported(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", modules):
            targets.update(t for t in (name, *_ancestors(name)) if t in modules and t not in own)
        graph[module] = targets
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph has none (iterative DFS, sorted, so stable)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]


def test_the_graph_counts_function_level_and_type_only_imports_and_parent_packages(tmp_path):
    files = {
        "search/__init__.py": "",
        "search/kinds/__init__.py": "from search.kinds import base\n",
        "search/kinds/base.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from search.plan import Plan\n",
        "search/plan.py": "def make():\n    from search.kinds.base import x\n",
        "exporter/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(module_files(tmp_path))
    assert graph["search.kinds.base"] == {"search.plan"}  # its own packages are not edges
    assert graph["search.plan"] == {"search.kinds", "search.kinds.base"}
    assert find_cycle(graph) == ["search.kinds", "search.kinds.base", "search.plan", "search.kinds"]


def test_no_import_circle_among_the_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_search_never_imports_exporter():
    graph = import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("search") for t in targets
                    if t.startswith("exporter"))
    assert not upward, "search/ imports exporter/: " + ", ".join(upward)


def test_no_module_is_over_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in module_files().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules, each over {MAX_LINES} lines: {long}"
