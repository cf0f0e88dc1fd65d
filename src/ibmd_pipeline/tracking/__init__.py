"""Optional experiment tracking in MLflow through kedro-mlflow: what the project adds to the
plugin's runs (evaluation metrics, training curves, report artefacts, Airflow tags) and the
``tracking`` parameter block that switches it on. Off by default (``tracking.enabled``).

No Kedro here (the hook in :mod:`ibmd_pipeline.hooks` is a thin wrapper), and no MLflow import
until something is logged.
"""

from ibmd_pipeline.tracking.config import TrackingConfig, parse_tracking_config
from ibmd_pipeline.tracking.mlflow_tracking import (
    TRACKING_REQUIREMENTS,
    MlflowRun,
    SteppedMetric,
    TrackingMissingError,
    airflow_tags,
    evaluation_metrics,
    history_metrics,
    offline_mlflow_environment,
)

__all__ = [
    "TRACKING_REQUIREMENTS",
    "MlflowRun",
    "SteppedMetric",
    "TrackingConfig",
    "TrackingMissingError",
    "airflow_tags",
    "evaluation_metrics",
    "history_metrics",
    "offline_mlflow_environment",
    "parse_tracking_config",
]
