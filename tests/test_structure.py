"""The package's shape: no import cycles (imports inside functions count), no module over
600 lines, and the arrows of ../shared/DESIGN.md ("robust/, aggregators/ and config never
import learned/, experiments/ or cli/")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "metagg"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The metagg modules `name` imports anywhere in its file (a package's own children and
    ancestors excluded: importing a submodule runs its parent's __init__ first anyway)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".")
            if node.level:
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
            prefix = ".".join([*base, node.module] if node.module else base) if node.level \
                else node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + ".") \
                    and target != "metagg":
                found.add(target)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n):], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_over_600_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


@pytest.mark.parametrize("lower", ["metagg.robust", "metagg.aggregators", "metagg.config"])
def test_lower_layers_never_import_the_upper_ones(lower):
    known = modules()
    upper = ("metagg.learned", "metagg.experiments", "metagg.cli")
    for m, p in known.items():
        if m == lower or m.startswith(lower + "."):
            bad = [t for t in imports(m, p, known) if t.startswith(upper)]
            assert not bad, f"{m} imports {bad}"
