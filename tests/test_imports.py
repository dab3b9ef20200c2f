"""dsr1's modules import each other without a circle: every `from dsr1... import` and `import dsr1...`
anywhere in a module (top level, inside functions, under TYPE_CHECKING) is an edge, read with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dsr1"


def _graph() -> dict[str, set[str]]:
    mods = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dsr1"):
                for alias in node.names:  # `from dsr1 import plan` names a module; `from dsr1.plan import X` not
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("dsr1")}
        graph[name] = {e for e in edges if e in mods and e not in (name, "dsr1")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_circle_in_dsr1():
    graph = _graph()
    assert {"dsr1.plan", "dsr1.sizing", "dsr1.plantypes", "dsr1.engines.base"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_serve_modules_import_nothing_private_from_each_other():
    """One front over every engine (dsr1.serve.front): no serve module reaches into another's private
    names, and the routes are declared once (front.ROUTES), not per engine."""
    import ast
    from pathlib import Path

    serve = Path(__file__).resolve().parent.parent / "dsr1" / "serve"
    for f in serve.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsr1.serve"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.name} imports {private} from {node.module}"
    routes = [f.name for f in serve.glob("*.py") if "Route(" in f.read_text()]
    assert routes == ["front.py"], routes
