"""Fixtures that run the project's pipelines through a real KedroSession on the ``test`` env.

``run_kedro(["teacher"], params={...})`` runs from the project root, as ``kedro run --env test``
does, and returns a :class:`KedroRun` that lists the files the run wrote under ``data/test``.
``degrade_run`` runs the ``degrade`` pipeline once per test session, so that tests of later
pipelines can depend on its persisted outputs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA_ROOT = PROJECT_ROOT / "data" / "test"  # conf/test/globals.yml: data_root
VERSION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


@dataclass(frozen=True)
class KedroRun:
    """What one session run returned and which files it wrote under ``data/test``."""

    outputs: dict[str, Any]
    written: tuple[Path, ...]

    def versioned_file(self, filepath: str) -> Path:
        """The file this run wrote for the versioned catalog ``filepath`` (relative to ``data/test``),
        i.e. ``data/test/<filepath>/<version>/<file name>``."""
        dataset_dir = TEST_DATA_ROOT / filepath
        matches = [
            path
            for path in self.written
            if path.parent.parent == dataset_dir
            and path.name == dataset_dir.name
            and VERSION_PATTERN.match(path.parent.name)
        ]
        if len(matches) != 1:
            raise AssertionError(f"expected one new version of '{filepath}', found {matches}")
        return matches[0]


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The Kedro project root (where ``pyproject.toml`` and ``conf/`` are)."""
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def run_kedro(project_root: Path) -> Callable[..., KedroRun]:
    """A function that runs pipelines in a KedroSession on env ``test`` from the project root.

    ``params`` are runtime parameters merged over the configuration (like ``kedro run --params``).
    """

    def run(pipelines: Sequence[str], params: dict[str, Any] | None = None) -> KedroRun:
        before = _files_under(TEST_DATA_ROOT)
        # Catalog paths are relative to the working directory, as for the `kedro` command.
        with contextlib.chdir(project_root):
            bootstrap_project(project_root)
            with KedroSession.create(project_path=project_root, env="test", runtime_params=params) as session:
                outputs = session.run(pipeline_names=list(pipelines))
        return KedroRun(outputs=outputs, written=tuple(sorted(_files_under(TEST_DATA_ROOT) - before)))

    return run


@pytest.fixture(scope="session")
def degrade_run(run_kedro: Callable[..., KedroRun]) -> KedroRun:
    """One ``kedro run --env test --pipelines=degrade`` per test session."""
    return run_kedro(["degrade"])
