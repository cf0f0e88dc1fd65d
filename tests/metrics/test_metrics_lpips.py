"""LPIPS scorer: identity, ordering, gray handling and batching."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.metrics import weights
from ibmd_pipeline.metrics.image_quality import to_rgb
from ibmd_pipeline.metrics.lpips import LPIPSScorer, upsample_factor


@pytest.fixture(scope="module")
def scorer():
    return LPIPSScorer(batch_size=3)


def test_lpips_orders_identical_slightly_noisy_and_different_images(scorer, make_shapes):
    clean = make_shapes(4, size=64, seed=0)
    other = make_shapes(4, size=64, seed=1)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    same = scorer.per_image(clean, clean)
    close = scorer.per_image(noisy, clean)
    far = scorer.per_image(other, clean)
    assert scorer.weights_source == weights.locate_lpips_alexnet_weights().label
    assert same.shape == (4,) and same.abs().max().item() < 1e-6
    assert bool((close > 1e-4).all()) and bool((close < far).all()), (close, far)
    assert scorer.score(noisy, clean) == pytest.approx(close.mean().item(), rel=1e-6)


def test_gray_images_score_as_their_three_channel_copies_and_batches_do_not_interact(scorer, make_shapes):
    a, b = make_shapes(5, size=48, seed=3), make_shapes(5, size=48, seed=4)
    gray = scorer.per_image(a, b)
    rgb = scorer.per_image(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1))
    torch.testing.assert_close(gray, rgb)
    one_by_one = torch.cat([scorer.per_image(a[i : i + 1], b[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(gray, one_by_one, rtol=1e-5, atol=1e-6)


def test_lpips_rejects_mismatched_shapes(scorer):
    with pytest.raises(ValueError, match="same shape"):
        scorer.per_image(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 16, 16))


def test_small_images_are_upsampled_to_the_minimum_side_first(scorer, make_shapes):
    assert [upsample_factor(side, side, 64) for side in (16, 32, 33, 64, 100)] == [4, 2, 2, 1, 1]
    assert upsample_factor(32, 48, 64) == 2  # the shorter side decides
    a, b = make_shapes(3, size=32, seed=5), make_shapes(3, size=32, seed=6)

    def enlarged(x):
        return torch.nn.functional.interpolate(to_rgb(x), scale_factor=2, mode="bilinear")

    with torch.inference_mode():
        expected = scorer.model(enlarged(a), enlarged(b)).flatten()
    torch.testing.assert_close(scorer.per_image(a, b), expected)
    # 16-px images, which AlexNet could not see at all, are measured
    small = scorer.per_image(make_shapes(2, size=16, seed=7), make_shapes(2, size=16, seed=8))
    assert bool(torch.isfinite(small).all()) and bool((small > 0).all())
