"""Shared fixtures for the tests that use the project as its users do (kedro-viz, Airflow)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from kedro.framework.project import pipelines as registered_pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.pipeline import Pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the `airflow` tests out unless a marker expression is given (`pytest -m airflow`).

    They build a multi-GB environment and run the whole pipeline under Airflow: only
    `make test-airflow` should start them, even where pytest's options do not deselect them.
    """
    if config.option.markexpr:
        return
    airflow = [item for item in items if item.get_closest_marker("airflow")]
    if airflow:
        config.hook.pytest_deselected(items=airflow)
        items[:] = [item for item in items if not item.get_closest_marker("airflow")]


@pytest.fixture(scope="session")
def project_pipelines() -> dict[str, Pipeline]:
    """The registered pipelines, by name."""
    bootstrap_project(PROJECT_ROOT)
    return dict(registered_pipelines)


@pytest.fixture(scope="session")
def airflow_config() -> dict:
    """conf/base/airflow.yml as `kedro airflow create` reads it (env `test`)."""
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
            loader = session.load_context().config_loader
            loader.config_patterns.setdefault("airflow", ["airflow*", "airflow/**"])
            return loader["airflow"]


@pytest.fixture(scope="session")
def airflow_check() -> ModuleType:
    """scripts/airflow_check.py as a module."""
    path = PROJECT_ROOT / "scripts" / "airflow_check.py"
    spec = importlib.util.spec_from_file_location("airflow_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module
