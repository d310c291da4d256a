"""The import graph docs/architecture.md describes: no circles, operator -> engine only, pure cores stay pure.

The graph is read statically (ast) from every module of both packages, counting every import: at module
level, inside functions (deferred imports hide a circle, they do not remove it) and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "gearshift.engine", "operator": "gearshift.operator"}


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import sub` imports the submodule; `from mod import thing` imports mod
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_was_read(graph: dict[str, set[str]]) -> None:
    assert "gearshift.engine.config" in graph["gearshift.engine.server.launch"]
    assert "gearshift.engine.config" in graph["gearshift.operator.spec"]  # an edge we know is there
    assert "gearshift.engine.settings" in graph["gearshift.engine.config"]


def test_cycles_are_found() -> None:
    """The checker itself: a planted circle is reported, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in found]
    assert not found, "import circles:\n" + json.dumps(detail, indent=1)


def test_engine_never_imports_the_operator(graph: dict[str, set[str]]) -> None:
    bad = {m: sorted(i for i in deps if i.startswith("gearshift.operator"))
           for m, deps in graph.items() if m.startswith("gearshift.engine")}
    assert not {m: d for m, d in bad.items() if d}


PURE = ["gearshift.engine.scheduler", "gearshift.engine.block_manager", "gearshift.operator.policy",
        "gearshift.operator.builders", "gearshift.operator.spec", "gearshift.engine.config",
        "gearshift.engine.settings", "gearshift.engine.quantity"]
HEAVY = ["torch", "triton", "llama_cpp", "kubernetes", "kopf", "fastapi", "uvicorn"]


@pytest.mark.parametrize("module", PURE)
def test_pure_cores_load_no_device_code_and_no_kubernetes_client(module: str) -> None:
    """Imported alone in a fresh interpreter, a pure core pulls in none of the heavy packages."""
    probe = (f"import sys, json, {module}; "
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == [], f"{module} loads {r.stdout.strip()}"
