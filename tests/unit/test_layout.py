"""The dependency rule of the code base: core <- convert <- train, and no import cycle between modules.

Imports are read from the source (every `import` statement, at any depth), so an import hidden inside a
function to dodge a cycle still counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("core", "convert", "train")
# What each layer may import from this project: the shared core nothing but itself; convert the core.
ALLOWED = {"core": {"core"}, "convert": {"core", "convert"}, "train": {"core", "convert", "train"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported by a file (`from pkg import name` counts `pkg.name` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "core.errors" in graph["core.config"]
    assert "convert.export" in graph["train.run"]  # train calls the export stage
    assert "train.run" in graph["train.__main__"]  # a function-local import counts too


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_only_downwards():
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert wrong == []


def test_production_code_does_not_import_test_tools():
    graph = import_graph()
    users = sorted(mod for mod, deps in graph.items() if "scripts.tiny_model" in deps)
    assert users == []  # the tiny-model builder is a command (python -m scripts.tiny_model), not a library
    from_tests = []
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            targets += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            from_tests += [f"{name} imports {t}" for t in targets if t.split(".")[0] == "tests"]
    assert from_tests == []


def test_the_trainer_loads_without_llama_cpp():
    """A GPU box may train (bench/gpu_train.py, or a run with export.enabled false) without llama.cpp installed:
    the modules that build and train the model must not load it. On a lent H200, a top-level import of
    convert.verify in train/diskspace.py once failed every production variant of the bench with
    ModuleNotFoundError."""
    code = (
        "import sys\n"
        "import train.data, train.device, train.loss, train.model, train.trainer, train.callbacks, train.checkpoint\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp' or m == 'convert.score')\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
