"""Kedro datasets for tensors and checkpoints, written atomically and read without pickle.

* :class:`TensorBundleDataset` stores a ``dict[str, Tensor | ndarray | json-able]`` as ``.npz``
  (arrays) with a JSON side entry for plain values; loads with ``allow_pickle=False``. The
  format is ``engine.catalog_files``' (readable without Kedro).
* :class:`TorchCheckpointDataset` stores a checkpoint dict (state_dicts + config) with
  ``torch.save`` and loads it with ``weights_only=True``. The loaded dict gains the key
  ``catalog_version`` (the version folder it came from, or ``None`` when unversioned) so a
  downstream checkpoint can record which upstream version it was built from.

Both write through ``engine.checkpoint.atomic_write``: a temporary file in the target folder,
moved into place once complete, so a killed process never leaves a half-written file under the
final name. A versioned save is published with a hard link, which fails instead of replacing a
file that appeared under the same version meanwhile.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import torch
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version

from ibmd_pipeline.engine.catalog_files import read_bundle, write_bundle
from ibmd_pipeline.engine.checkpoint import atomic_write, load_checkpoint


class _LocalVersionedDataset(AbstractVersionedDataset):
    """Shared plumbing: a local file path, optional Kedro versioning."""

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if "://" in filepath and not filepath.startswith("file://"):
            raise DatasetError(
                f"{type(self).__name__} writes local files only (atomic rename); got '{filepath}'"
            )
        path = filepath.removeprefix("file://")
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=lambda p: Path(p).exists(),
            glob_function=lambda pattern: [str(p) for p in Path("/").glob(pattern.lstrip("/"))]
            if pattern.startswith("/")
            else [str(p) for p in Path().glob(pattern)],
        )

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    def _exists(self) -> bool:
        try:
            return Path(self._get_load_path()).exists()
        except DatasetError:
            return False

    def _load_version_name(self, load_path: PurePosixPath) -> str | None:
        return load_path.parent.name if self._version is not None else None


class TensorBundleDataset(_LocalVersionedDataset):
    """A dict of tensors/arrays (and plain JSON-able values) as one ``.npz`` file."""

    def load(self) -> dict[str, Any]:
        load_path = Path(self._get_load_path())
        try:
            return read_bundle(load_path)
        except (OSError, ValueError, EOFError) as err:
            raise DatasetError(f"cannot read tensor bundle '{load_path}': {err}") from err

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"{type(self).__name__} saves a dict, got {type(data).__name__}")
        save_path = Path(self._get_save_path())
        atomic_write(save_path, lambda f: write_bundle(f, data), overwrite=self._version is None)


class TorchCheckpointDataset(_LocalVersionedDataset):
    """A checkpoint dict saved with ``torch.save`` and loaded with ``weights_only=True``."""

    def load(self) -> dict[str, Any]:
        load_path = PurePosixPath(self._get_load_path())
        payload = load_checkpoint(Path(load_path))
        payload["catalog_version"] = self._load_version_name(load_path)
        return payload

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"{type(self).__name__} saves a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "catalog_version"}
        save_path = Path(self._get_save_path())
        atomic_write(save_path, lambda f: torch.save(data, f), overwrite=self._version is None)
