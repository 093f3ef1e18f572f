"""The code's layers, as the folders show them: every import points down (or across, without a cycle).

    core < media < models < storage < learning < the Python API < stages < the CLI

`python -m pytest tests/test_layers.py` is the one command that checks it; the import graph is read from the
source (every import, also those inside functions), so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["pipeline.core", "pipeline.media", "pipeline.models", "pipeline.storage", "pipeline.learning",
          "pipeline.api", "stages", "pipeline.cli"]
TOP = {"pipeline": "pipeline.api", "pipeline.__main__": "pipeline.cli"}  # the package re-exports the API


def modules() -> dict[str, Path]:
    found = {}
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int:
    module = TOP.get(module, module)
    matches = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    assert matches, f"{module} is in no layer: place it in one of {LAYERS}"
    return max(matches)


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports (absolute and relative, at any depth)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != module}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer_and_every_import_points_down():
    edges = graph()
    upward = [f"{a} (layer {LAYERS[layer_of(a)]}) imports {b} (layer {LAYERS[layer_of(b)]})"
              for a, targets in edges.items() for b in targets
              if layer_of(a) < layer_of(b) and not (b == "pipeline" and a.startswith("pipeline."))]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    edges = {a: {b for b in targets if b != "pipeline"} for a, targets in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:  # depth-first search; a node seen on the current path closes a cycle
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_library_never_imports_a_stage_or_the_cli():
    for a, targets in graph().items():
        if a.startswith("pipeline") and a not in ("pipeline.cli", "pipeline.__main__"):
            assert not [b for b in targets if b.startswith("stages") or b == "pipeline.cli"], a
