"""Consistency with the input: A(restoration) against xT, and the known pixels for inpainting."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.degradations.ops import degrade
from ibmd_pipeline.metrics.consistency import consistency_per_image, consistency_reason


@pytest.mark.parametrize("kind", ["sr4x_pool", "sr4x_bicubic", "jpeg", "sketch"])
def test_the_clean_image_is_fully_consistent_with_its_input(kind, make_shapes):
    clean = make_shapes(4, size=16, seed=1)
    task = TaskConfig(kind=kind)
    xT = degrade(clean, task).corrupted
    assert torch.equal(consistency_per_image(clean, xT, task), torch.zeros(4, dtype=torch.float64))


def test_an_offset_restoration_is_off_by_half_the_offset_in_unit_range(make_shapes):
    # 4x4 average pooling is linear: A(x + c) = A(x) + c, and [-1, 1] -> [0, 1] halves it
    clean = make_shapes(3, size=16, seed=2) * 0.5  # stays inside [-1, 1] after the offset
    task = TaskConfig(kind="sr4x_pool")
    xT = degrade(clean, task).corrupted
    assert consistency_per_image(clean + 0.2, xT, task) == pytest.approx([0.1] * 3, abs=1e-6)


def test_inpainting_compares_the_known_pixels_only(make_shapes):
    clean = make_shapes(3, size=16, seed=3) * 0.5
    task = TaskConfig(kind="inpaint_center")
    degraded = degrade(clean, task, torch.Generator().manual_seed(0))
    restored = clean.clone()
    hole = degraded.mask.bool().expand_as(restored)
    restored[hole] = 0.9  # anything in the hole is consistent
    assert consistency_per_image(restored, degraded.corrupted, task, degraded.mask) == pytest.approx(
        [0.0] * 3
    )
    restored[~hole] += 0.2
    assert consistency_per_image(restored, degraded.corrupted, task, degraded.mask) == pytest.approx(
        [0.1] * 3, abs=1e-6
    )
    with pytest.raises(ValueError, match="needs the mask"):
        consistency_per_image(restored, degraded.corrupted, task)


def test_paired_data_have_no_degradation_to_apply():
    task = TaskConfig(kind="paired")
    assert "no known degradation" in consistency_reason(task)
    assert consistency_reason(TaskConfig(kind="jpeg")) is None
    with pytest.raises(ValueError, match="no known degradation"):
        consistency_per_image(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), task)
