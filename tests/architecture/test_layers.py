"""The package's shape: no import cycles, layers that point one way, and a search/serve path that loads
neither Lightning nor Hydra. Walks ``src/cbir`` with ``ast`` (function-level imports count too: a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# lower number = lower layer; a module may import its own layer or lower ones only
LAYERS = {
    "cbir.errors": 0, "cbir.io": 0, "cbir.configs": 0, "cbir.ranks": 0, "cbir.net": 0, "cbir.devices": 0,
    "cbir.data": 1, "cbir.models": 1, "cbir.preprocess": 1, "cbir.visual": 1, "cbir.zoo": 1,
    "cbir.evaluation": 2,
    "cbir.training": 3,
    "cbir.export": 4,
    "cbir.index": 5,
    "cbir.search": 6,
    "cbir.serve": 7,
    "cbir.commands": 8,
    "cbir.cli": 9, "cbir": 9,  # the package root: the Python API facade (lazy)
}
ENTRY_SHIMS = {"cbir.serve.__main__"}  # `python -m cbir.serve`: an entry point, like the root scripts


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """cbir modules that ``path`` imports (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "cbir" or m.startswith("cbir.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / "cbir").rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer(graph):
    assert all(layer(m) >= 0 for m in graph)
    assert {m.split(".")[1] for m in graph if m.count(".") >= 1} <= {k.split(".")[1] for k in LAYERS if "." in k}


def test_no_upward_imports(graph):
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m not in ENTRY_SHIMS and m != "cbir"
                    for d in deps if d != "cbir" and layer(d) > layer(m))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_library_package_imports_commands(graph):
    offenders = sorted(m for m, deps in graph.items() if not m.startswith(("cbir.commands", "cbir.cli"))
                       and m not in ENTRY_SHIMS and any(d.startswith("cbir.commands") for d in deps))
    assert not offenders


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep == "cbir" or dep.startswith("cbir.") and dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state and node != "cbir":
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The walk above is not vacuous: it resolves relative and lazy imports."""
    package = tmp_path / "cbir"
    (package / "index").mkdir(parents=True)
    (package / "index" / "__init__.py").write_text("")
    (package / "index" / "a.py").write_text("def f():\n    from cbir.commands import x\n")
    (package / "index" / "b.py").write_text("from . import a\n")
    found = imports_of(package / "index" / "a.py", "cbir.index.a")
    relative = imports_of(package / "index" / "b.py", "cbir.index.b")
    assert "cbir.commands" in found and layer("cbir.commands") > layer("cbir.index.a")
    assert "cbir.index.a" in relative


@pytest.mark.parametrize("module", ["cbir.search", "cbir.serve.app", "cbir.commands.search"])
def test_query_path_loads_neither_lightning_nor_hydra(module):
    code = (f"import sys, {module}; heavy = sorted({{m.split('.')[0] for m in sys.modules}} & "
            "{'pytorch_lightning', 'lightning', 'lightning_fabric', 'hydra', 'torchmetrics', 'wandb'}); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import {module} loads {out}"
