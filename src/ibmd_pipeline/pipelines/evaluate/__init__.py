"""The ``evaluate`` pipelines: cached references and teacher evaluation, then the student scored
against them (FID, KID, classifier-feature FD and KID, LPIPS, CA, PSNR, SSIM, consistency,
closeness to the teacher, speed), every metric with its interval."""

from ibmd_pipeline.pipelines.evaluate.pipeline import (
    create_models_pipeline,
    create_pipeline,
    create_reference_pipeline,
    create_teacher_pipeline,
)

__all__ = [
    "create_models_pipeline",
    "create_pipeline",
    "create_reference_pipeline",
    "create_teacher_pipeline",
]
