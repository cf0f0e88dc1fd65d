"""Device selection, CPU threads, device descriptions, the bf16 autocast switch, memory format,
pinned host->device batches and in-place torch.compile."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import (
    CompileConfig,
    autocast_context,
    available_cores,
    compile_module,
    configure_threads,
    describe_device,
    gather_to_device,
    is_compiled,
    pins_host_memory,
    place_module,
    select_device,
    stage_on_host,
    uses_channels_last,
)
from ibmd_pipeline.engine.ema import EMA
from ibmd_pipeline.networks.unet import UNet, unet_preset

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


# --------------------------------------------------------------------------- memory format


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(unet_preset("tiny", image_size=8, in_channels=2, out_channels=1))
    with torch.no_grad():  # the zero-initialised output head would hide any difference
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return net


@pytest.mark.parametrize(
    ("device", "expected"),
    [("cpu", False), ("cuda", True), ("cuda:1", True), (torch.device("cuda", 0), True)],
)
def test_channels_last_and_pinned_memory_are_decided_for_cuda_only(device, expected):
    # Pure decisions on the device name: no CUDA call is made, so this runs on any machine.
    assert uses_channels_last(device) is expected
    assert pins_host_memory(device) is expected


def test_place_module_keeps_nchw_on_the_cpu_and_nhwc_when_asked():
    def conv_weights(net):
        return [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    plain = place_module(tiny_unet(), "cpu")
    assert all(w.is_contiguous() for w in conv_weights(plain))
    nhwc = place_module(tiny_unet(), "cpu", channels_last=True)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(nhwc))
    assert not all(w.is_contiguous() for w in conv_weights(nhwc))  # really another layout


def test_unet_in_channels_last_computes_the_same_outputs_gradients_and_state_dict():
    plain, nhwc = tiny_unet(), place_module(tiny_unet(), "cpu", channels_last=True)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([0.1, 0.5, 0.9])
    out_plain, out_nhwc = plain(x, level), nhwc(x, level)
    torch.testing.assert_close(out_nhwc, out_plain, rtol=1e-5, atol=1e-5)
    out_plain.square().mean().backward()
    out_nhwc.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), nhwc.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Same keys and values: the weights load into a model of the other format.
    reloaded = tiny_unet(seed=5)
    reloaded.load_state_dict(nhwc.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in reloaded.state_dict().items())


# --------------------------------------------------------------------------- host -> device


def test_host_staging_and_batch_gathering_change_nothing_on_the_cpu():
    source = torch.randn(10, 1, 4, 4)
    assert stage_on_host(source, "cpu") is source  # no copy, no pinning
    indices = torch.tensor([7, 2, 2, 0])
    batch = gather_to_device(source, indices, torch.device("cpu"))
    assert torch.equal(batch, source[indices]) and batch.device.type == "cpu"
    with pytest.raises(ValueError, match="CPU tensor"):
        stage_on_host(torch.empty(1, device="meta"), "cpu")


# --------------------------------------------------------------------------- torch.compile


def test_compile_config_names_the_key_and_the_allowed_values():
    assert parse_config(CompileConfig, None, "teacher.train.compile") == CompileConfig()
    with pytest.raises(ConfigError) as err:
        parse_config(CompileConfig, {"mode": "fastest"}, "teacher.train.compile")
    assert err.value.key == "teacher.train.compile.mode" and "'max-autotune'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(CompileConfig, {"backend": "tensorrt"}, "distill.train.compile")
    assert err.value.key == "distill.train.compile.backend" and "'aot_eager'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(CompileConfig, {"backend": "eager", "mode": "reduce-overhead"}, "distill.train.compile")
    assert err.value.key == "distill.train.compile.mode" and "inductor" in str(err.value)


def test_compile_module_is_in_place_and_keeps_the_plain_state_dict():
    net = tiny_unet()
    keys = list(net.state_dict())
    assert compile_module(net, CompileConfig(enabled=False)) is net and not is_compiled(net)
    reference = tiny_unet()
    assert compile_module(net, CompileConfig(enabled=True, backend="eager")) is net
    assert is_compiled(net) and isinstance(net, UNet)
    assert list(net.state_dict()) == keys  # no _orig_mod. prefixes
    x, level = torch.randn(2, 2, 8, 8), torch.tensor([0.2, 0.7])
    torch.testing.assert_close(net(x, level), reference(x, level), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="before compiling"):
        EMA(net, 0.9)  # its deep copy would still call the original network
