"""The quick loop names only tests that exist and touches every package of the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fast_selection import FAST_MODULES, FAST_TESTS

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "src" / "ibmd_pipeline"


def _imported_packages(path: Path) -> set[str]:
    """The ``ibmd_pipeline.<package>`` names a test module imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ibmd_pipeline."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ibmd_pipeline."))
    return names


def _fast_files() -> list[Path]:
    return [TESTS / m for m in FAST_MODULES] + [TESTS / t.split("::")[0] for t in FAST_TESTS]


def test_every_named_file_and_test_exists() -> None:
    for path in _fast_files():
        assert path.is_file(), path
    for test in FAST_TESTS:
        module, name = test.split("::")
        assert f"def {name.split('[')[0]}(" in (TESTS / module).read_text(), test


def test_the_quick_loop_touches_every_package() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    touched = set().union(*(_imported_packages(path) for path in _fast_files()))
    assert packages - touched == set(), "packages no fast test imports"


def test_the_collected_tests_of_the_selection_carry_the_marker(request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        node = Path(item.path).relative_to(TESTS).as_posix()
        if node in FAST_MODULES:
            assert item.get_closest_marker("fast") is not None, item.nodeid
