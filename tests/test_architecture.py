"""The floors of docs/architecture.md hold: a module imports only from its own floor or the ones below, and no
two modules import each other, directly or round a loop. Both are checked on the real import graph (grimp, the
graph import-linter reads), type-only imports excepted since they run nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each one import cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_itself_round_a_loop():
    graph = grimp.build_graph("pipeline", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_loop(tmp_path, monkeypatch):
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from loopy import b\n")
    (package / "b.py").write_text("from loopy import c\n")
    (package / "c.py").write_text("import loopy.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("loopy", cache_dir=None)
    assert _cycles(graph) == [["loopy.a", "loopy.b", "loopy.c"]]


def test_floors_only_look_down():
    """import-linter's layers contract in pyproject.toml: the floors, top to bottom."""
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_floor_that_reaches_up_breaks_the_contract(tmp_path):
    """The contract is live: with config put above records (which reads it), records reaches up and is reported."""
    config = (ROOT / "pyproject.toml").read_text()
    swapped = config.replace('    "pipeline.records",\n    "pipeline.config",\n',
                             '    "pipeline.config",\n    "pipeline.records",\n')
    assert swapped != config
    probe = tmp_path / "pyproject.toml"
    probe.write_text(swapped)
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", str(probe)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "pipeline.records" in done.stdout and "0 kept, 1 broken" in done.stdout
