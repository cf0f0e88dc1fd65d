"""Kedro datasets for tensors and checkpoints, on a local disk or in an object store, read without pickle.

* :class:`TensorBundleDataset` stores a ``dict[str, Tensor | ndarray | json-able]`` as ``.npz``
  (arrays) with a JSON side entry for plain values; loads with ``allow_pickle=False``. The
  format is ``engine.catalog_files``' (readable without Kedro).
* :class:`TorchCheckpointDataset` stores a checkpoint dict (state_dicts + config) with
  ``torch.save`` and loads it with ``weights_only=True``. The loaded dict gains the key
  ``catalog_version`` (the version folder it came from, or ``None`` when unversioned) so a
  downstream checkpoint can record which upstream version it was built from.

:class:`VersionedFileDataset`, the base of every project dataset, follows kedro-datasets' own
(e.g. ``pickle.PickleDataset``): ``filepath`` is a local path or a URL that fsspec knows
(``s3://bucket/...``, ``gs://bucket/...``, ``memory:///...``), ``credentials`` and ``fs_args``
are the filesystem's arguments (from ``credentials.yml`` and the catalog entry), and Kedro's
versioning stores ``<filepath>/<version>/<file name>`` and loads the latest version.

Writes are atomic wherever the store allows (``engine.storage.write_atomically``): a local file
is written to a temporary sibling and moved into place (a versioned save is published with a hard
link, which fails instead of replacing a file that appeared under the same version meanwhile); an
object is uploaded complete in one call, after the content was fully written, conditionally when
versioned. A version is therefore visible only once its file is complete: Kedro lists the versions
that hold the file, and an object store shows an object only once its upload has completed.

A fault of the store (unreachable endpoint, missing or refused credentials, no such bucket, backend
not installed) surfaces as one ``DatasetError`` that names the file and what to check.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch
from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, VersionNotFoundError

from ibmd_pipeline.engine.catalog_files import read_bundle, write_bundle
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.storage import (
    StorageError,
    is_local,
    local_path,
    read_bytes,
    storage_errors,
    url_to_fs,
    write_atomically,
)

__all__ = ["TensorBundleDataset", "TorchCheckpointDataset", "VersionedFileDataset"]


class VersionedFileDataset(AbstractVersionedDataset):
    """One file, optionally versioned by Kedro, on a local disk or in an object store.

    Args:
        filepath: a local path (relative to the project root) or a URL such as
            ``s3://bucket/data/06_models/teacher.pt``.
        version: Kedro's load and save versions (from ``versioned: true`` in the catalog).
        credentials: the filesystem's credentials, e.g. ``{"key": ..., "secret": ...,
            "client_kwargs": {"endpoint_url": ...}}`` for s3fs or ``{"token": ...}`` for gcsfs.
        fs_args: further filesystem arguments (merged with ``credentials``).
        metadata: free-form metadata for the catalog, ignored by the dataset.

    Subclasses read with :meth:`_read_bytes` (or :meth:`_load_file` for readers that take a
    file name or URL) and write with :meth:`_write`.
    """

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        filepath = os.fspath(filepath)
        self._storage_options = {**(deepcopy(credentials) or {}), **(deepcopy(fs_args) or {})}
        self.metadata = metadata
        if is_local(filepath):
            self._fs = None
            self._protocol = "file"
            path = local_path(filepath).as_posix()
            exists, glob = _local_exists, _local_glob
        else:
            with self._store_faults():
                self._fs, path = url_to_fs(filepath, **self._storage_options)
            self._protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
            exists, glob = self._remote_exists, self._remote_glob
        super().__init__(
            filepath=PurePosixPath(path), version=version, exists_function=exists, glob_function=glob
        )

    # ----------------------------------------------------------------- locations

    def _url(self, path: PurePosixPath | str) -> str:
        """``path`` (inside the filesystem) as the URL or local path that names it in messages."""
        return str(path) if self._fs is None else self._fs.unstrip_protocol(str(path))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._url(self._filepath), "protocol": self._protocol, "version": self._version}

    def _remote_exists(self, path: str) -> bool:
        with storage_errors(self._url(path), "look up"):
            return self._fs.exists(path)

    def _remote_glob(self, pattern: str) -> list[str]:
        # Another process may have added a version since this filesystem listed the folder.
        self._fs.invalidate_cache(str(self._filepath))
        with storage_errors(self._url(self._filepath), "list the versions of"):
            found = self._fs.glob(pattern)
            if not found:  # an object store lists nothing in a bucket that is not there: say so
                container = str(self._filepath).lstrip("/").split("/", 1)[0]
                if not self._fs.exists(container):
                    raise FileNotFoundError(f"'{self._fs.unstrip_protocol(container)}' does not exist")
            return found

    @contextlib.contextmanager
    def _store_faults(self) -> Iterator[None]:
        """A fault of the store as one ``DatasetError`` carrying the storage error's message."""
        try:
            yield
        except StorageError as err:
            raise DatasetError(str(err)) from err
        except VersionNotFoundError as err:
            # Kedro wraps a failed listing in "Did not find any versions ... Exception: ...".
            if isinstance(err.__cause__, StorageError):
                raise DatasetError(str(err.__cause__)) from err.__cause__
            raise

    def _load_path(self) -> PurePosixPath:
        with self._store_faults():
            return self._get_load_path()

    def _save_path(self) -> PurePosixPath:
        with self._store_faults():
            return self._get_save_path()

    def _load_version_name(self, load_path: PurePosixPath) -> str | None:
        return load_path.parent.name if self._version is not None else None

    def _exists(self) -> bool:
        try:
            load_path = self._load_path()
        except VersionNotFoundError:  # no version yet; a fault of the store is raised, not hidden
            return False
        with self._store_faults():
            return self._exists_function(str(load_path))

    # ----------------------------------------------------------------- reading and writing

    def _read_bytes(self) -> bytes:
        """The content of the file that a load reads (the latest version when versioned)."""
        load_path = self._load_path()
        with self._store_faults():
            return read_bytes(self._url(load_path), **self._storage_options)

    def _load_file(self, load: Callable[[str], Any]) -> Any:
        """``load(name)`` of the file a load reads: its local path, or its URL for a remote store.

        For readers that take a file name and do their own reading (and their own errors), e.g.
        ``load_checkpoint``, which names the file in each of them.
        """
        load_path = self._load_path()
        with self._store_faults():
            return load(self._url(load_path))

    def _write(self, write: Callable[[IO[bytes]], None]) -> None:
        """Write the file a save writes through ``write(handle)``, atomically where the store allows.

        A versioned save never replaces a file (``FileExistsError``); an unversioned one replaces
        the previous file in one step.
        """
        save_path = self._save_path()
        with self._store_faults():
            write_atomically(
                self._url(save_path), write, overwrite=self._version is None, **self._storage_options
            )


def _local_exists(path: str) -> bool:
    return Path(path).exists()


def _local_glob(pattern: str) -> list[str]:
    if pattern.startswith("/"):
        return [str(p) for p in Path("/").glob(pattern.lstrip("/"))]
    return [str(p) for p in Path().glob(pattern)]


class TensorBundleDataset(VersionedFileDataset):
    """A dict of tensors/arrays (and plain JSON-able values) as one ``.npz`` file."""

    def load(self) -> dict[str, Any]:
        def read(name: str) -> dict[str, Any]:
            try:
                return read_bundle(name, **self._storage_options)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise DatasetError(f"cannot read tensor bundle '{name}': {err}") from err

        return self._load_file(read)

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"{type(self).__name__} saves a dict, got {type(data).__name__}")
        self._write(lambda handle: write_bundle(handle, data))


class TorchCheckpointDataset(VersionedFileDataset):
    """A checkpoint dict saved with ``torch.save`` and loaded with ``weights_only=True``."""

    def load(self) -> dict[str, Any]:
        load_path = self._load_path()
        payload = self._load_file(lambda name: load_checkpoint(name, **self._storage_options))
        payload["catalog_version"] = self._load_version_name(load_path)
        return payload

    def save(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            raise DatasetError(f"{type(self).__name__} saves a dict, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "catalog_version"}
        self._write(lambda handle: torch.save(data, handle))
