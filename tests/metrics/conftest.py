"""Shared fixtures of the metrics tests: the weights set-up step, built networks, toy images.

The metric networks load from torch hub's cache as the library does, so the tests need the
set-up step done (``make setup``); the tests of that step itself install into a temporary cache.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ibmd_pipeline.metrics import weights

INSTALLER_PATH = Path(__file__).resolve().parents[2] / "scripts" / "install_metric_weights.py"


def load_installer() -> ModuleType:
    """``scripts/install_metric_weights.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("install_metric_weights", INSTALLER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def installer() -> ModuleType:
    return load_installer()


@pytest.fixture(scope="session")
def fid_torchscript(installer: ModuleType) -> torch.jit.ScriptModule:
    path = installer.offline_package_file(installer.FID_OFFLINE_PACKAGE)
    return installer.load_fid_helper_torchscript(path).eval()


@pytest.fixture(scope="session")
def inception_2048() -> torch.nn.Module:
    model, _ = weights.build_fid_inception(2048)
    return model


@pytest.fixture(scope="session")
def lpips_model() -> torch.nn.Module:
    model, _ = weights.build_lpips_alexnet()
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
