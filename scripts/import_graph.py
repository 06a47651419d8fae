"""The import graph of the duquant package, imports inside functions included: its cycles, and the
imports that run back up the floors listed in pyproject.toml's import-linter contract.

    python scripts/import_graph.py            # prints the counts (and each offending import)

tests/test_architecture.py asserts 0 cycles and at most 2 imports running back up.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "duquant"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for p in sorted(package.rglob("*.py")):
        parts = list(p.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str:
    """The longest module prefix of `name` (a name imported from a module is that module)."""
    while name and name not in mods:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _targets(node: ast.AST, pkg: str, mods: dict[str, Path]) -> list[str]:
    """The duquant modules one import statement reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = pkg.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the duquant modules it imports anywhere in its source."""
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            for t in _targets(node, pkg, mods):
                r = _resolve(t, mods) if t.startswith("duquant") else ""
                if r and r != m:
                    out[m].add(r)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def floors() -> list[list[str]]:
    """The contract's floors, top first, each a list of dotted module names."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = cfg["contracts"][0]
    container = contract["containers"][0]
    return [[f"{container}.{n.strip()}" for n in layer.split("|")] for layer in contract["layers"]]


def floor_of(module: str, levels: list[list[str]]) -> int | None:
    """The floor number of a module (0 = top), None for the root package."""
    for i, names in enumerate(levels):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def upward(graph: dict[str, set[str]], levels: list[list[str]]) -> list[tuple[str, str]]:
    """Imports from a lower floor to a higher one (or between neighbours of one floor)."""
    out = []
    for m, deps in graph.items():
        fm = floor_of(m, levels)
        for d in deps:
            fd = floor_of(d, levels)
            if fm is None or fd is None:
                continue
            same_top = fm == fd and m.split(".")[:2] != d.split(".")[:2]
            if fd < fm or same_top:
                out.append((m, d))
    return sorted(out)


def main() -> int:
    """Print cycles and upward imports."""
    mods = modules()
    graph = edges(mods)
    comps = cycles(graph)
    ups = upward(graph, floors())
    print(f"{len(mods)} modules, {sum(map(len, graph.values()))} imports")
    print(f"cycles: {len(comps)}")
    for c in comps:
        print("  ", " -> ".join(c))
    print(f"imports running back up: {len(ups)}")
    for m, d in ups:
        print(f"   {m} -> {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
