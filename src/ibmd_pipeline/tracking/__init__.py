"""Optional experiment tracking in MLflow: parameters, evaluation metrics, training curves and
report artefacts of each run. Off by default (``tracking.enabled``).

No Kedro here (the hook in :mod:`ibmd_pipeline.hooks` is a thin wrapper), and no MLflow import
until a run is started.
"""

from ibmd_pipeline.tracking.config import (
    TrackingConfig,
    is_local_file_store,
    parse_tracking_config,
    resolve_tracking_uri,
)
from ibmd_pipeline.tracking.mlflow_tracking import (
    MLFLOW_REQUIREMENT,
    PARAM_VALUE_LIMIT,
    MlflowMissingError,
    MlflowRun,
    SteppedMetric,
    airflow_tags,
    evaluation_metrics,
    flatten_params,
    history_metrics,
    require_mlflow,
)

__all__ = [
    "MLFLOW_REQUIREMENT",
    "PARAM_VALUE_LIMIT",
    "MlflowMissingError",
    "MlflowRun",
    "SteppedMetric",
    "TrackingConfig",
    "airflow_tags",
    "evaluation_metrics",
    "flatten_params",
    "history_metrics",
    "is_local_file_store",
    "parse_tracking_config",
    "require_mlflow",
    "resolve_tracking_uri",
]
