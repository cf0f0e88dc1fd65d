"""Tiny random teachers for the distillation tests: no trained teacher is ever needed.

``make_teacher_checkpoint(task_kind)`` builds a ``tiny``-preset teacher for the task exactly as
the teacher package resolves it (I2SB for SR/JPEG/inpainting, OT-ODE for inpainting, DDBM for
sketch), perturbs every weight (a fresh UNet's zero-initialised output heads would make it the
trivial predictor ``x0 = c_skip x_t``) and returns a checkpoint dict in the documented format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from teacher_checkpoints import tiny_teacher_checkpoint

from ibmd_pipeline.degradations.ops import inpaint_center

IMAGE_SIZE = 16


def make_teacher_checkpoint(
    task_kind: str = "sr4x_bicubic", *, image_size: int = IMAGE_SIZE, channels: int = 1, seed: int = 0
) -> dict[str, Any]:
    """A random ``tiny`` teacher checkpoint for ``task_kind`` (EMA weights differ from raw ones)."""
    return tiny_teacher_checkpoint(
        task_kind, image_size=image_size, channels=channels, seed=seed, ema_noise=0.01, step=10
    )


def make_corrupted(
    task_kind: str = "sr4x_bicubic", count: int = 24, *, image_size: int = IMAGE_SIZE, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random corrupted images (and, for inpainting, a centre mask with a noise-filled hole)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, image_size, image_size, generator=generator) * 2 - 1
    if task_kind == "inpaint_center":
        degraded = inpaint_center(images, generator)
        return degraded.corrupted, degraded.mask
    return images, None


@pytest.fixture
def teacher_checkpoint() -> Callable[..., dict[str, Any]]:
    return make_teacher_checkpoint


@pytest.fixture
def corrupted_images() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    return make_corrupted
