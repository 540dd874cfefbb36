"""The package's import graph: one way, in DESIGN.md's order, without cycles.

Every import counts, function-level ones included. Order, top to bottom (a module may import
only from its own area or from areas below it):

    cli > eval > profiler > passes > runtime > codegen > models > policies > io > errors, version

`headpolicy/__init__.py` (the public facade) and `__main__.py` stand above everything.
"""

import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "headpolicy"
ORDER = [("cli",), ("eval",), ("profiler",), ("passes",), ("runtime",), ("codegen",), ("models",), ("policies",),
         ("io",), ("errors", "version")]  # fmt: skip
RANK = {name: len(ORDER) - i for i, names in enumerate(ORDER) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """headpolicy modules `name` imports (the most specific known module of each import)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("headpolicy.") and t != name:
                found.add(t)
                break
    return found


def area(module: str) -> str:
    return module.split(".")[1]


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for dep in imports(name, path, set(mods)):
            g.add_edge(name, dep)
    return g


def test_every_area_has_a_rank():
    areas = {area(m) for m in modules() if m.count(".") >= 1 and area(m) not in ("__main__",)}
    assert areas <= set(RANK), f"areas without a place in the order: {sorted(areas - set(RANK))}"


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_imports_point_down_the_order():
    wrong = defaultdict(list)
    for a, b in graph().edges:
        if a in ("headpolicy", "headpolicy.__main__"):
            continue  # the facade
        if b == "headpolicy":
            wrong[a].append(b)  # nothing inside may import the facade
        elif RANK[area(b)] > RANK[area(a)]:
            wrong[a].append(b)
    assert not wrong, "imports against the order: " + "; ".join(f"{a} -> {', '.join(bs)}" for a, bs in wrong.items())


def test_the_graph_sees_function_level_imports():
    """A guard on the test itself: a known function-level import is in the graph."""
    g = graph()
    assert g.has_edge("headpolicy.cli.compile", "headpolicy.profiler.compile")
