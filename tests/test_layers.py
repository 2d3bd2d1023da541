"""The package's layering: no import, at module or function level, forms a cycle between
files of ``src/modellego``; the public API is what ``__all__`` says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import modellego

SRC = Path(modellego.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from every ``import`` statement in
    the file (top level and inside functions). ``from pkg import name`` counts as importing
    ``pkg.name`` when that is a module, else ``pkg``."""
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    hit = sub if sub in files else target if target in files else None
                    if hit and hit != mod:
                        graph[mod].add(hit)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in files and alias.name != mod:
                        graph[mod].add(alias.name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    # cli imports its verbs inside functions only; they must still be edges
    assert "modellego.workflows" in graph["modellego.cli.disassemble"]
    assert "modellego.errors" in graph["modellego.io"]


def test_no_import_cycle_between_files():
    assert find_cycle(import_graph()) is None


#: the layers, top first: a module may import from its own layer and those above it (the
#: Development page, docs/development.md, draws the same list)
LAYERS = (
    ("errors", "_version", "registry", "terminal"),
    ("data", "models", "runtime"),
    ("manifest", "records"),
    ("io", "kinds"),
    ("statedict",),
    ("files", "provenance"),
    ("surgery",),
    ("metrics", "analysis"),
    ("disassembly", "compression", "assembly", "training", "evaluation", "distillation",
     "exporting"),
    ("viz", "workflows"),
    ("cli", "__main__"),
)


def layer_of(module: str) -> int:
    name = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if name in names:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS; add it to the one it belongs to")


def test_every_import_goes_up_the_layers():
    graph = import_graph()
    wrong = [f"{mod} -> {dep}" for mod, deps in sorted(graph.items()) if mod != "modellego"
             for dep in sorted(deps) if dep != "modellego" and layer_of(dep) > layer_of(mod)]
    assert wrong == []


def test_layer_of_places_modules_and_refuses_strangers():
    assert layer_of("modellego.surgery.graph") < layer_of("modellego.analysis.locate")
    assert layer_of("modellego.runtime.hooks") < layer_of("modellego.surgery.recalibrate")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("modellego.elsewhere")


def test_public_api_is_all_of_it():
    assert sorted(modellego.__all__) == sorted(set(modellego.__all__))
    missing = [name for name in modellego.__all__ if not hasattr(modellego, name)]
    assert missing == []
    for name in ("load_model", "save_model", "disassemble", "disassemble_model", "assemble",
                 "compress", "ComponentPlan", "ModelLegoError", "list_models",
                 "list_datasets"):
        assert name in modellego.__all__
