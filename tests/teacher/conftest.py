"""Tiny synthetic pair bundles (16x16 gray shapes) and tiny teacher settings, for fast tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ibmd_pipeline.degradations import TaskConfig, degrade
from ibmd_pipeline.engine.config import config_to_dict

IMAGE_SIZE = 16


def shapes(n: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``n`` white rectangles and discs of random size and place on black, in ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).view(size, 1).float()
    cols = torch.arange(size).view(1, size).float()
    images = []
    for i in range(n):
        cy, cx = (torch.rand(2, generator=generator) * (size - 6) + 3).tolist()
        radius = float(torch.rand(1, generator=generator)) * 3 + 2
        if i % 2:
            inside = ((rows - cy) ** 2 + (cols - cx) ** 2) <= radius**2
        else:
            inside = ((rows - cy).abs() <= radius) & ((cols - cx).abs() <= radius * 0.6)
        images.append(inside.float() * 2 - 1)
    return torch.stack(images).unsqueeze(1)


def make_bundle(kind: str, n: int, seed: int, size: int = IMAGE_SIZE) -> dict[str, Any]:
    """A degrade-pipeline bundle of ``n`` synthetic images for task ``kind``."""
    task = TaskConfig(kind=kind)
    clean = shapes(n, seed, size)
    degraded = degrade(clean, task, torch.Generator().manual_seed(seed + 1))
    bundle: dict[str, Any] = {
        "clean": clean,
        "corrupted": degraded.corrupted,
        "labels": torch.arange(n) % 2,
        "task": config_to_dict(task),
        "image_size": size,
        "channels": 1,
    }
    if degraded.mask is not None:
        bundle["mask"] = degraded.mask
    return bundle


def tiny_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """``params:teacher`` for a tiny teacher; ``sections`` replace/extend the named sections."""
    params: dict[str, Any] = {
        "model": {"network": {"preset": "tiny"}},
        "train": {
            "steps": 10,
            "batch_size": 8,
            "lr": 2e-3,
            "ema_decay": 0.9,
            "log_every": 2,
            "warmup_steps": 2,
        },
        "sampler": {"grid_nfe": [1, 3], "n_examples": 3},
        "validation": {"every": 4, "batch_size": 6},
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values} if isinstance(values, dict) else values
    return params


@pytest.fixture(name="make_bundle", scope="session")
def make_bundle_fixture():
    """:func:`make_bundle` for tests."""
    return make_bundle


@pytest.fixture(name="tiny_params", scope="session")
def tiny_params_fixture():
    """:func:`tiny_params` for tests."""
    return tiny_params


@pytest.fixture(scope="session")
def sr_bundles() -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, val) bundles of 4x super-resolution (average pooling)."""
    return make_bundle("sr4x_pool", 24, seed=0), make_bundle("sr4x_pool", 8, seed=100)


@pytest.fixture(scope="session")
def sr_teacher(sr_bundles) -> dict[str, Any]:
    """A tiny sr4x_pool teacher checkpoint (10 steps)."""
    from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

    train, val = sr_bundles
    checkpoint, _ = train_teacher(
        parse_teacher_config(tiny_params(), seed=0), train, val, task={"kind": "sr4x_pool"}, device="cpu",
        progress=False,
    )
    return checkpoint
