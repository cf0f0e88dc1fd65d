"""I2SB's own corruption operators (``task.operators: i2sb``) against independent statements of NVlabs/I2SB's.

The references here follow I2SB's ``corruption/`` step by step with other tools (numpy's
symmetric padding and a strided kernel for DDRM's bicubic matrix, scipy's orthonormal DCT for
DDRM-JPEG, ``bbox2mask`` for the center mask), so a slip in either statement shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from ibmd_pipeline.data import DataConfig, check_data_and_task
from ibmd_pipeline.degradations import TaskConfig, check_image_size, degrade, sr4x_bicubic, sr4x_pool
from ibmd_pipeline.degradations.i2sb import (
    bicubic_matrix,
    i2sb_center_mask,
    i2sb_jpeg,
    i2sb_sr4x_bicubic,
    jpeg_quantization_tables,
)
from ibmd_pipeline.engine.config import ConfigError


def _images(channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(2, channels, size + 3, size + 3, generator=generator)
    smooth = torch.nn.functional.avg_pool2d(noise, 4, 1)
    return (smooth * 2 - 1).clamp(-1, 1)


def _ddrm_bicubic_kernel() -> np.ndarray:
    def weight(x: float, a: float = -0.5) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    kernel = np.array([weight((i - 8 + 0.5) / 4) for i in range(16)])
    return kernel / kernel.sum()


def test_bicubic_is_ddrms_reflected_16_tap_kernel_at_stride_4():
    x = _images(size=32).double().numpy()
    kernel = _ddrm_bicubic_kernel()
    padded = np.pad(x, ((0, 0), (0, 0), (8, 8), (8, 8)), mode="symmetric")  # DDRM: -1 -> 0, n -> n-1
    # output r of 8 sums the 16 padded pixels from 4r + 2 (DDRM centres its taps at 4r + 2)
    rows = np.stack([np.tensordot(padded[:, :, 4 * r + 2 : 4 * r + 18], kernel, ([2], [0]))
                     for r in range(8)], 2)
    low = np.stack([np.tensordot(rows[..., 4 * c + 2 : 4 * c + 18], kernel, ([3], [0])) for c in range(8)], 3)
    expected = torch.from_numpy(low).repeat_interleave(4, 2).repeat_interleave(4, 3)
    ours = i2sb_sr4x_bicubic(torch.from_numpy(x))
    assert float((ours - expected).abs().max()) < 1e-12
    # at the sizes of the paper no singular value falls under DDRM's cutoff: H is the plain kernel
    assert torch.allclose(bicubic_matrix(256).sum(1), torch.ones(64, dtype=torch.float64))


def test_i2sb_bicubic_is_not_clipped_unlike_this_projects():
    edge = -torch.ones(1, 3, 32, 32)
    edge[..., 16:] = 1.0
    assert i2sb_sr4x_bicubic(edge).abs().max() > 1.0 >= sr4x_bicubic(edge).abs().max()


def test_pool_is_shared():
    x = _images()
    task = TaskConfig(kind="sr4x_pool", operators="i2sb")
    assert torch.equal(degrade(x, task).corrupted, sr4x_pool(x))


def _ddrm_jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """DDRM-JPEG as I2SB's corruption/jpeg.py runs it, with scipy's DCT."""
    luma_q, chroma_q = (t.numpy() for t in jpeg_quantization_tables(quality))
    pixels = (x + 1) / 2 * 255
    forward = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
    ycbcr = np.einsum("kc,nchw->nkhw", forward, pixels)
    ycbcr[:, 1:] += 128

    def code(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
        out = np.empty_like(plane)
        for i in range(0, plane.shape[-2], 8):
            for j in range(0, plane.shape[-1], 8):
                block = plane[..., i : i + 8, j : j + 8] - 128
                coefficients = np.round(dctn(block, axes=(-2, -1), norm="ortho") / table) * table
                out[..., i : i + 8, j : j + 8] = idctn(coefficients, axes=(-2, -1), norm="ortho") + 128
        return out

    luma = code(ycbcr[:, :1], luma_q)
    chroma = code(ycbcr[:, 1:, ::2, ::2], chroma_q).repeat(2, axis=2).repeat(2, axis=3) - 128
    inverse = np.array([
        [1.0, -3.68199903e-05, 1.40198758],
        [1.0, -3.44113281e-01, -7.14103821e-01],
        [1.0, 1.77197812, -1.34583413e-04],
    ])  # fmt: skip
    rgb = np.einsum("kc,nchw->nkhw", inverse, np.concatenate([luma, chroma], axis=1))
    return rgb / 255 * 2 - 1


@pytest.mark.parametrize("quality", [5, 10])
def test_jpeg_is_ddrm_jpeg(quality):
    x = _images(size=32)
    ours = i2sb_jpeg(x.double(), quality)
    expected = torch.from_numpy(_ddrm_jpeg(x.double().numpy(), quality))
    # I2SB (and ours) hold the colour matrices as float32 constants, the reference as float64:
    # 8 digits of 1.4 times values up to 255, rescaled to [-1, 1]
    assert float((ours - expected).abs().max()) < 255 * 2 * 6e-8 * 2 / 255
    assert float((ours - x).abs().mean()) > 1e-3  # it does corrupt


def test_jpeg_tables_are_i2sbs_at_quality_10():
    luma, chroma = jpeg_quantization_tables(10)
    # I2SB's corruption/jpeg.py keeps the quality-10 tables as a comment: their first rows
    assert luma[0].tolist() == [80, 55, 50, 80, 120, 200, 255, 255]
    assert chroma[0].tolist() == [85, 90, 120, 235, 255, 255, 255, 255]


def test_center_mask_is_i2sbs_bbox():
    for size in (32, 30, 31, 256):
        mask = i2sb_center_mask(1, size, size)[0, 0]
        top, height = size // 4, size // 2  # bbox2mask(img, (h//4, w//4, h//2, w//2))
        expected = torch.zeros(size, size)
        expected[top : top + height, top : top + height] = 1
        assert torch.equal(mask, expected), size
    x = _images()
    task = TaskConfig(kind="inpaint_center", operators="i2sb")
    degraded = degrade(x, task, torch.Generator().manual_seed(0))
    hole = degraded.mask.bool().expand_as(x)
    assert torch.equal(degraded.corrupted[~hole], x[~hole])
    assert abs(float(degraded.corrupted[hole].std()) - 1.0) < 0.1  # N(0, 1) fill


def test_operator_settings_are_checked_early():
    with pytest.raises(ConfigError) as err:
        TaskConfig(kind="sketch", operators="i2sb").validate("task")
    assert err.value.key == "task.operators"
    with pytest.raises(ConfigError, match="divisible by 16") as err:
        check_image_size(TaskConfig(kind="jpeg", operators="i2sb"), 40)
    assert err.value.key == "data.image_size"
    with pytest.raises(ConfigError, match="RGB") as err:
        check_data_and_task(DataConfig(channels=1), TaskConfig(kind="jpeg", operators="i2sb"))
    assert err.value.key == "task.operators"
