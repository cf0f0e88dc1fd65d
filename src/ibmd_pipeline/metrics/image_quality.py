"""PSNR and SSIM of restored images against the clean ones (torchmetrics).

Images are float ``[-1, 1]`` NCHW tensors. Both metrics are computed after mapping images to
``[0, 1]`` with ``data_range = 1.0`` (the convention of image files, where PSNR's peak is the
white level), per image, and then averaged over the batch, as restoration papers report them.
Samples are clamped to the valid range first: samplers may overshoot it slightly, and an image
on disk could not hold those values either.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

#: PSNR/SSIM data range after :func:`to_unit_range`.
DATA_RANGE = 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map ``[-1, 1]`` images to ``[0, 1]`` float32, clamping values outside the range."""
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Replicate single-channel images to three channels; three-channel images pass through."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected NCHW images with 1 or 3 channels, got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _check_pair(restored: torch.Tensor, clean: torch.Tensor) -> None:
    if restored.shape != clean.shape or restored.ndim != 4:
        raise ValueError(
            f"restored and clean must be NCHW of the same shape, got {tuple(restored.shape)} "
            f"and {tuple(clean.shape)}"
        )


def psnr_per_image(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image, ``(N,)``: ``10 log10(1 / MSE)`` on ``[0, 1]`` images.

    Identical images give ``inf``.
    """
    _check_pair(restored, clean)
    return peak_signal_noise_ratio(
        to_unit_range(restored), to_unit_range(clean), data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)
    )


def ssim_per_image(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """SSIM of each image, ``(N,)`` (Gaussian window 11, sigma 1.5, on ``[0, 1]`` images)."""
    _check_pair(restored, clean)
    return structural_similarity_index_measure(
        to_unit_range(restored), to_unit_range(clean), data_range=DATA_RANGE, reduction="none"
    )


def psnr(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean over the batch of the per-image PSNR (dB)."""
    return psnr_per_image(restored, clean).mean().item()


def ssim(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean over the batch of the per-image SSIM."""
    return ssim_per_image(restored, clean).mean().item()
