"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from ibmd_pipeline.hooks import TrackingHooks

# MLflow tracking of each run, off unless ``tracking.enabled`` (conf/base/parameters_tracking.yml).
HOOKS = (TrackingHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
# Parameters and globals are merged key by key across environments, so that
# ``conf/test`` only has to name the values it shrinks.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}
