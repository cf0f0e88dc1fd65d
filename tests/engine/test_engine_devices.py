"""Device selection, CPU threads, device descriptions and the bf16 autocast switch."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.devices import (
    autocast_context,
    available_cores,
    configure_threads,
    describe_device,
    select_device,
)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_and_cpu():
    assert select_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_names_the_key_and_the_choices(name):
    with pytest.raises(ConfigError) as info:
        select_device(name)
    assert info.value.key == "engine.device"
    assert "'auto', 'cpu', 'cuda', 'cuda:N', 'mps'" in str(info.value)


def test_non_string_device_is_rejected():
    with pytest.raises(ConfigError, match="expected a string"):
        select_device(0)  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="CUDA is not available") as info:
            select_device(name)
        assert info.value.key == "engine.device"


def test_cuda_index_out_of_range():
    with pytest.raises(ConfigError, match="cuda:99" if HAS_CUDA else "not available"):
        select_device("cuda:99")


def test_mps_unavailable_is_a_clear_error():
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        assert select_device("mps").type == "mps"
    else:
        with pytest.raises(ConfigError, match="MPS is not available"):
            select_device("mps")


def test_configure_threads(restore_threads):
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert configure_threads(0) == available_cores() == torch.get_num_threads()
    assert configure_threads(1) == 1  # idempotent, may be called again
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError) as info:
            configure_threads(bad)  # type: ignore[arg-type]
        assert info.value.key == "engine.num_threads"


def test_describe_cpu(restore_threads):
    torch.set_num_threads(1)
    text = describe_device("cpu")
    assert text.startswith("cpu (1 threads, ") and len(text) > len("cpu (1 threads, )")


def test_autocast_is_a_no_op_on_cpu_unless_asked():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(torch.device("cpu"), bf16=True):
        assert (a @ b).dtype == torch.float32
    with autocast_context("cpu", bf16=True, allow_cpu=True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context("cpu", bf16=False, allow_cpu=True):
        assert (a @ b).dtype == torch.float32
