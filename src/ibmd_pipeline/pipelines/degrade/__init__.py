"""The ``degrade`` pipeline: clean/corrupted pairs from the configured data source and task."""

from ibmd_pipeline.pipelines.degrade.pipeline import create_pipeline

__all__ = ["create_pipeline"]
