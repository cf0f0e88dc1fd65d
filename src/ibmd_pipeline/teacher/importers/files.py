"""Reading the official files: weights with ``weights_only=True``, I2SB's options without running code.

- I2SB (NVlabs/I2SB ``i2sb/runner.py``) saves ``latest.pt`` = ``{"net": Image256Net.state_dict()
  (keys "diffusion_model.<ADM key>"), "ema": torch_ema ExponentialMovingAverage.state_dict()
  ({"decay", "num_updates", "shadow_params": [one tensor per net parameter, in order],
  "collected_params"}), "optimizer": ..., "sched": ...}`` and ``options.pkl``, the pickled
  ``argparse.Namespace`` of its training options.
- DDBM (alexzhou907/DDBM ``ddbm/train_util.py``) saves ``ema_<rate>_<step>.pt`` and
  ``model_<step>.pt``, each the plain ``UNetModel`` state dict (the published files are EMA).

Only tensors and plain values are loaded. ``options.pkl`` is read by an unpickler that knows
the ``Namespace`` class and path classes and nothing else.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
from torch import Tensor

from ibmd_pipeline.teacher.importers.adm import TeacherImportError

__all__ = [
    "OfficialWeights",
    "align_ema",
    "file_sha256",
    "read_ddbm_checkpoint",
    "read_i2sb_checkpoint",
    "read_i2sb_options",
]

I2SB_NET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class OfficialWeights:
    """The ADM weights of an official file: raw and EMA.

    ``ema`` is the same dict as ``raw`` when the file holds one set, or I2SB's torch_ema shadow
    list, which :func:`align_ema` names once ``raw``'s keys are known to be right.
    """

    raw: dict[str, Tensor]
    ema: dict[str, Tensor] | list[Tensor]
    dtype: str
    step: int
    details: dict[str, Any]


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (recorded with an import, as its provenance)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _load(path: Path) -> Any:
    if not path.is_file():
        raise TeacherImportError(f"checkpoint '{path}' does not exist")
    try:
        try:
            # mmap keeps a 2 GB checkpoint out of memory until its tensors are converted
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # torch raises several types for truncated, corrupted or unsafe files
        first = str(err).splitlines()[0] if str(err) else ""
        raise TeacherImportError(
            f"checkpoint '{path}' cannot be read with weights_only=True (truncated, corrupted, not a "
            f"torch file, or it pickles classes): {type(err).__name__}: {first}"
        ) from err


def _strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` that DataParallel/DDP wrappers put before every key, if all keys have it."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _tensor_dict(value: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise TeacherImportError(f"{where} is not a state dict (got {type(value).__name__})")
    bad = [key for key, tensor in value.items() if not isinstance(key, str) or not isinstance(tensor, Tensor)]
    if bad:
        raise TeacherImportError(f"{where} holds entries that are not named tensors: {bad[:5]}")
    return _strip_module_prefix(value)


def _dtype_name(state: Mapping[str, Tensor]) -> str:
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}))


def read_i2sb_checkpoint(path: Path) -> OfficialWeights:
    """The ADM weights of I2SB's ``latest.pt``: ``net`` (raw) and its torch_ema shadow (EMA, which
    I2SB samples with). The EMA list is matched to the parameters by position, as torch_ema does."""
    payload = _load(path)
    if not isinstance(payload, Mapping) or "net" not in payload:
        keys = list(payload) if isinstance(payload, Mapping) else type(payload).__name__
        plain = isinstance(payload, Mapping) and any(str(k).startswith("input_blocks.") for k in payload)
        raise TeacherImportError(
            f"'{path}' is not an I2SB latest.pt: expected the keys 'net' and 'ema', found {keys}"
            + ("; a plain state dict is DDBM's format (teacher_import.format: ddbm)" if plain else "")
        )
    net = _tensor_dict(payload["net"], f"'{path}' ['net']")
    foreign = [key for key in net if not key.startswith(I2SB_NET_PREFIX)]
    if foreign:
        raise TeacherImportError(
            f"'{path}' ['net'] has keys outside I2SB's Image256Net.diffusion_model: {foreign[:5]}"
            + (f" ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        )
    raw = {key[len(I2SB_NET_PREFIX):]: value for key, value in net.items()}

    ema_state = payload.get("ema")
    details: dict[str, Any] = {"top_level_keys": sorted(str(k) for k in payload)}
    if ema_state is None:
        raise TeacherImportError(
            f"'{path}' has no 'ema': I2SB samples with its EMA weights, which are missing"
        )
    shadow = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, Tensor) for t in shadow):
        raise TeacherImportError(
            f"'{path}' ['ema'] is not a torch_ema state (expected a list 'shadow_params' of tensors)"
        )
    details.update(ema_decay=ema_state.get("decay"), ema_num_updates=ema_state.get("num_updates"))
    return OfficialWeights(raw=raw, ema=list(shadow), dtype=_dtype_name(raw), step=0, details=details)


def align_ema(raw: Mapping[str, Tensor], shadow: list[Tensor], path: Path) -> dict[str, Tensor]:
    """Name torch_ema's shadow list by ``raw``'s keys: one shadow tensor per parameter, in order
    (the network has no buffers, so its state dict lists exactly its parameters)."""
    names = list(raw)
    if len(shadow) != len(names):
        raise TeacherImportError(
            f"'{path}' ['ema'] holds {len(shadow)} shadow parameters for the {len(names)} tensors of 'net'"
        )
    mismatched = [
        f"{name} net {tuple(raw[name].shape)} vs ema {tuple(tensor.shape)}"
        for name, tensor in zip(names, shadow, strict=True)
        if tuple(tensor.shape) != tuple(raw[name].shape)
    ]
    if mismatched:
        raise TeacherImportError(
            f"'{path}' ['ema'] shadow parameters do not line up with 'net': {mismatched[:5]}"
        )
    return dict(zip(names, shadow, strict=True))


def read_ddbm_checkpoint(path: Path) -> OfficialWeights:
    """A DDBM ``UNetModel`` state dict (``e2h_ema_0.9999_420000.pt``...); the step is read from the name."""
    payload = _load(path)
    if isinstance(payload, Mapping) and "net" in payload:
        raise TeacherImportError(
            f"'{path}' has a 'net' entry: that is I2SB's format (teacher_import.format: i2sb)"
        )
    state = _tensor_dict(payload, f"'{path}'")
    match = re.search(r"_(\d+)\.pt$", path.name)
    ema_rate = re.search(r"ema_([0-9.]+)_\d+\.pt$", path.name)
    details = {"ema_rate": float(ema_rate.group(1)) if ema_rate else None}
    step = int(match.group(1)) if match else 0
    return OfficialWeights(raw=state, ema=state, dtype=_dtype_name(state), step=step, details=details)


class _OptionsUnpickler(pickle.Unpickler):
    """Rebuilds an ``argparse.Namespace`` of plain values and paths, and refuses any other global."""

    ALLOWED = {
        ("argparse", "Namespace"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib", "Path"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
        ("pathlib._local", "WindowsPath"),
        ("pathlib._local", "PureWindowsPath"),
        ("pathlib._local", "Path"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}': options.pkl may hold an argparse "
                "Namespace of plain values and paths only"
            )
        if module == "pathlib._local":
            module = "pathlib"
        if (module, name) in {("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}:
            name = "PureWindowsPath"  # a Windows path cannot be instantiated on POSIX
        return super().find_class(module, name)


def read_i2sb_options(path: Path) -> dict[str, Any]:
    """I2SB's ``options.pkl`` as a plain dict (paths as strings), read without running any code."""
    if not path.is_file():
        raise TeacherImportError(f"I2SB options file '{path}' does not exist")
    try:
        with path.open("rb") as handle:
            namespace = _OptionsUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise TeacherImportError(f"'{path}' is not an I2SB options.pkl: {err}") from err
    values = vars(namespace) if hasattr(namespace, "__dict__") else None
    if not isinstance(values, dict):
        raise TeacherImportError(f"'{path}' holds a {type(namespace).__name__}, expected I2SB's Namespace")
    return {key: str(value) if isinstance(value, PurePath) else value for key, value in values.items()}
