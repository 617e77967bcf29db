"""Layering without circles: every import in the package is parsed (lazy ones inside functions too), and no file,
and no package, imports itself back round a circle. The pipeline's direction is cli -> api -> the stages ->
models/kernels/artifacts/config/errors; a circle would let a lower layer reach up.

Modules loaded by name at run time (``importlib.import_module``, the engine backend registry) are not parsed."""

from __future__ import annotations

import ast
from pathlib import Path

import slimexport

ROOT = Path(slimexport.__file__).parent


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """``{"slimexport.engines.base": path, "slimexport.engines": .../engines/__init__.py, ...}``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..y import z
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, base] if base else head)
            for a in node.names:  # from slimexport import api: api; from slimexport.cache import stage_key: cache
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    out = set()
    for target in found:
        while target and target not in modules:  # slimexport.models.load.load_model -> slimexport.models.load
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _file_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _package(module: str) -> str:
    """``slimexport.engines.base`` -> ``slimexport.engines``; a top-level module (``slimexport.api``) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _package_graph(files: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, targets in files.items():
        out.setdefault(_package(src), set()).update(_package(t) for t in targets if _package(t) != _package(src))
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``a -> b -> a``) per strongly connected group of nodes that import each other (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_circle(graph, g) for g in groups]


def _one_circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first node back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{group} is not a circle")


def _message(circles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(c) for c in circles)


def test_no_circle_between_files():
    circles = _circles(_file_graph())
    assert not circles, f"files that import each other: {_message(circles)}"


def test_no_circle_between_packages():
    circles = _circles(_package_graph(_file_graph()))
    assert not circles, f"packages that import each other: {_message(circles)}"


def test_the_graph_sees_lazy_and_relative_imports_and_finds_circles(tmp_path):
    pkg = tmp_path / "slimexport"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("from slimexport.low import a\n")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from .b import g\n")  # lazy and relative
    (pkg / "low" / "b.py").write_text("from slimexport import api\nimport slimexport.low.a\nfrom slimexport.low.a import f\n")
    files = _file_graph(pkg)
    assert files["slimexport.low.a"] == {"slimexport.low.b"}
    assert files["slimexport.low.b"] == {"slimexport.api", "slimexport.low.a"}
    assert _message(_circles(files)) == "slimexport.api -> slimexport.low.a -> slimexport.low.b -> slimexport.api"
    assert _circles(_package_graph(files)) == [["slimexport.api", "slimexport.low", "slimexport.api"]]
    (pkg / "low" / "b.py").write_text("import torch\n")
    assert not _circles(_file_graph(pkg)) and not _circles(_package_graph(_file_graph(pkg)))
