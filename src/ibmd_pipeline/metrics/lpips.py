"""LPIPS (AlexNet, v0.1) between restored and clean images.

lpips expects ``[-1, 1]`` RGB images, which is our image convention; gray images are
replicated to three channels and samples are clamped to the valid range. Small images are
enlarged first: AlexNet's strides reduce a 32-px image to 1x1 maps in its last three layers
(and anything under 31 px to nothing), so LPIPS of 32-px images would compare little more than
their means there. Both images of a pair are upsampled (bilinear) by the smallest integer
factor that brings their shorter side to at least ``min_size`` (64 by default). The AlexNet trunk
comes from :func:`ibmd_pipeline.metrics.weights.build_lpips_alexnet` (the verified official file
or its converted copy, never a random trunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ibmd_pipeline.metrics.image_quality import to_rgb
from ibmd_pipeline.metrics.weights import build_lpips_alexnet

#: Default smallest side LPIPS sees (images are upsampled to it).
LPIPS_MIN_SIDE = 64


def upsample_factor(height: int, width: int, min_size: int) -> int:
    """The smallest integer factor that brings the shorter side to at least ``min_size``."""
    return max(1, math.ceil(min_size / min(height, width)))


class LPIPSScorer:
    """Per-image and mean LPIPS distance of restored images to clean ones (lower is closer)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        progress: bool = False,
        min_size: int = LPIPS_MIN_SIDE,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        self.min_size = min_size
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        model, self.weights_source = build_lpips_alexnet()
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def per_image(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair, ``float32 (N,)`` on the CPU; images ``[-1, 1]`` NCHW, 1 or 3 channels."""
        if restored.shape != clean.shape or restored.ndim != 4:
            raise ValueError(
                f"restored and clean must be NCHW of the same shape, got {tuple(restored.shape)} "
                f"and {tuple(clean.shape)}"
            )
        factor = upsample_factor(restored.shape[-2], restored.shape[-1], self.min_size)
        values = []
        for start in tqdm(
            range(0, restored.shape[0], self.batch_size), desc="LPIPS", disable=not self.progress
        ):
            a = to_rgb(restored[start : start + self.batch_size].to(self.device, torch.float32).clamp(-1, 1))
            b = to_rgb(clean[start : start + self.batch_size].to(self.device, torch.float32).clamp(-1, 1))
            if factor > 1:
                a, b = (F.interpolate(x, scale_factor=factor, mode="bilinear") for x in (a, b))
            values.append(self.model(a, b).flatten().cpu())
        return torch.cat(values) if values else torch.empty(0)

    def score(self, restored: torch.Tensor, clean: torch.Tensor) -> float:
        """Mean LPIPS over the batch."""
        return self.per_image(restored, clean).mean().item()
