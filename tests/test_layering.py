"""The house's rules, checked on the source: lower rooms never import higher ones, and no
import inside a function hides a cycle (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "opd"

# Lowest first. A room may import its own modules and any room of a lower rank.
RANK = {
    "losses": 0, "config": 1, "modeling": 2, "data": 3, "sampling": 4, "teachers": 5,
    "objectives": 6, "evaluation": 6, "run": 7, "cli.demo": 8, "cli": 9, "opd": 10,
}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[1:3] == ["cli", "demo"]:
        return "cli.demo"
    return parts[1] if len(parts) > 1 else "opd"


def module_name(path: Path) -> str:
    name = "opd." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(path: Path):
    """`(target module, top_level)` for every `opd` import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "opd":
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "opd"]
        else:
            continue
        for target in targets:
            yield target, node.col_offset == 0


def graph():
    top, lazy = {}, []
    for path in SRC.rglob("*.py"):
        mod = module_name(path)
        top[mod] = set()
        for target, top_level in imports(path):
            if top_level:
                top[mod].add(target)
            else:
                lazy.append((mod, target))
    return top, lazy


def test_lower_rooms_never_import_higher_ones():
    top, lazy = graph()
    # `opd` itself (version, lazy facade) is run by every `opd.x` import anyway
    edges = [(a, b) for a, bs in top.items() for b in bs if b != "opd"]
    edges += [(a, b) for a, b in lazy if b != "opd"]
    upward = [
        f"{a} -> {b}" for a, b in edges if RANK[room(b)] > RANK[room(a)] and room(a) != room(b)
    ]
    assert not upward, "imports from a lower room into a higher one:\n" + "\n".join(upward)


def _reaches(top: dict, start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod == goal:
            return True
        if mod in seen:
            continue
        seen.add(mod)
        todo += [t for t in top.get(mod, ()) if t in top]
    return False


def test_no_import_inside_a_function_dodges_a_cycle():
    """An import inside a function is for start-up time or an optional dependency; moved to the
    top of its module it must not close an import cycle."""
    top, lazy = graph()
    cycles = [f"{a} -> {b}" for a, b in lazy if b in top and _reaches(top, b, a)]
    assert not cycles, "function-level imports hiding a cycle:\n" + "\n".join(cycles)


def test_the_top_of_the_package_has_at_most_twelve_entries():
    entries = [p.name for p in SRC.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 12, sorted(entries)


def test_every_module_is_under_four_hundred_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
