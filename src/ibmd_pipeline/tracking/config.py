"""The ``tracking`` parameter block: whether and where runs are recorded in MLflow.

Tracking is off by default; ``kedro run --params tracking.enabled=true`` turns it on. With it
off nothing here touches the file system or imports MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ibmd_pipeline.engine.config import parse_config, require

__all__ = ["TrackingConfig", "is_local_file_store", "parse_tracking_config", "resolve_tracking_uri"]

# A URI scheme of two or more letters (``file:``, ``http:``, ``sqlite:``, ``databricks``...);
# a single letter followed by ``:`` is a Windows drive, i.e. a path.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking of Kedro runs in MLflow.

    enabled: record runs (default off; then nothing is imported and nothing is written).
    uri: where: a folder (an MLflow file store; relative paths are taken from the project
        root) or any MLflow tracking URI (``file:...``, ``sqlite:///...``, ``http://host:5000``).
    experiment: the MLflow experiment the runs are filed under (created when missing).
    run_name: the run's name; ``None`` names it after the pipelines (and nodes) that ran.
    log_artifacts: also store the plots, grids, ``metrics.json`` and the metrics table.
    log_histories: also store the teacher's and the student's training curves as stepped metrics.
    """

    enabled: bool = False
    uri: str = "data/09_tracking/mlruns"
    experiment: str = "ibmd"
    run_name: str | None = None
    log_artifacts: bool = True
    log_histories: bool = True

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(bool(self.uri.strip()), f"{prefix}uri", "must name a folder or an MLflow tracking URI")
        require(bool(self.experiment.strip()), f"{prefix}experiment", "must be a non-empty name")
        require(
            self.run_name is None or bool(self.run_name.strip()),
            f"{prefix}run_name",
            "must be a non-empty name, or null to name the run after the pipelines",
        )


def parse_tracking_config(params: Mapping[str, Any] | None, key: str = "tracking") -> TrackingConfig:
    """``params:tracking`` as a :class:`TrackingConfig`; a missing block means tracking off."""
    return parse_config(TrackingConfig, params, key)


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """An MLflow tracking URI for ``uri``: URIs pass through, folders become ``file:`` URIs.

    A relative folder is taken from ``base`` (the project root), so a run started from another
    working directory (an Airflow worker) records into the same store.
    """
    if _SCHEME.match(uri):
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute():
        path = Path(base) / path
    return path.resolve().as_uri()


def is_local_file_store(uri: str) -> bool:
    """Whether the resolved tracking URI is an MLflow file store (a ``file:`` URI)."""
    return uri.startswith("file:")
