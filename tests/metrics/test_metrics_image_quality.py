"""PSNR and SSIM on [-1, 1] images: analytic values and basic properties."""

from __future__ import annotations

import math

import pytest
import torch

from ibmd_pipeline.metrics import image_quality as iq


def test_psnr_of_a_constant_offset_is_analytic():
    # An offset d in [-1, 1] is d/2 in [0, 1]: MSE = d^2/4, PSNR = 10 log10(4 / d^2).
    clean = torch.full((3, 1, 16, 16), -0.5)
    offsets = torch.tensor([0.1, 0.2, 0.4]).reshape(3, 1, 1, 1)
    restored = clean + offsets
    expected = [10 * math.log10(4 / d**2) for d in (0.1, 0.2, 0.4)]
    torch.testing.assert_close(
        iq.psnr_per_image(restored, clean), torch.tensor(expected), rtol=1e-5, atol=1e-4
    )
    assert iq.psnr(restored, clean) == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_values_outside_the_image_range_are_clamped():
    clean = torch.ones(1, 1, 8, 8)
    assert math.isinf(iq.psnr(clean + 0.5, clean))  # the overshoot clamps back to white
    assert torch.equal(
        iq.to_unit_range(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0])
    )


def test_ssim_is_one_for_identical_images_and_falls_with_noise(make_shapes):
    clean = make_shapes(4, size=32, seed=0)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(clean.shape, generator=generator)
    assert torch.allclose(iq.ssim_per_image(clean, clean), torch.ones(4), atol=1e-5)
    values = [iq.ssim((clean + level * noise).clamp(-1, 1), clean) for level in (0.05, 0.2, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_shape_mismatch_and_channel_checks():
    with pytest.raises(ValueError, match="same shape"):
        iq.psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    assert iq.to_rgb(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        iq.to_rgb(torch.zeros(2, 2, 4, 4))
