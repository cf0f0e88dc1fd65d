"""Checkpoints: state_dicts plus the config that built them, written atomically.

A checkpoint is a plain dict such as ``{"config": {...}, "model": state_dict, "ema": state_dict,
"optimizer": state_dict, "step": int}``. It holds only tensors and plain Python values, so it
loads with ``torch.load(..., weights_only=True)``: no class is ever unpickled.

A checkpoint lives on the local disk or in an object store (``s3://``, ``gs://``, ...):
``engine.storage`` reads and writes it and names the file in every error; ``storage_options``
are fsspec's filesystem arguments (credentials, endpoint).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from ibmd_pipeline.engine.storage import (
    atomic_write,
    is_local,
    local_path,
    read_bytes,
    write_atomically,
)

__all__ = ["CheckpointError", "atomic_write", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or built for something else."""


def save_checkpoint(path: Path | str, payload: dict[str, Any], **storage_options: Any) -> Path | str:
    """Atomically ``torch.save`` a checkpoint dict to ``path`` (a local path or a URL)."""
    if is_local(path):
        return atomic_write(local_path(path), lambda handle: torch.save(payload, handle))
    return write_atomically(path, lambda handle: torch.save(payload, handle), **storage_options)


def load_checkpoint(
    path: Path | str, map_location: str | torch.device = "cpu", **storage_options: Any
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error names the file on any fault.

    ``path`` is a local path or a URL. A damaged or unsafe file, or a missing local one, is a
    :class:`CheckpointError`; a fault of a remote store (unreachable, refused, no such bucket or
    object) is a :class:`~ibmd_pipeline.engine.storage.StorageError`.
    """
    name = os.fspath(path)
    if is_local(name):
        source: Path | io.BytesIO = local_path(name)
        if not source.is_file():
            raise CheckpointError(f"checkpoint '{source}' does not exist")
    else:
        source = io.BytesIO(read_bytes(name, **storage_options))
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupted/unsafe files
        raise CheckpointError(
            f"checkpoint '{name}' cannot be read (truncated, corrupted or not a weights-only "
            f"checkpoint): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint '{name}' holds a {type(payload).__name__}, expected a dict")
    return payload
