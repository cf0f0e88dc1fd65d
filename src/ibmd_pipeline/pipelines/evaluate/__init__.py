"""The ``evaluate`` pipelines: cached references, then FID / LPIPS / CA / PSNR / SSIM / speed."""

from ibmd_pipeline.pipelines.evaluate.pipeline import (
    create_models_pipeline,
    create_pipeline,
    create_reference_pipeline,
)

__all__ = ["create_models_pipeline", "create_pipeline", "create_reference_pipeline"]
