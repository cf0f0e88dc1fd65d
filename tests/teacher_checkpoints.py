"""One builder of tiny random teacher checkpoints, shared by the distillation, evaluation,
export and pipeline tests: no trained teacher is ever needed.

The teacher is the ``tiny`` preset resolved for the task exactly as the teacher package does it
(I2SB for SR/JPEG/inpainting, OT-ODE for inpainting, DDBM for sketch). Every weight is perturbed:
a fresh UNet's zero-initialised output heads would make it the trivial predictor
``x0 = c_skip x_t``. The result is a checkpoint dict in the documented format.
"""

from __future__ import annotations

from typing import Any

import torch

from ibmd_pipeline.bridges.schedules import make_schedule
from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.teacher.model import NetworkConfig, TeacherModelConfig, build_predictor, resolve_teacher


def teacher_config(
    model_config: TeacherModelConfig, resolved: Any, task_kind: str, image_size: int, channels: int
) -> dict[str, Any]:
    """The ``config`` of a teacher checkpoint (``teacher.model`` format) for a resolved teacher."""
    return {
        "bridge": config_to_dict(resolved.bridge),
        "unet": config_to_dict(resolved.unet),
        "conditional": resolved.conditional,
        "task": config_to_dict(TaskConfig(kind=task_kind)),
        "image_size": image_size,
        "channels": channels,
        "teacher": {"model": config_to_dict(model_config)},
    }


def tiny_teacher_checkpoint(
    task_kind: str = "sr4x_bicubic",
    *,
    image_size: int,
    channels: int = 1,
    seed: int = 0,
    ema_noise: float = 0.0,
    step: int = 1,
    catalog_version: str | None = None,
) -> dict[str, Any]:
    """A random ``tiny`` teacher checkpoint for ``task_kind``, seeded by ``seed``.

    ema_noise: > 0 makes the EMA weights differ from the raw ones by that much Gaussian noise
        (so tests can tell which set was loaded); 0 stores the raw weights as the EMA too.
    catalog_version: stored as ``catalog_version`` when given, as the catalog dataset does.
    """
    model_config = TeacherModelConfig(network=NetworkConfig(preset="tiny"))
    resolved = resolve_teacher(model_config, task_kind=task_kind, image_size=image_size, channels=channels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        predictor = build_predictor(resolved.unet, make_schedule(resolved.bridge), resolved.conditional)
        with torch.no_grad():
            for parameter in predictor.net.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        raw = {k: v.clone() for k, v in predictor.net.state_dict().items()}
        ema = {k: v + ema_noise * torch.randn_like(v) for k, v in raw.items()} if ema_noise else raw
    checkpoint: dict[str, Any] = {
        "kind": "teacher",
        "config": teacher_config(model_config, resolved, task_kind, image_size, channels),
        "models": {"model": raw},
        "ema": {"model": ema},
        "step": step,
        "history": [],
    }
    if catalog_version is not None:
        checkpoint["catalog_version"] = catalog_version
    return checkpoint
