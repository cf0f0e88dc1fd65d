"""Properties of the paper's degradations: shapes, ranges, exact values and determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ibmd_pipeline.degradations import (
    SYNTHETIC_TASKS,
    TaskConfig,
    center_mask,
    check_image_size,
    degrade,
    from_uint8,
    inpaint_center,
    jpeg_compress,
    sketch_edges,
    sr4x_bicubic,
    sr4x_pool,
    to_uint8,
)
from ibmd_pipeline.engine.config import ConfigError, parse_config


def smooth_images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurred noise in [-1, 1]: image-like content with structure at several scales."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, channels, size, size, generator=generator)
    kernel = torch.ones(channels, 1, 5, 5) / 25.0
    blurred = F.conv2d(F.pad(noise, (2, 2, 2, 2), mode="reflect"), kernel, groups=channels)
    low, high = blurred.amin(dim=(2, 3), keepdim=True), blurred.amax(dim=(2, 3), keepdim=True)
    return (blurred - low) / (high - low) * 2.0 - 1.0


def square_image(size: int = 32) -> torch.Tensor:
    """A white square (side size/2, centred) on black, (1, 1, size, size)."""
    x = -torch.ones(1, 1, size, size)
    x[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return x


@pytest.mark.parametrize("kind", SYNTHETIC_TASKS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_task_keeps_shape_dtype_and_range(kind, channels, torch_generator):
    x = smooth_images(4, channels, 16)
    out = degrade(x, TaskConfig(kind=kind), torch_generator)
    assert out.corrupted.shape == x.shape and out.corrupted.dtype == torch.float32
    assert torch.isfinite(out.corrupted).all()
    if kind == "inpaint_center":
        assert out.mask is not None and out.mask.shape == (4, 1, 16, 16)
        known = out.mask.expand_as(x) == 0
        assert out.corrupted[known].abs().max() <= 1.0
    else:
        assert out.mask is None
        assert out.corrupted.min() >= -1.0 and out.corrupted.max() <= 1.0


def test_pool_is_the_exact_block_mean_repeated_over_each_block():
    x = smooth_images(2, 3, 16)
    out = sr4x_pool(x)
    block_means = x.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))  # (N, C, rows of blocks, cols of blocks)
    expected = block_means.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_pool_of_a_piecewise_constant_image_is_the_identity():
    x = square_image(32)  # the square's edges (8 and 24) lie on the 4x4 block grid
    torch.testing.assert_close(sr4x_pool(x), x)


def test_bicubic_matches_pil_antialiased_bicubic_downsampling():
    clean = smooth_images(3, 1, 32, seed=1)
    levels = to_uint8(clean)  # work on the 8-bit image PIL sees
    x = from_uint8(levels)
    low = sr4x_bicubic(x)[..., ::4, ::4]
    reference = np.stack(
        [np.asarray(Image.fromarray(im[..., 0]).resize((8, 8), Image.Resampling.BICUBIC)) for im in levels]
    )
    ours = (low[:, 0] + 1.0) * 127.5
    # PIL rounds to 8 bits; antialiased torch bicubic uses the same kernel support.
    assert (ours - torch.from_numpy(reference).float()).abs().max() <= 1.0


def test_bicubic_output_is_nearest_upsampled_and_differs_from_pool():
    x = smooth_images(2, 1, 32)
    out = sr4x_bicubic(x)
    blocks = out.reshape(2, 1, 8, 4, 8, 4)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert not torch.allclose(out, sr4x_pool(x), atol=1e-3)


def test_jpeg_error_grows_as_quality_drops():
    x = smooth_images(6, 3, 32, seed=2)
    errors = [(jpeg_compress(x, q) - x).pow(2).mean().item() for q in (90, 50, 10, 5)]
    assert errors == sorted(errors) and errors[0] < errors[-1] / 5
    assert errors[0] > 0.0  # lossy even at high quality


def test_jpeg_is_deterministic_and_lands_on_8_bit_levels():
    x = smooth_images(3, 1, 16)
    first, second = jpeg_compress(x, 10), jpeg_compress(x, 10)
    assert torch.equal(first, second)
    levels = (first + 1.0) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_center_mask_covers_a_quarter_of_the_image_in_the_middle():
    mask = center_mask(2, 32, 32)
    assert mask.shape == (2, 1, 32, 32)
    assert mask.sum().item() == 2 * 16 * 16 and mask.mean().item() == 0.25
    assert mask[:, :, 8:24, 8:24].eq(1).all()
    assert mask[:, :, :8].eq(0).all() and mask[:, :, :, 24:].eq(0).all()


def test_inpaint_noise_only_in_the_hole_and_independent_of_the_content():
    a, b = smooth_images(4, 3, 32, seed=3), smooth_images(4, 3, 32, seed=4)
    out_a = inpaint_center(a, torch.Generator().manual_seed(7))
    out_b = inpaint_center(b, torch.Generator().manual_seed(7))
    hole = out_a.mask.expand_as(a).bool()
    assert torch.equal(out_a.corrupted[~hole], a[~hole])
    assert torch.equal(out_a.corrupted[hole], out_b.corrupted[hole])  # the same noise, whatever the image
    noise = out_a.corrupted[hole]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1.0) < 0.1


def test_inpaint_is_seeded():
    x = smooth_images(2, 1, 16)
    same = [inpaint_center(x, torch.Generator().manual_seed(1)).corrupted for _ in range(2)]
    other = inpaint_center(x, torch.Generator().manual_seed(2)).corrupted
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def test_sketch_draws_dark_lines_along_the_outline_only():
    x = square_image(32)
    sketch = sketch_edges(x, sigma=1.0)
    assert torch.equal(sketch, sketch_edges(x, sigma=1.0))
    assert set(sketch.unique().tolist()) == {-1.0, 1.0}
    lines = sketch[0, 0] < 0
    rows, cols = torch.nonzero(lines, as_tuple=True)
    # Every edge pixel is within one pixel of the square's border (rows/cols 8 and 24).
    distance = torch.minimum((rows - 7.5).abs(), (rows - 23.5).abs())
    distance = torch.minimum(distance, torch.minimum((cols - 7.5).abs(), (cols - 23.5).abs()))
    assert len(rows) > 40 and distance.max() <= 1.5
    assert not lines[12:20, 12:20].any() and not lines[:4].any()


def test_sketch_of_a_flat_image_is_blank_and_channels_are_copies():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.equal(sketch_edges(flat), torch.ones_like(flat))
    colour = smooth_images(2, 3, 16)
    sketch = sketch_edges(colour)
    assert torch.equal(sketch[:, 0], sketch[:, 1]) and torch.equal(sketch[:, 1], sketch[:, 2])


def test_degrade_refuses_paired_and_sizes_not_divisible_by_four():
    with pytest.raises(ValueError, match="paired"):
        degrade(smooth_images(1, 1, 16), TaskConfig(kind="paired"))
    with pytest.raises(ValueError, match="divisible by 4"):
        degrade(torch.zeros(1, 1, 30, 30), TaskConfig(kind="sr4x_pool"))
    assert degrade(torch.zeros(1, 1, 30, 30), TaskConfig(kind="jpeg")).corrupted.shape == (1, 1, 30, 30)


def test_task_config_errors_name_the_key_and_allowed_values():
    with pytest.raises(ConfigError, match="allowed values") as err:
        parse_config(TaskConfig, {"kind": "denoise"}, "task")
    assert err.value.key == "task.kind" and "'sr4x_bicubic'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(TaskConfig, {"kind": "jpeg", "jpeg_quality": 0}, "task")
    assert err.value.key == "task.jpeg_quality"
    assert parse_config(TaskConfig, {}, "task") == TaskConfig(kind="sr4x_bicubic", jpeg_quality=10)


def test_image_size_must_be_divisible_by_four_for_super_resolution_only():
    with pytest.raises(ConfigError, match="divisible by 4") as err:
        check_image_size(TaskConfig(kind="sr4x_bicubic"), 30)
    assert err.value.key == "data.image_size" and "28 or 32" in str(err.value)
    check_image_size(TaskConfig(kind="inpaint_center"), 30)
