"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from ibmd_pipeline.hooks import ParameterValidationHooks, RunBudgetHooks, TrackingHooks

# Every parameter a run's pipelines read is validated before its first node; a run that trains
# prints its expected time and keeps to ``budget.minutes``; MLflow tracking of each run is off
# unless ``tracking.enabled`` (conf/base/parameters_tracking.yml).
HOOKS = (ParameterValidationHooks(), RunBudgetHooks(), TrackingHooks())
# kedro-mlflow registers a hook of its own that would record every run in MLflow; TrackingHooks
# hands it Kedro's events only when tracking is enabled. (Both spellings: the distribution's
# metadata name has been written either way.)
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")

CONFIG_LOADER_CLASS = OmegaConfigLoader
# Parameters and globals are merged key by key across environments, so that
# ``conf/test`` only has to name the values it shrinks.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
