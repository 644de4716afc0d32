"""The dependency rule of the code base: core <- convert <- train, and no import cycle between modules.

Imports are read from the source (every `import` statement, at any depth), so an import hidden inside a
function to dodge a cycle still counts. What importing a module loads is read the same way, from the statements
that run on import: for our modules it equals sys.modules after the import (checked when this replaced a
subprocess that imported them, 8 CPU-s a run).
"""

from __future__ import annotations

import ast
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


def import_targets(nodes) -> list[str]:
    """The names the import statements among `nodes` import (`from pkg import name` gives pkg and pkg.name)."""
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported by a file (`from pkg import name` counts `pkg.name` when that is a module)."""
    return {n for n in import_targets(ast.walk(ast.parse(path.read_text(), str(path)))) if n in modules}


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
    from_tests = [
        f"{name} imports {target}"
        for name, path in project_modules().items()
        for target in import_targets(ast.walk(ast.parse(path.read_text())))
        if target.split(".")[0] == "tests"
    ]
    assert from_tests == []


def run_on_import(tree: ast.Module) -> list[ast.stmt]:
    """The statements that importing the module executes: all but function bodies and `if TYPE_CHECKING:`."""
    found: list[ast.stmt] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            pending += node.orelse
            continue
        found.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            pending += getattr(node, field, [])
    return found


def loaded_on_import(names: list[str]) -> set[str]:
    """Everything `import <names>` loads, as far as the source says: our modules (packages' __init__ included) and
    the top-level names of the outside packages they import at module level."""
    modules = project_modules()
    loaded: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        parents = [".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)]
        pending += [p for p in parents if p in modules and p not in loaded]
        if name in loaded:
            continue
        loaded.add(name)
        if name not in modules:
            continue
        targets = import_targets(run_on_import(ast.parse(modules[name].read_text())))
        pending += [t for t in targets if t in modules] + [t.split(".")[0] for t in targets if t not in modules]
    return loaded


# what bench/gpu_train.py and a run with export.enabled false import
TRAINER = [
    "train.data",
    "train.device",
    "train.loss",
    "train.model",
    "train.trainer",
    "train.callbacks",
    "train.checkpoint",
]


def test_the_trainer_loads_without_llama_cpp():
    """A GPU box may train (bench/gpu_train.py, or a run with export.enabled false) without llama.cpp installed:
    the modules that build and train the model must not load it. On a lent H200, a top-level import of
    convert.verify in train/diskspace.py once failed every production variant of the bench with
    ModuleNotFoundError. Read from the source: what each module imports when it is imported, transitively."""
    loaded = loaded_on_import(TRAINER)
    assert {"train", "core.config", "torch", "transformers", "peft"} <= loaded
    assert "llama_cpp" not in loaded and "convert.score" not in loaded, sorted(loaded)
    # the check sees the import that broke the bench, and the function-local one the export makes is not counted
    assert "llama_cpp" in loaded_on_import(["convert.verify"])
    assert "train.run" in import_graph()["train.__main__"] and "train.run" not in loaded_on_import(["train.__main__"])
