"""No import cycles between the modules of the ``sanitizer`` package.

The graph has an edge A -> B when A imports B at module level (``import B``, ``from B import x``, or
``from P import B`` for a submodule B of P). Imports inside functions are lazy by design and do not count,
nor do those under ``if TYPE_CHECKING:``. Implicit parent-package imports are left out: a package's
``__init__`` is already running when its submodules load.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import sanitizer


def _modules() -> dict[str, Path]:
    found = {"sanitizer": Path(sanitizer.__file__)}
    for info in pkgutil.walk_packages(sanitizer.__path__, prefix="sanitizer."):
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            found[info.name] = Path(spec.origin)
    return found


def _module_level(body: list[ast.stmt]):
    """Import statements that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level(node.body)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, set(c)) for c in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_graph_sees_module_level_imports_only():
    graph = import_graph()
    assert "sanitizer.errors" in graph["sanitizer.embeddings"]
    assert "sanitizer.policies.base" in graph["sanitizer.policies"]
    assert "sanitizer.attacks" not in graph["sanitizer.cli"]  # cli imports its subcommands lazily


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles at module level:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_adapters_have_one_import_name():
    """``integrations/`` is installed as ``sanitizer.integrations``; the bare name would duplicate classes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    bare = subprocess.run([sys.executable, "-c", "import integrations"], cwd=root, capture_output=True, text=True)
    assert bare.returncode != 0 and "import the adapters as sanitizer.integrations" in bare.stderr
    proper = subprocess.run([sys.executable, "-c", "import sanitizer.integrations"], cwd=root, capture_output=True,
                            text=True)
    assert proper.returncode == 0, proper.stderr


def test_a_plain_certificate_does_not_load_the_attacks():
    import subprocess
    import sys

    code = ("import sys; from sanitizer.certificate import build_certificate, verify_certificate; "
            "print(sum(m.startswith('sanitizer.attacks') for m in sys.modules)); "
            "from sanitizer.certificate import measure_robustness; "
            "print(sum(m.startswith('sanitizer.attacks') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, after = (int(v) for v in out.stdout.split())
    assert before == 0 and after > 0
