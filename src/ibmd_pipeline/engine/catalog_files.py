"""The catalog's files, readable and writable without Kedro: tensor bundles and version folders.

The Kedro datasets (``io.datasets``) and the command-line entries (``commands/``) share these formats,
so a bundle the degrade pipeline wrote trains under torchrun, and a checkpoint trained there
becomes the catalog's newest version. Every function takes a local path or a URL of an object
store (``s3://bucket/...``, ``gs://...``, ``memory:///...``) with fsspec's ``storage_options``
(credentials, endpoint); faults of the store are ``engine.storage.StorageError`` naming the path.

**Bundles.** A bundle is a ``dict[str, Tensor | ndarray | plain value]`` (``docs/architecture.md``)
stored as one ``.npz`` file: every tensor or array is an archive member; every other value goes
into one JSON member, ``__meta_json__``. It is read with ``allow_pickle=False``, so reading
a bundle never runs code.

**Version folders.** A versioned catalog entry ``<filepath>`` is a folder of versions, each
``<filepath>/<version>/<file name>``, the file name being the entry's own. A version is the UTC
time of the Kedro session that wrote it in Kedro's format (``kedro.io.core.generate_timestamp``),
e.g. ``2026-11-26T15.04.05.123Z``; these names sort as the times do, and Kedro loads the version
that sorts last.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch

from ibmd_pipeline.engine.storage import is_local, local_path, read_bytes, storage_errors, url_to_fs

__all__ = [
    "BUNDLE_META_KEY",
    "is_version_name",
    "latest_version_file",
    "new_version_file",
    "read_bundle",
    "version_name",
    "version_of",
    "versions",
    "write_bundle",
]

#: The archive member that holds a bundle's plain (JSON) values.
BUNDLE_META_KEY = "__meta_json__"
#: Kedro's version folder names: UTC, milliseconds, ``Z``.
_VERSION_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


# --------------------------------------------------------------------------- bundles


def write_bundle(handle: IO[bytes], bundle: Mapping[str, Any]) -> None:
    """Write ``bundle`` to the open binary file ``handle`` as a compressed ``.npz`` archive."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for key, value in bundle.items():
        if isinstance(value, torch.Tensor):
            arrays[key] = value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            arrays[key] = value
        else:
            meta[key] = value
    arrays[BUNDLE_META_KEY] = np.array(json.dumps(meta))
    np.savez_compressed(handle, **arrays)


def read_bundle(path: Path | str | IO[bytes], **storage_options: Any) -> dict[str, Any]:
    """The bundle in the ``.npz`` file ``path``: arrays become tensors, the JSON member plain values.

    ``path`` is a local path, a URL or an open binary file. Raises ``FileNotFoundError`` for a
    missing local file, ``engine.storage.StorageError`` for a fault of a remote store (a missing
    object included), and ``OSError``, ``ValueError``, ``EOFError`` or ``zipfile.BadZipFile`` for
    a file that is not a readable bundle.
    """
    if hasattr(path, "read"):
        source: Path | IO[bytes] = path
    elif is_local(path):
        source = local_path(path)
        if not source.is_file():
            raise FileNotFoundError(f"bundle '{source}' does not exist")
    else:
        source = io.BytesIO(read_bytes(path, **storage_options))
    with np.load(source, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays.pop(BUNDLE_META_KEY))) if BUNDLE_META_KEY in arrays else {}
    bundle: dict[str, Any] = {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in arrays.items()}
    bundle.update(meta)
    return bundle


# --------------------------------------------------------------------------- version folders


def version_name(now: datetime.datetime | None = None) -> str:
    """The version folder name of the time ``now`` (default: the current time), e.g.
    ``2026-11-26T15.04.05.123Z``."""
    utc = datetime.timezone.utc  # noqa: UP017 - datetime.UTC needs Python 3.11, the project allows 3.10
    now = datetime.datetime.now(tz=utc) if now is None else now
    now = now.astimezone(utc)
    return now.strftime("%Y-%m-%dT%H.%M.%S.") + f"{now.microsecond // 1000:03d}Z"


def is_version_name(name: str) -> bool:
    """Whether ``name`` has the form of a version folder's name."""
    return bool(_VERSION_NAME.match(name))


def version_of(path: Path | str) -> str | None:
    """The version of a file inside a version folder (``<entry>/<version>/<file>``), else None."""
    folder = PurePosixPath(os.fspath(path)).parent.name
    return folder if is_version_name(folder) else None


def _entry_name(entry: Path | str) -> str:
    return PurePosixPath(os.fspath(entry).rstrip("/")).name


def versions(entry: Path | str, **storage_options: Any) -> list[str]:
    """The versions of the catalog entry ``entry`` that hold its file, oldest first."""
    if is_local(entry):
        entry = local_path(entry)
        if not entry.is_dir():
            return []
        return sorted(
            folder.name
            for folder in entry.iterdir()
            if is_version_name(folder.name) and (folder / entry.name).is_file()
        )
    fs, path = url_to_fs(entry, **storage_options)
    path = path.rstrip("/")
    with storage_errors(entry, "list the versions of"):
        fs.invalidate_cache(path)
        found = fs.glob(f"{path}/*/{_entry_name(entry)}")
    return sorted(name for name in (PurePosixPath(p).parent.name for p in found) if is_version_name(name))


def latest_version_file(entry: Path | str, **storage_options: Any) -> Path | str:
    """The file a load of the catalog entry ``entry`` reads: ``entry/<latest version>/<entry name>``.

    A local entry gives a ``Path``, a remote one its URL. Raises ``FileNotFoundError`` naming the
    entry when it holds no version.
    """
    found = versions(entry, **storage_options)
    name = _entry_name(entry)
    if not found:
        raise FileNotFoundError(
            f"'{os.fspath(entry)}' holds no version of '{name}' (expected "
            f"'{os.fspath(entry)}/<version>/{name}', with a version such as 2026-11-26T15.04.05.123Z)"
        )
    if is_local(entry):
        return local_path(entry) / found[-1] / name
    return f"{os.fspath(entry).rstrip('/')}/{found[-1]}/{name}"


def new_version_file(
    entry: Path | str, now: datetime.datetime | None = None, **storage_options: Any
) -> Path | str:
    """Where a new newest version of the catalog entry ``entry`` goes, stamped ``now``.

    A local entry gives a ``Path``, a remote one its URL. Raises ``FileExistsError`` when
    ``entry`` is a file, or when a version folder already there is not older than ``now`` (a
    clock behind the last writer's): the new file would not be the one that loads.
    """
    version = version_name(now)
    if is_local(entry):
        entry = local_path(entry)
        if entry.exists() and not entry.is_dir():
            raise FileExistsError(f"'{entry}' is a file; a versioned catalog entry is a folder of versions")
        existing = sorted(p.name for p in entry.glob("*") if p.is_dir() and is_version_name(p.name))
        target: Path | str = entry / version / entry.name
    else:
        fs, path = url_to_fs(entry, **storage_options)
        path = path.rstrip("/")
        with storage_errors(entry, "list the versions of"):
            fs.invalidate_cache(path)
            if fs.isfile(path):
                raise FileExistsError(
                    f"'{entry}' is a file; a versioned catalog entry is a folder of versions"
                )
            names = [PurePosixPath(p).name for p in fs.glob(f"{path}/*")]
            existing = sorted(name for name in names if is_version_name(name))
        target = f"{os.fspath(entry).rstrip('/')}/{version}/{_entry_name(entry)}"
    if existing and existing[-1] >= version:
        raise FileExistsError(
            f"'{entry}' already holds version {existing[-1]}, not older than {version}: the new "
            "file would not be the latest; check the clock"
        )
    return target
