"""No module under varq/ imports a module that imports it back, not even inside a function.

The graph is read from the source with ``ast``: top-level and function-level imports, relative imports resolved,
``if TYPE_CHECKING:`` blocks ignored (they never run). ``from varq.x import y`` is an edge to ``varq.x.y`` when that
is a module and to ``varq.x`` otherwise; importing ``varq.x.y`` is not counted as an edge to ``varq.x`` (Python
runs the parent package's ``__init__`` first, but that is a property of packages, not a dependency).

Registries import their entries by name (``importlib.import_module``): a module that calls it has an edge to every
module a string literal in it names (to every module directly inside a package it names when it also lists packages
with ``pkgutil``: a registry that scans a package imports them all), and to every module under ``varq.x`` when an
f-string starts with ``"varq.x."``. That is how ``config → quant.registry → quant.methods.* → config`` becomes
visible.
"""

from __future__ import annotations

import ast
from pathlib import Path

import varq

ROOT = Path(varq.__file__).resolve().parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name → file of every module of the package rooted at ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node outside ``if TYPE_CHECKING:`` bodies (their ``else`` branches do run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _calls_import_module(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
        or (isinstance(n.func, ast.Name) and n.func.id in ("import_module", "__import__"))) for n in ast.walk(tree))


def _scans_packages(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "pkgutil"
               for n in ast.walk(tree))


def _dynamic_targets(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Modules named by string literals (and f-string prefixes) of a module that imports by name."""
    targets = set()
    scans = _scans_packages(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            targets.add(node.value)
            if scans and modules[node.value].name == "__init__.py":
                prefix = node.value + "."
                targets.update(m for m in modules if m.startswith(prefix) and "." not in m[len(prefix):])
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            prefix = str(node.values[0].value)
            if prefix.endswith(".") and prefix[:-1] in modules:
                targets.update(m for m in modules if m.startswith(prefix))
    return targets


def import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (source at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = _dynamic_targets(tree, modules) if _calls_import_module(tree) else set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _nearest_module(alias.name, modules)
                if target is not None:
                    targets.add(target)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            full = f"{source}.{alias.name}"
            target = full if full in modules else _nearest_module(source, modules)
            if target is not None:
                targets.add(target)
    targets.discard(name)
    return targets


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: import_edges(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles (a → … → a) of every strongly connected component with more than one module (Tarjan): the shortest
    cycle through each of its modules, each cycle once, starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles: list[list[str]] = []
    for component in sorted(components):
        for start in component:
            cycle = _cycle_through(graph, set(component), start)
            first = cycle.index(min(cycle))
            cycle = cycle[first:-1] + cycle[:first] + [cycle[first]]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """The shortest cycle through ``start`` inside its component, as a path that returns to it (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} lies on no cycle of {sorted(members)}")


# ---------------------------------------------------------------------------------------------------- the walker
def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path / "pkg", "pkg")


def test_walker_sees_function_level_and_relative_imports(tmp_path):
    graph = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg.sub import b\n",
        "sub/__init__.py": "X = 1\n",
        "sub/b.py": "from ..c import thing\nfrom . import X\n",
        "c.py": "import pkg.sub.b as bb\nthing = 1\n",
    })
    assert graph["pkg.a"] == {"pkg.sub.b"}  # a submodule named in from-import, inside a function
    assert graph["pkg.sub.b"] == {"pkg.c", "pkg.sub"}  # ..c resolved; `from . import X` is the package itself
    assert graph["pkg.c"] == {"pkg.sub.b"}  # no implicit edge to pkg.sub's __init__
    assert find_cycles(graph) == [["pkg.c", "pkg.sub.b", "pkg.c"]]


def test_walker_ignores_type_checking_but_not_its_else(tmp_path):
    graph = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nimport typing\nif TYPE_CHECKING:\n    from pkg import b\n"
                "if typing.TYPE_CHECKING:\n    import pkg.b\nelse:\n    import pkg.c\n",
        "b.py": "import pkg.a\n",
        "c.py": "",
    })
    assert graph["pkg.a"] == {"pkg.c"}
    assert find_cycles(graph) == []


def test_walker_follows_imports_by_name(tmp_path):
    graph = _package(tmp_path, {
        "__init__.py": "",
        "registry.py": "import importlib\nMODS = {'a': 'pkg.methods.a'}\n"
                       "def load(n):\n    return importlib.import_module(MODS[n])\n",
        "builders.py": "from importlib import import_module\ndef load(n):\n    return import_module(f'pkg.methods.{n}')\n",
        "scan.py": "import importlib, pkgutil\nPACKAGE = 'pkg.methods'\ndef load_all():\n"
                   "    for info in pkgutil.iter_modules(importlib.import_module(PACKAGE).__path__):\n"
                   "        importlib.import_module(f'{PACKAGE}.{info.name}')\n",
        "names.py": "NAMES = ('pkg.methods.a',)  # a string, but nothing imports by name here\n",
        "byname.py": "import importlib\nROOT = 'pkg.methods'  # a package named, but not scanned\n"
                     "def load(n):\n    return importlib.import_module(n)\n",
        "methods/__init__.py": "",
        "methods/a.py": "from pkg import registry, scan\n",
        "methods/b.py": "",
    })
    assert graph["pkg.registry"] == {"pkg.methods.a"}
    assert graph["pkg.builders"] == {"pkg.methods.a", "pkg.methods.b"}
    assert graph["pkg.scan"] == {"pkg.methods", "pkg.methods.a", "pkg.methods.b"}
    assert graph["pkg.names"] == set()
    assert graph["pkg.byname"] == {"pkg.methods"}
    assert find_cycles(graph) == [["pkg.methods.a", "pkg.registry", "pkg.methods.a"],
                                  ["pkg.methods.a", "pkg.scan", "pkg.methods.a"]]


def test_cycle_is_reported_as_a_closed_path(tmp_path):
    graph = {"x": {"y"}, "y": {"z"}, "z": {"x", "w"}, "w": set(), "p": {"q"}, "q": {"p"}}
    assert find_cycles(graph) == [["p", "q", "p"], ["x", "y", "z", "x"]]


# ---------------------------------------------------------------------------------------------------- varq itself
def test_varq_has_no_import_cycles():
    graph = import_graph(ROOT, "varq")
    assert "varq.pipeline" in graph and "varq.config" in graph["varq.pipeline"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in varq:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_config_is_a_leaf():
    """The schemas import nothing from varq, so every module can use them without pulling in methods or models."""
    assert import_graph(ROOT, "varq")["varq.config"] == set()
