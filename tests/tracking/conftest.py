"""Fixtures of the tracking tests: the pipelines tests' ``run_kedro`` (a real KedroSession on
the ``test`` env, from the project root) and a reader of an MLflow file store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# MLflow 3 reports usage over the network unless told not to (it also stays quiet under pytest).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.conftest import KedroRun, degrade_run, project_root, run_kedro  # noqa: E402, F401


@pytest.fixture
def mlflow_client(monkeypatch):
    """A function ``store -> MlflowClient`` reading the file store in folder ``store``."""
    from mlflow.tracking import MlflowClient

    # MLflow 3 reads a file store only when opted in (the hook opts in when it writes one).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return lambda store: MlflowClient(tracking_uri=Path(store).resolve().as_uri())
