"""The layering ARCHITECTURE.md promises, checked on the source: which package may import which,
no import circles, mlflow only in continual/tracking.py, and the size limits of files and functions.

Every ``import`` counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "fusion", "streams", "continual")
# which of our packages each package may import (besides itself)
ALLOWED = {"adapters": set(), "streams": set(), "fusion": {"adapters"}, "continual": {"adapters", "fusion", "streams"}}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that module ``name`` imports (resolved to the deepest module that exists)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {n: imports_of(n, p, modules()) for n, p in modules().items()}


def test_packages_import_only_what_their_layer_allows():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
           if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, "\n".join(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert not cycles(GRAPH), cycles(GRAPH)


def test_the_checks_see_circles_and_lazy_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    mod = tmp_path / "mod.py"
    mod.write_text("import os\n\ndef f():\n    from ..other import thing\n    from . import sibling\n")
    known = {"pkg.sub.mod", "pkg.other", "pkg.sub.sibling"}
    assert imports_of("pkg.sub.mod", mod, known) == {"pkg.other", "pkg.sub.sibling"}


def test_only_tracking_imports_mlflow():
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m.split(".")[0] == "mlflow" for m in mods):
                users.append(name)
    assert set(users) == {"continual.tracking"}, users


@pytest.mark.parametrize("name", sorted(modules()))
def test_file_and_function_sizes(name):
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path} has {len(text.splitlines())} lines"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {long}"
