"""The ``distill`` pipeline: IBMD of the trained teacher into a few-step student."""

from ibmd_pipeline.pipelines.distill.pipeline import create_pipeline

__all__ = ["create_pipeline"]
