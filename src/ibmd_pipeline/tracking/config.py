"""The ``tracking`` parameter block: whether runs are recorded in MLflow, and what besides the
parameters goes into each run.

Where runs go (the tracking URI, the experiment, the run name, how parameters are flattened) is
kedro-mlflow's own configuration, ``conf/base/mlflow.yml``. Tracking is off by default;
``kedro run --params tracking.enabled=true`` turns it on. With it off nothing here touches the
file system or imports MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ibmd_pipeline.engine.config import parse_config

__all__ = ["TrackingConfig", "parse_tracking_config"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking of Kedro runs in MLflow, through kedro-mlflow.

    enabled: record runs (default off; then kedro-mlflow is not started and nothing is written).
    log_artifacts: also store the plots, grids, ``metrics.json`` and the metrics table.
    log_histories: also store the teacher's and the student's training curves as stepped metrics.
    """

    enabled: bool = False
    log_artifacts: bool = True
    log_histories: bool = True


def parse_tracking_config(params: Mapping[str, Any] | None, key: str = "tracking") -> TrackingConfig:
    """``params:tracking`` as a :class:`TrackingConfig`; a missing block means tracking off."""
    return parse_config(TrackingConfig, params, key)
