"""Shared test setup: small thread counts so the suite behaves on 2 cores, offline, no telemetry."""

import os

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fast_selection import FAST_MODULES, FAST_TESTS  # noqa: E402

torch.set_num_threads(int(os.environ.get("IBMD_TEST_THREADS", "2")))


@pytest.fixture
def torch_generator() -> torch.Generator:
    """A seeded CPU generator for reproducible tensors."""
    return torch.Generator().manual_seed(0)


TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the quick loop's tests ``fast`` (``tests/fast_selection.py``; ``make test-fast``)."""
    for item in items:
        node = Path(item.path).relative_to(TESTS).as_posix()
        test_id = f"{node}::{item.name}"
        if node in FAST_MODULES or any(test_id.startswith(prefix) for prefix in FAST_TESTS):
            item.add_marker(pytest.mark.fast)
