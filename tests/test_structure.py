"""The house: no import circle among the project's modules, and an import inside a function only for
a module that loads a heavy optional dependency (sentence-transformers, FAISS)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("pipeline", "retrieval", "ray_jobs")
# importing these pulls sentence-transformers or FAISS: a function may import them where it uses them
HEAVY = {"pipeline.similarity", "retrieval.embed", "retrieval.index", "retrieval.neighbours"}


def modules() -> dict[str, Path]:
    return {
        f"{pkg}.{f.stem}" if f.stem != "__init__" else pkg: f
        for pkg in PACKAGES
        for f in sorted((REPO / pkg).glob("*.py"))
    }


def imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """The project modules a file imports at module level and inside functions."""
    top, inner = set(), set()
    tree = ast.parse(path.read_text())
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        (inner if id(node) in nested else top).update(n for n in names if n in known and n not in PACKAGES)
    return top, inner


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_circle_and_function_level_imports_only_for_heavy_modules():
    found = modules()
    graph, late = {}, {}
    for name, path in found.items():
        top, inner = imports(path, set(found))
        graph[name] = top | inner
        late[name] = inner - HEAVY
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"
    assert not {n: sorted(m) for n, m in late.items() if m}, "function-level imports of light project modules"


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_config_reference_is_the_code_s():
    """docs/config.md is what `python -m pipeline.config` writes from the dataclasses: a key added,
    renamed or re-documented without regenerating it fails here."""
    from pipeline.config import reference

    assert (REPO / "docs" / "config.md").read_text() == reference(), (
        "regenerate: python -m pipeline.config > docs/config.md"
    )
