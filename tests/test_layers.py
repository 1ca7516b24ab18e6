"""The package's layers (docs/design.md, "The layers of the package"), and no import cycle.

probe (``cpu``) -> ``profile`` -> ``backends`` -> ``evaluator`` -> ``tuner``
-> ``cli``: every import of an autotune module, at the top of a file or
inside a function or an ``if TYPE_CHECKING`` block, is read from the source
and must point to the same layer or one below, and the graph of modules must
have no cycle (an import hidden in a function body to dodge one counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import autotune

PACKAGE = Path(autotune.__file__).resolve().parent

#: Module name prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "autotune._util": 0,
    "autotune._errors": 0,
    "autotune._version": 0,
    "autotune.workload": 0,
    "autotune.cpu": 1,
    "autotune.profile": 2,
    "autotune.backends": 3,
    "autotune.adapt": 4,
    "autotune.breakeven": 4,
    "autotune.engine": 4,
    "autotune.evaluator": 4,
    "autotune.online": 4,
    "autotune.refiner": 4,
    "autotune.settings": 4,
    "autotune.tuner": 5,
    "autotune.bench": 5,
    "autotune.searchbench": 5,
    "autotune.report": 5,
    "autotune.heatmap": 5,
    "autotune.workloads": 5,
    "autotune.cli": 6,
    "autotune.__main__": 6,
    "autotune": 6,  # the package itself: the public API gathers every layer
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> set[str]:
    """Every autotune module ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "autotune")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "autotune":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from autotune.backends import guardian` imports a module.
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or (
                    PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_every_import_points_to_the_same_layer_or_below():
    upward = [
        f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
        for mod, deps in graph().items()
        for dep in sorted(deps)
        if layer(dep) > layer(mod)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    # A package's __init__ is imported before its submodules; a submodule
    # importing a sibling through the package is not a cycle of its own.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(edges[mod]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state:
            cycle = visit(mod)
            assert cycle is None, " -> ".join(cycle)


def test_the_checks_see_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from autotune.cli import main\n")
    assert imports(source) == {"autotune.cli"}
