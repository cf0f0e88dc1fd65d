"""I2SB's own corruption operators (NVlabs/I2SB ``corruption/``), for students of imported I2SB teachers.

An imported teacher was trained on exactly these inputs, so its student must be too
(``task.operators: i2sb``). They work in float on images in ``[-1, 1]`` and, unlike this
project's default operators, neither clip nor quantise their result:

- ``sr4x_bicubic``: DDRM's bicubic operator (``corruption/superresolution.py`` ``build_sr_bicubic``,
  from DDRM): a 16-tap separable bicubic kernel (``a = -0.5``) with stride 4 and reflective
  borders, written as a matrix ``H`` whose singular values below 0.03 are zeroed (``SRConv``), so
  the low-resolution image is ``H X H^T``; then nearest upsampling back to full size.
- ``sr4x_pool``: the mean of each 4x4 block (``SuperResolution``), then nearest upsampling; the
  same numbers as this project's :func:`~ibmd_pipeline.degradations.ops.sr4x_pool`.
- ``jpeg``: DDRM-JPEG's differentiable JPEG (``corruption/jpeg.py``): RGB to YCbCr with its
  matrix, chroma subsampled by taking every other pixel, 8x8 orthonormal DCT, quantisation by
  the IJG tables scaled to the quality factor, rounding, and the inverse path (chroma repeated
  2x2). RGB only, sides divisible by 16.
- ``inpaint_center``: the mask of ``get_center_mask`` (``bbox2mask`` at ``(h//4, w//4, h//2,
  w//2)``), the hole filled with N(0, 1) noise as ``Runner.sample_batch`` and ``sample.py`` do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "I2SB_SINGULAR_CUTOFF",
    "bicubic_matrix",
    "i2sb_center_mask",
    "i2sb_jpeg",
    "i2sb_sr4x_bicubic",
    "jpeg_quantization_tables",
]

#: ``SRConv`` zeroes the 1-D operator's singular values below this (DDRM's ``ZERO = 3e-2``).
I2SB_SINGULAR_CUTOFF = 3e-2
SR_FACTOR = 4


def _bicubic_weight(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(size: int, factor: int = SR_FACTOR) -> Tensor:
    """float64 ``(size // factor, size)``: DDRM's 1-D bicubic down-sampling, small singular values zeroed.

    Row ``r`` is centred between pixels ``factor r + factor/2 - 1`` and ``factor r + factor/2``;
    the ``4 factor`` taps that fall outside ``[0, size)`` are reflected back (``-1 -> 0``).
    """
    if size % factor:
        raise ValueError(f"the bicubic operator needs a side divisible by {factor}, got {size}")
    taps = 4 * factor
    kernel = np.array([_bicubic_weight((i - taps // 2 + 0.5) / factor) for i in range(taps)])
    kernel = kernel / kernel.sum()
    matrix = np.zeros((size // factor, size))
    for centre in range(factor // 2, size + factor // 2, factor):
        for j in range(centre - taps // 2, centre + taps // 2):
            source = -j - 1 if j < 0 else (2 * size - 1 - j if j >= size else j)
            matrix[centre // factor, source] += kernel[j - centre + taps // 2]
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    s = np.where(s < I2SB_SINGULAR_CUTOFF, 0.0, s)
    return torch.from_numpy((u * s) @ vh)


def _check(x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float image batch (N, C, H, W), got {tuple(x.shape)} {x.dtype}")


def i2sb_sr4x_bicubic(x: Tensor) -> Tensor:
    """I2SB's ``sr4x-bicubic`` input: ``H X H^T`` per channel, nearest-upsampled 4x (no clipping)."""
    _check(x)
    rows = bicubic_matrix(x.shape[2]).to(x.device)
    cols = bicubic_matrix(x.shape[3]).to(x.device)
    low = torch.einsum("ih,nchw,jw->ncij", rows, x.to(torch.float64), cols)
    return F.interpolate(low.to(x.dtype), scale_factor=SR_FACTOR, mode="nearest")


def jpeg_quantization_tables(quality: int) -> tuple[Tensor, Tensor]:
    """The IJG luma and chroma tables scaled to ``quality`` (``floor((s q + 50) / 100)`` in [1, 255])."""
    luma = torch.tensor([
        16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
        14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
        18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
    ], dtype=torch.float64)  # fmt: skip
    chroma = torch.full((64,), 99.0, dtype=torch.float64)
    chroma[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = torch.tensor(
        [17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66], dtype=torch.float64
    )
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return tuple(  # type: ignore[return-value]
        torch.floor((scale * table + 50) / 100).clamp(1, 255).reshape(8, 8) for table in (luma, chroma)
    )


def _dct_matrix(n: int = 8) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``D @ v`` transforms a column ``v``)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


_RGB_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
_YCBCR_TO_RGB = torch.tensor([
    [1.0, -3.68199903e-05, 1.40198758],
    [1.0, -3.44113281e-01, -7.14103821e-01],
    [1.0, 1.77197812, -1.34583413e-04],
])  # fmt: skip


def _quantise_blocks(plane: Tensor, table: Tensor) -> Tensor:
    """Level-shift, 8x8 DCT, quantise (round), dequantise, inverse DCT and shift back, block by block."""
    n, c, h, w = plane.shape
    dct = _dct_matrix().to(plane)
    blocks = plane.reshape(n, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5) - 128.0
    coefficients = dct @ blocks @ dct.T
    restored = dct.T @ (torch.round(coefficients / table) * table) @ dct + 128.0
    return restored.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def i2sb_jpeg(x: Tensor, quality: int) -> Tensor:
    """I2SB's ``jpeg-<quality>`` input: DDRM-JPEG encode and decode (float, no clipping)."""
    _check(x)
    if x.shape[1] != 3 or x.shape[2] % 16 or x.shape[3] % 16:
        raise ValueError(f"I2SB's JPEG needs RGB images with sides divisible by 16, got {tuple(x.shape)}")
    luma_table, chroma_table = (t.to(x.device) for t in jpeg_quantization_tables(quality))
    pixels = (x.to(torch.float64) + 1) / 2 * 255
    ycbcr = torch.einsum("kc,nchw->nkhw", _RGB_TO_YCBCR.to(pixels), pixels)
    ycbcr[:, 1:] += 128
    luma = _quantise_blocks(ycbcr[:, :1], luma_table)
    chroma = _quantise_blocks(ycbcr[:, 1:, ::2, ::2], chroma_table)
    chroma = chroma.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) - 128
    rgb = torch.einsum("kc,nchw->nkhw", _YCBCR_TO_RGB.to(pixels), torch.cat([luma, chroma], dim=1))
    return (rgb / 255 * 2 - 1).to(x.dtype)


def i2sb_center_mask(batch: int, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """I2SB's center mask ``(batch, 1, H, W)``: 1 on rows ``[H//4, H//4 + H//2)`` and columns likewise."""
    mask = torch.zeros(batch, 1, height, width, device=device)
    mask[:, :, height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = 1.0
    return mask
