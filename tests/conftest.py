"""Shared test setup: small thread counts so the suite behaves on 2 cores, offline, no telemetry."""

import os

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("IBMD_TEST_THREADS", "2")))


@pytest.fixture
def torch_generator() -> torch.Generator:
    """A seeded CPU generator for reproducible tensors."""
    return torch.Generator().manual_seed(0)
