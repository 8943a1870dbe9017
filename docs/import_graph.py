"""Import graph of the ``lib`` package, grouped by subpackage, as Mermaid text.

    python docs/import_graph.py              # modules as nodes, one box per subpackage
    python docs/import_graph.py --packages   # subpackages as nodes, edges counted

Reads the source with ``ast`` (nothing is imported); an edge A -> B means a module of A
imports a module of B. Used for ``docs/architecture.md``.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter, defaultdict
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set) -> set:
    """The ``lib`` modules that ``path`` imports (``from lib.x import y`` counts ``lib.x.y`` when it is a module)."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(block)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in modules:
                found.add(name)
    return found - {module_name(path)}


def group(module: str) -> str:
    """``lib.server.app.http`` -> ``lib.server.app``; top-level modules are their own group."""
    parts = module.split(".")
    return ".".join(parts[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packages", action="store_true", help="one node per subpackage")
    args = parser.parse_args()
    files = sorted(LIB.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges = {(module_name(f), target) for f in files for target in imports(f, modules)}
    edges = {(a, b) for a, b in edges if a != "lib" and b != "lib"}
    print("```mermaid\nflowchart LR")
    if args.packages:
        counted = Counter((group(a), group(b)) for a, b in edges if group(a) != group(b))
        for (a, b), n in sorted(counted.items()):
            print(f"  {a.replace('.', '_')}[{a}] -->|{n}| {b.replace('.', '_')}[{b}]")
    else:
        members = defaultdict(list)
        for m in sorted(modules - {"lib"}):
            members[group(m)].append(m)
        for g, ms in members.items():
            if len(ms) > 1 or ms[0] != g:
                print(f"  subgraph {g.replace('.', '_')}[{g}]")
                for m in (m for m in ms if m != g):  # the package's __init__ is the box itself
                    print(f"    {m.replace('.', '_')}[{m.split('.')[-1]}]")
                print("  end")
            else:
                print(f"  {g.replace('.', '_')}[{g.split('.')[-1]}]")
        for a, b in sorted(edges):
            print(f"  {a.replace('.', '_')} --> {b.replace('.', '_')}")
    print("```")


if __name__ == "__main__":
    main()
