"""The ``teacher`` pipeline: train a diffusion-bridge teacher on the degraded pairs."""

from ibmd_pipeline.pipelines.teacher.pipeline import create_pipeline

__all__ = ["create_pipeline"]
