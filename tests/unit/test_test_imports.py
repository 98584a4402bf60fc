"""Tests share code through tests/helpers only: a test module or a conftest imported by
another module couples tests that should be independent (and pytest may collect the
imported tests twice)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _shared_from_a_test(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def _offending_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n for n in names if n.startswith("tests.") and _shared_from_a_test(n)]
    return found


def test_no_test_module_or_conftest_is_imported() -> None:
    offenders = {
        str(p.relative_to(TESTS)): bad
        for p in sorted(TESTS.rglob("*.py"))
        if (bad := _offending_imports(p))
    }
    assert offenders == {}


def test_the_check_sees_an_offending_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from tests.unit.test_x import f\nimport tests.integration.conftest\n"
        "from tests.helpers.wait import wait_until\n"
    )
    assert _offending_imports(module) == ["tests.unit.test_x", "tests.integration.conftest"]
