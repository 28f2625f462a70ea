"""The package's structure, read from its source: imports point down (no cycle, function-local imports
included), nothing below the orchestrator imports api/cli/compiler, no module over 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "tvm_anyprec"
TOP = {"tvm_anyprec.api", "tvm_anyprec.cli", "tvm_anyprec.compiler"}
# who may import the top modules: the entry points above them (cli -> api -> compiler)
MAY_IMPORT_TOP = {"tvm_anyprec.cli", "tvm_anyprec.__main__", "tvm_anyprec.api"}
MAX_LINES = 400


def _modules() -> dict:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict:
    """{module: set of package modules it imports anywhere in its source}. ``from pkg import name`` counts as
    an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_function_local_imports():
    g = import_graph()
    assert "tvm_anyprec.tune.driver" in g["tvm_anyprec.api"]          # imported inside api.tune
    assert "tvm_anyprec.kernels.spec" in g["tvm_anyprec.kernels.anyprec"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_nothing_below_the_orchestrator_imports_it():
    bad = {m: sorted(d & TOP) for m, d in import_graph().items() if d & TOP and m not in MAY_IMPORT_TOP}
    assert bad == {}
    assert "tvm_anyprec.cli" not in import_graph()["tvm_anyprec.api"]


def test_leaf_modules_stay_leaves():
    g = import_graph()
    assert g["tvm_anyprec.errors"] == set()
    assert g["tvm_anyprec.env"] <= {"tvm_anyprec.errors"}
    for m in ("tvm_anyprec.policy",) + tuple(k for k in g if k.startswith("tvm_anyprec.quant")):
        assert not any(d.startswith(("tvm_anyprec.kernels", "tvm_anyprec.schedules", "tvm_anyprec.passes",
                                     "tvm_anyprec.tune", "tvm_anyprec.runtime")) for d in g[m]), (m, g[m])


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
