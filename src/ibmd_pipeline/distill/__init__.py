"""Inverse Bridge Matching Distillation: generators, the L:K training loop, student checkpoints.

IBMD sec. 3 (docs/method.md sec. 4). ``distill_student`` trains a student from corrupted images and a
teacher checkpoint; ``student_from_checkpoint`` rebuilds it for sampling.
"""

from ibmd_pipeline.distill.config import (
    DistillConfig,
    ValidationConfig,
    parse_distill_config,
    resolve_distill,
)
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.distill.ibmd import ibmd_auxiliary_loss, ibmd_generator_loss
from ibmd_pipeline.distill.student import LoadedStudent, student_from_checkpoint
from ibmd_pipeline.distill.trainer import build_distill_run, distill_student, split_held_out

__all__ = [
    "BridgeGenerator",
    "DistillConfig",
    "LoadedStudent",
    "ValidationConfig",
    "build_distill_run",
    "distill_student",
    "ibmd_auxiliary_loss",
    "ibmd_generator_loss",
    "parse_distill_config",
    "resolve_distill",
    "split_held_out",
    "student_from_checkpoint",
]
