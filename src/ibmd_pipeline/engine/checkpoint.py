"""Checkpoints: state_dicts plus the config that built them, written atomically.

A checkpoint is a plain dict such as ``{"config": {...}, "model": state_dict, "ema": state_dict,
"optimizer": state_dict, "step": int}``. It holds only tensors and plain Python values, so it
loads with ``torch.load(..., weights_only=True)``: no class is ever unpickled.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or built for something else."""


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None], *, overwrite: bool = True) -> Path:
    """Write a file through ``write(fileobj)`` into a temporary sibling, then move it into place.

    A process killed mid-write leaves at most a ``.tmp`` file, never a truncated ``path``.
    ``overwrite=False`` publishes with a hard link, which fails with ``FileExistsError`` when
    ``path`` already exists (two runs that picked the same catalog version never mix files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            os.link(tmp_name, path)
            os.unlink(tmp_name)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict to ``path``."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error names the file on any fault."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupted/unsafe files
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read (truncated, corrupted or not a weights-only "
            f"checkpoint): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(payload).__name__}, expected a dict")
    return payload
