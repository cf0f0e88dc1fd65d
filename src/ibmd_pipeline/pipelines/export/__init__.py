"""The ``export`` pipeline: the distilled student as a deployable TorchScript (or ONNX) file."""

from ibmd_pipeline.pipelines.export.pipeline import create_onnx_pipeline, create_pipeline

__all__ = ["create_onnx_pipeline", "create_pipeline"]
