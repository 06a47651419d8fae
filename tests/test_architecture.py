"""The house's rules, checked on the source: the import-linter contract (floors), no import circles,
at most 2 imports running back up, no function over 80 lines (issue 29)."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

MAX_LINES = 80


def test_import_linter_contract_is_kept():
    """`lint-imports` (pyproject.toml's floors, exhaustive) passes on the source tree."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: bash scripts/setup.sh installs it (dev extra)")
    res = subprocess.run(
        [exe, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # the system PATH after the script's folder: a pyenv shim is a bash script
        env={
            "PYTHONPATH": str(ROOT / "src"),
            "PATH": os.pathsep.join([str(Path(exe).parent), os.environ.get("PATH", "")]),
        },
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_no_import_cycles_and_at_most_two_imports_back_up():
    """The graph of every import (inside functions too) has no cycle and <= 2 upward edges."""
    graph = import_graph.edges(import_graph.modules())
    assert import_graph.cycles(graph) == []
    assert len(import_graph.upward(graph, import_graph.floors())) <= 2


def test_the_graph_tool_finds_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up graph with a circle and an import up is caught."""
    graph = {"duquant.config": {"duquant.api"}, "duquant.api": {"duquant.config"}}
    assert import_graph.cycles(graph) == [["duquant.api", "duquant.config"]]
    assert import_graph.upward(graph, import_graph.floors()) == [("duquant.config", "duquant.api")]


def test_every_module_sits_on_a_floor():
    """A new module must be placed in the contract (exhaustive): none is left off."""
    levels = import_graph.floors()
    missing = [
        m
        for m in import_graph.modules()
        if m != "duquant" and import_graph.floor_of(m, levels) is None
    ]
    assert missing == []


def test_no_function_over_80_lines():
    """Every function of the package fits in 80 lines (def to last line)."""
    long = []
    for path in sorted((ROOT / "src" / "duquant").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_import_linter_is_the_pinned_one():
    """The contract's syntax (containers, exhaustive) is that of the pinned import-linter."""
    assert importlib.util.find_spec("importlinter") is not None
