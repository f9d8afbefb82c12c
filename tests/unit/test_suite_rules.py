"""Rules of the test suite itself, checked on its source:

- shared helpers live in helper modules (tests/helpers.py, tests/model/machine.py,
  tests/fuzz/harness.py): a test module never imports from another test module;
- random data is seeded from fixed numbers or tests.helpers.stable_seed, never from hash()
  (which changes with PYTHONHASHSEED, so a failure could not be replayed);
- the data and raw-copy helpers are defined once, in tests/helpers.py;
- no Python module of the project (src, tests, bench, fuzz, demo.py) is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent

ROOT = TESTS.parent
MAX_LINES = 500


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(TESTS)), ast.parse(p.read_text(), str(p)))
        for p in sorted(TESTS.rglob("*.py"))
    ]


def test_no_test_module_imports_another() -> None:
    found = set()
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                last = node.module.rsplit(".", 1)[-1]
                if node.module.startswith("tests.") and last.startswith("test_"):
                    found.add((rel, node.module))
    assert not found, sorted(found)


def test_no_seed_from_hash() -> None:
    calls = [
        f"{rel}:{node.lineno}"
        for rel, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash"
    ]
    assert not calls, calls


def test_data_helpers_defined_once() -> None:
    names = {"_pattern", "pattern", "_to_raw", "to_raw", "_raw_of", "raw_file", "stable_seed"}
    where: dict[str, list[str]] = {}
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                where.setdefault(node.name, []).append(rel)
    redefined = {n: files for n, files in where.items() if files != ["helpers.py"]}
    assert not redefined, redefined


def test_no_module_over_500_lines() -> None:
    files = [ROOT / "demo.py"] + [p for d in ("src", "tests", "bench", "fuzz")
                                  for p in sorted((ROOT / d).rglob("*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 100
    assert not long, long
