"""The workers and the service library import one way: no module imports back into one that imports it.

Three checks: the graph of every first-party module's top-level imports (read with ``ast``: module-level
statements, ``if TYPE_CHECKING`` blocks left out) is acyclic; no cycle through a ``workers`` or ``nirvana.service``
module is closed by an import inside a function either (the old workers held their cycle together that way); and
importing the modules in every order that
matters succeeds with no import statement reaching a first-party module that is still initialising (an import
hook watches every import, function-local ones included). The ``workers`` modules: a fresh interpreter for each
one imported first (then the others), and one for all of them backwards. The ``nirvana.service`` modules: one
interpreter imports each first in turn, dropping every first-party module from ``sys.modules`` between orders
(third-party ones stay loaded: a fresh interpreter per order would cost 4 s of torch each).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("nirvana", "workers", "api")


def _modules() -> dict[str, Path]:
    """Every first-party module (``pkg.__init__`` as ``pkg``) → its file."""
    out: dict[str, Path] = {}
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()
WORKERS = sorted(m for m in MODULES if m.startswith("workers.") and m != "workers.__main__")
SERVICE = sorted(m for m in MODULES if m.startswith("nirvana.service."))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (module level, inside module-level if/try/with)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _top_level_imports(node.body)
            found += _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _top_level_imports(block)
        elif isinstance(node, ast.With):
            found += _top_level_imports(node.body)
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-local ones included (``if TYPE_CHECKING`` blocks left out)."""
    found: list[ast.Import | ast.ImportFrom] = []
    skip = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and _is_type_checking(n.test)}

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif id(child) in skip:
                for stmt in child.orelse:  # type: ignore[attr-defined]
                    walk(stmt)
            else:
                walk(child)

    walk(tree)
    return found


def import_graph(function_local: bool = False) -> dict[str, set[str]]:
    """First-party module → the first-party modules its top-level statements import (with ``function_local``,
    its import statements anywhere)."""
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in _all_imports(tree) if function_local else _top_level_imports(tree.body):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in MODULES}
                continue
            target = _resolve(mod, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # ``from pkg import module``
                    deps.add(sub)
                elif target in MODULES:
                    deps.add(target)
        graph[mod] = deps - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def test_import_graph_is_complete_and_acyclic() -> None:
    graph = import_graph()
    # The graph sees the workers' one-way chain (a broken parse would make the acyclicity check vacuous).
    assert "workers.process" in graph["workers.router"]
    assert {"workers.tasks", "workers.context", "workers.celery_app"} <= graph["workers.process"]
    assert "workers.context" in graph["workers.tasks"]
    assert not graph["workers.context"] & set(WORKERS), "the context must not import other workers modules"
    assert "nirvana.pipeline.router" in graph["workers.context"]
    assert _cycles(graph) == []


def test_no_cycle_through_workers_or_service_even_via_function_local_imports() -> None:
    graph = import_graph(function_local=True)
    assert "workers.context" in graph["workers.tasks"]
    ours = [c for c in _cycles(graph) if any(m.startswith(("workers.", "nirvana.service.")) for m in c)]
    assert ours == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Run in a fresh interpreter: import ``order``; an import hook records every import statement that reaches a
# first-party module still being initialised (a circular import), whoever runs it.
_PROBE = r"""
import builtins, importlib, json, sys

FIRST_PARTY = ("nirvana", "workers", "api")
orders = json.loads(sys.argv[1])
back_edges = []
_real_import = builtins.__import__


def _initialising(name):
    m = sys.modules.get(name)
    spec = getattr(m, "__spec__", None)
    return m is not None and bool(getattr(spec, "_initializing", False))


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "?")
    if level and globals:
        pkg = globals.get("__package__") or ""
        base = pkg.rsplit(".", level - 1)[0] if level > 1 else pkg
        name_abs = f"{base}.{name}" if name else base
    else:
        name_abs = name
    if importer.split(".")[0] in FIRST_PARTY and name_abs.split(".")[0] in FIRST_PARTY:
        targets = [name_abs] + [f"{name_abs}.{f}" for f in fromlist or () if f != "*"]
        for t in targets:
            if t != importer and _initialising(t):
                back_edges.append([importer, t])
    return _real_import(name, globals, locals, fromlist, level)


builtins.__import__ = _import
for order in orders:
    for name in [m for m in sys.modules if m.split(".")[0] in FIRST_PARTY]:
        del sys.modules[name]
    for mod in order:
        importlib.import_module(mod)
print("RESULT " + json.dumps(back_edges))
"""


def _probe(*orders: list[str]) -> list[list[str]]:
    """Import each of ``orders`` (first-party modules dropped before each) in one fresh interpreter; the back
    edges seen ([importer, module still initialising])."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # workers.app builds its Celery app at import, which needs a broker URL (nothing connects to it).
    env.setdefault("NIRVANA_BROKER_URL", "redis://127.0.0.1:9/0")
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(orders)], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, f"importing {orders} failed:\n{r.stderr[-3000:]}"
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return [list(e) for e in json.loads(line[len("RESULT ") :])]


@pytest.mark.parametrize("first", [*WORKERS, "reversed"])
def test_workers_import_in_any_order(first: str) -> None:
    order = WORKERS[::-1] if first == "reversed" else [first, *(m for m in WORKERS if m != first)]
    assert _probe(order) == []


def test_service_modules_import_in_any_order() -> None:
    orders = [[m, *(o for o in SERVICE if o != m), *WORKERS] for m in SERVICE] + [SERVICE[::-1] + WORKERS[::-1]]
    assert _probe(*orders) == []


def test_probe_sees_a_circular_import(tmp_path: Path) -> None:
    """The hook reports a real cycle (a first-party package made up for the test)."""
    pkg = tmp_path / "workers_cycle_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from workers_cycle_probe import b\n")
    (pkg / "b.py").write_text("from workers_cycle_probe import a\n")
    code = _PROBE.replace('FIRST_PARTY = ("nirvana", "workers", "api")', 'FIRST_PARTY = ("workers_cycle_probe",)')
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps([["workers_cycle_probe.a"]])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.split("RESULT ", 1)[1]) == [["workers_cycle_probe.b", "workers_cycle_probe.a"]]
