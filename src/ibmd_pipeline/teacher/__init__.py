"""Diffusion bridge teachers: configuration, construction from checkpoints, training."""

from ibmd_pipeline.teacher.config import (
    SamplerConfig,
    TeacherConfig,
    ValidationConfig,
    cpu_has_native_bf16,
    parse_teacher_config,
)
from ibmd_pipeline.teacher.model import (
    CheckpointMismatchError,
    LoadedTeacher,
    NetworkConfig,
    ResolvedTeacher,
    TeacherModelConfig,
    build_predictor,
    check_checkpoint_matches,
    resolve_teacher,
    teacher_from_checkpoint,
)
from ibmd_pipeline.teacher.plots import plot_loss_curves
from ibmd_pipeline.teacher.sampling import restore, sample_grid_columns
from ibmd_pipeline.teacher.trainer import (
    FixedValidationBatch,
    PairTensors,
    TeacherPlan,
    bundle_pairs,
    check_teacher_checkpoint,
    plan_teacher,
    task_from_params,
    train_teacher,
)

__all__ = [
    "CheckpointMismatchError",
    "FixedValidationBatch",
    "LoadedTeacher",
    "NetworkConfig",
    "PairTensors",
    "ResolvedTeacher",
    "SamplerConfig",
    "TeacherConfig",
    "TeacherModelConfig",
    "TeacherPlan",
    "ValidationConfig",
    "build_predictor",
    "bundle_pairs",
    "check_checkpoint_matches",
    "check_teacher_checkpoint",
    "cpu_has_native_bf16",
    "parse_teacher_config",
    "plan_teacher",
    "plot_loss_curves",
    "resolve_teacher",
    "restore",
    "sample_grid_columns",
    "task_from_params",
    "teacher_from_checkpoint",
    "train_teacher",
]
