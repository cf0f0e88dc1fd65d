"""Consistency of a restoration with its input: degrade the restoration again and compare with xT.

A restoration x0_hat of xT = A(x0) should satisfy A(x0_hat) = xT: a super-resolved image,
pooled or bicubic-downsampled again, should give back the low-resolution input; a JPEG repair,
compressed again, the same JPEG; a sketch-to-image output, edge-detected, the same sketch. The
score is the per-image root mean square of ``A(x0_hat) - xT`` in ``[0, 1]`` units (0 = fully
consistent; for sketches the square root of the fraction of edge pixels that differ).

Inpainting's A is random (the hole's fill is noise), so there the score is the same root mean
square on the known pixels only, where ``xT`` holds the clean image. Paired data have no known A:
:func:`consistency_reason` says so, and the metric is null.
"""

from __future__ import annotations

import torch

from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.degradations.ops import degrade

__all__ = ["consistency_per_image", "consistency_reason"]


def consistency_reason(task: TaskConfig) -> str | None:
    """Why consistency cannot be measured for ``task`` (``None`` when it can)."""
    if task.kind == "paired":
        return "paired data have no known degradation to apply to a restoration again"
    return None


def consistency_per_image(
    restored: torch.Tensor, corrupted: torch.Tensor, task: TaskConfig, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N,)`` float64: RMS of ``A(restored) - corrupted`` in ``[0, 1]`` units (module docstring);
    ``mask`` (1 = missing pixel) is required for inpainting."""
    reason = consistency_reason(task)
    if reason is not None:
        raise ValueError(reason)
    if restored.shape != corrupted.shape or restored.ndim != 4:
        raise ValueError(
            f"restored and corrupted must be NCHW of one shape, got {tuple(restored.shape)} "
            f"and {tuple(corrupted.shape)}"
        )
    restored = restored.float().clamp(-1.0, 1.0)
    if task.has_mask:
        if mask is None:
            raise ValueError("inpainting consistency needs the mask of the missing pixels")
        known = (1.0 - mask.float()).expand_as(restored)
        squared = ((restored - corrupted.float()) / 2.0) ** 2 * known
        return (squared.flatten(1).double().sum(1) / known.flatten(1).double().sum(1)).sqrt()
    degraded_again = degrade(restored, task).corrupted
    squared = ((degraded_again - corrupted.float()) / 2.0) ** 2
    return squared.flatten(1).double().mean(1).sqrt()
