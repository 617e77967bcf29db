"""models/ is the bottom of the pipeline: its files import no stage above it, and none another in a circle."""

import ast
from pathlib import Path

import slimexport.models

MODELS = Path(slimexport.models.__file__).parent
# The layers above models/ (allocate -> decompose -> calibrate -> models/kernels/artifacts/config/errors).
ABOVE = ("allocate", "decompose", "calibrate", "verify", "bench", "engines", "slim", "api", "cli")


def _imports(path: Path) -> set[str]:
    """Every ``slimexport.*`` module ``path`` imports, at the top or inside a function (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("slimexport"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimexport"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # from slimexport.models import load
    return out


def _graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in MODELS.glob("*.py") if p.stem != "__init__"}
    return {name: {m.split(".")[2] for m in _imports(p) if m.startswith("slimexport.models.") and m.split(".")[2] in files}
            for name, p in files.items()}


def test_models_import_no_stage_above_them():
    bad = {p.name: sorted(m for m in _imports(p) if m.split(".")[1] in ABOVE) for p in MODELS.glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_models_files_import_each_other_without_a_circle():
    graph = _graph()
    assert "build" in graph["digits"] and "digits" in graph["load"]  # the circle digits <-> load was real

    def cycle_from(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    cycles = [c for n in graph if (c := cycle_from(n, [n]))]
    assert not cycles, " -> ".join(cycles[0])
