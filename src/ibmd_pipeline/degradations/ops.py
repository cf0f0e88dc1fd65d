"""The paper's degradations as batched, deterministic functions of a clean batch.

Every function takes images ``x`` as float tensors in ``[-1, 1]``, shape ``(N, C, H, W)``, and
returns a tensor of the same shape (the corrupted image xT lives on the clean image's grid, as in
I2SB: low-resolution images are brought back to full size by nearest upsampling). Only
:func:`inpaint_center` draws random numbers, from the ``torch.Generator`` it is given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.feature import canny

from ibmd_pipeline.degradations.config import SR_FACTOR, SUPER_RESOLUTION_TASKS, TaskConfig
from ibmd_pipeline.degradations.i2sb import i2sb_center_mask, i2sb_jpeg, i2sb_sr4x_bicubic


@dataclass(frozen=True)
class Degraded:
    """A corrupted batch and, for inpainting, its mask ``(N, 1, H, W)`` with 1 = missing pixel."""

    corrupted: torch.Tensor
    mask: torch.Tensor | None = None


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float image batch (N, C, H, W), got {tuple(x.shape)} {x.dtype}")


def _upsample_nearest(low: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(low, scale_factor=factor, mode="nearest")


def sr4x_pool(x: torch.Tensor) -> torch.Tensor:
    """4x super-resolution input: mean of each 4x4 block, repeated over the block."""
    _check_batch(x)
    return _upsample_nearest(F.avg_pool2d(x, SR_FACTOR), SR_FACTOR)


def sr4x_bicubic(x: torch.Tensor) -> torch.Tensor:
    """4x super-resolution input: antialiased bicubic downsampling (as PIL's), nearest back up.

    Bicubic overshoots near edges, so the low-resolution image is clipped to ``[-1, 1]`` as an
    8-bit low-resolution image would be.
    """
    _check_batch(x)
    height, width = x.shape[-2:]
    low = F.interpolate(
        x, size=(height // SR_FACTOR, width // SR_FACTOR), mode="bicubic", antialias=True, align_corners=False
    )
    return _upsample_nearest(low.clamp(-1.0, 1.0), SR_FACTOR)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in ``[-1, 1]`` (N, C, H, W) to uint8 arrays (N, H, W, C), rounding to the nearest level."""
    levels = ((x.detach().cpu().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return levels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 arrays (N, H, W, C) to float32 images in ``[-1, 1]`` (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def jpeg_compress(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode each image as a baseline JPEG at ``quality`` with PIL (libjpeg) and decode it again.

    Grayscale batches are coded as single-channel JPEGs, colour batches as YCbCr with PIL's default
    4:2:0 chroma subsampling. libjpeg is deterministic, so the result is too.
    """
    _check_batch(x)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
    decoded = []
    for image in to_uint8(x):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)  # uint8: L or RGB
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            array = np.asarray(reloaded.convert(pil.mode))
        decoded.append(array[..., None] if array.ndim == 2 else array)
    return from_uint8(np.stack(decoded)).to(x.device)


def center_mask(
    batch: int, height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The center-inpainting mask ``(batch, 1, height, width)``: 1 on the central half-side square."""
    mask = torch.zeros(batch, 1, height, width, device=device)
    hole_h, hole_w = height // 2, width // 2
    top, left = (height - hole_h) // 2, (width - hole_w) // 2
    mask[:, :, top : top + hole_h, left : left + hole_w] = 1.0
    return mask


def inpaint_center(
    x: torch.Tensor, generator: torch.Generator | None = None, operators: str = "project"
) -> Degraded:
    """Remove the central square and fill it with N(0, 1) noise (docs/method.md sec. 3).

    The noise makes xT a sample rather than a constant inside the hole, which is what an I2SB
    bridge expects at t = T; the returned ``mask`` tells losses and samplers where it is.
    ``operators="i2sb"`` uses I2SB's mask placement (the same square when the side is a
    multiple of 4).
    """
    _check_batch(x)
    make_mask = i2sb_center_mask if operators == "i2sb" else center_mask
    mask = make_mask(x.shape[0], x.shape[2], x.shape[3], device=x.device)
    noise = torch.randn(x.shape, generator=generator, device="cpu", dtype=x.dtype).to(x.device)
    return Degraded(corrupted=x * (1.0 - mask) + noise * mask, mask=mask)


def sketch_edges(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Canny edge map of each image's luminance: edges -1 (dark lines) on +1 (white), all channels.

    The luminance is the channel mean rescaled to ``[0, 1]``; Canny's hysteresis thresholds are
    scikit-image's defaults for float images (10% and 20% of the range).
    """
    _check_batch(x)
    gray = ((x.detach().cpu().double().mean(dim=1) + 1.0) / 2.0).numpy()
    edges = np.stack([canny(image, sigma=sigma) for image in gray])
    lines = torch.from_numpy(1.0 - 2.0 * edges.astype(np.float32))
    return lines[:, None].expand(-1, x.shape[1], -1, -1).contiguous().to(device=x.device, dtype=x.dtype)


def degrade(x: torch.Tensor, task: TaskConfig, generator: torch.Generator | None = None) -> Degraded:
    """Apply ``task``'s degradation to the clean batch ``x`` (float, ``[-1, 1]``, NCHW).

    ``task.operators`` picks this project's implementation or I2SB's (``degradations/i2sb.py``).
    """
    _check_batch(x)
    if task.kind in SUPER_RESOLUTION_TASKS and (x.shape[-1] % SR_FACTOR or x.shape[-2] % SR_FACTOR):
        raise ValueError(
            f"task.kind '{task.kind}' needs image sides divisible by {SR_FACTOR}, got {tuple(x.shape)}"
        )
    if task.kind == "sr4x_pool":
        return Degraded(sr4x_pool(x))
    i2sb = task.operators == "i2sb"
    if task.kind == "sr4x_bicubic":
        return Degraded(i2sb_sr4x_bicubic(x) if i2sb else sr4x_bicubic(x))
    if task.kind == "jpeg":
        return Degraded(i2sb_jpeg(x, task.jpeg_quality) if i2sb else jpeg_compress(x, task.jpeg_quality))
    if task.kind == "inpaint_center":
        return inpaint_center(x, generator, task.operators)
    if task.kind == "sketch":
        return Degraded(sketch_edges(x, task.sketch_sigma))
    raise ValueError(
        f"task.kind '{task.kind}' synthesises nothing: its corrupted images come from a paired data set"
    )
