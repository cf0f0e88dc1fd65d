"""Streamed image sources in an object store (``s3://``, ``gs://``, ``memory://``, ...) through fsspec.

``data.path`` of a streamed ``folder`` or ``tar`` source may be a URL: the folder layout, the
ImageNet layout (class folders) and ``.tar`` shards are listed, labelled and decoded as on a local
disk, with the same manifest entries (paths relative to the root, ``shard.tar::member``), so the
same seed gives the same batches as the same images in a local folder.

* **One filesystem per process.** Nothing here pickles a filesystem: a manifest holds the URL and
  ``data.storage_options``, and each process (the trainer, every ``DataLoader`` worker) opens its
  own fsspec filesystem on first use (:func:`filesystem`, cached by process id), so no worker
  shares a connection pool or an event loop with another.
* **Tar members by byte range.** Listing a shard records where each member's bytes lie
  (``offset_data`` and ``size`` of its header); a reader fetches exactly that range
  (``cat_file(start=, end=)``), never the whole shard.
* **Faults are one :class:`DataError`.** A store that cannot be reached, missing or refused
  credentials, a missing bucket or object (``engine.storage`` diagnoses them), a corrupt image
  or a corrupt shard: each is one ``DataError`` naming the URL (and the member of a shard).

Credentials come from where each backend looks (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``~/.aws``, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``); ``data.storage_options`` holds
the other filesystem arguments (an endpoint, a region, ``anon``). It is written into the
manifests, so :class:`~ibmd_pipeline.data.config.DataConfig` refuses secrets in it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import fsspec
from PIL import Image

from ibmd_pipeline.data.image_set import DataError
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.storage import StorageError, is_local, storage_errors, url_to_fs

#: Separates a tar shard from the member inside it in a manifest entry (as ``data.stream``).
TAR_SEPARATOR = "::"
TAR_SUFFIXES = (".tar",)

_FILESYSTEMS: dict[tuple[int, str, str], tuple[fsspec.AbstractFileSystem, str]] = {}


def is_url(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` names a file in an object store rather than on the local disk."""
    return path is not None and not is_local(os.fspath(path))


@contextlib.contextmanager
def data_errors(url: str, action: str = "read") -> Iterator[None]:
    """A fault of the store inside the block as one :class:`DataError` naming ``url``."""
    try:
        with storage_errors(url, action):
            yield
    except StorageError as err:
        raise DataError(str(err)) from err


def filesystem(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """This process's filesystem of ``url`` and the path inside it, opened on first use."""
    key = (os.getpid(), url, json.dumps(dict(options or {}), sort_keys=True))
    if key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[key] = url_to_fs(url, **dict(options or {}))
        except StorageError as err:
            raise DataError(str(err)) from err
    return _FILESYSTEMS[key]


def join(root: str, entry: str) -> str:
    """The URL of the relative ``entry`` under ``root``."""
    return f"{root.rstrip('/')}/{entry}"


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def check_folder(url: str, key: str, options: Mapping[str, Any] | None) -> str:
    """``url`` as a folder of the store (its URL without a trailing ``/``), or an error naming ``key``."""
    url = url.rstrip("/")
    fs, path = filesystem(url, options)
    with data_errors(url, "list"):
        info = fs.info(path)
    if info.get("type") != "directory":
        raise ConfigError(key, f"'{url}' is not a folder")
    return url


def list_files(url: str, key: str, options: Mapping[str, Any] | None) -> list[str]:
    """Every non-hidden file under the folder ``url``, by POSIX path relative to it, sorted."""
    url = check_folder(url, key, options)
    fs, path = filesystem(url, options)
    base = path.rstrip("/") + "/"
    with data_errors(url, "list"):
        found = fs.find(path)
    files = sorted(
        relative
        for relative in (name[len(base) :] for name in found if name.startswith(base))
        if relative and not _hidden(relative)
    )
    if not files:
        raise ConfigError(key, f"folder '{url}' contains no files")
    return files


def _shard_members(url: str, options: Mapping[str, Any] | None) -> list[tuple[str, int, int]]:
    """``(member, offset, size)`` of every regular, non-hidden member of the shard ``url``."""
    fs, path = filesystem(url, options)
    try:
        with data_errors(url), fs.open(path, "rb") as handle, tarfile.open(fileobj=handle) as shard:
            members = [(m.name, m.offset_data, m.size) for m in shard.getmembers() if m.isfile()]
    except tarfile.TarError as err:
        raise DataError(f"cannot read tar shard '{url}': {type(err).__name__}: {err}") from err
    return sorted(member for member in members if not _hidden(member[0]))


def list_tar_entries(
    url: str, options: Mapping[str, Any] | None
) -> tuple[str, list[str], dict[str, list[int]]]:
    """``(root, entries, ranges)`` of the shards under ``url`` (or the one shard ``url``).

    ``entries`` are ``shard.tar::member``, sorted; ``ranges[entry]`` is ``[offset, size]`` of the
    member's bytes in its shard.
    """
    url = url.rstrip("/")
    fs, path = filesystem(url, options)
    with data_errors(url, "list"):
        info = fs.info(path)
    if info.get("type") == "directory":
        root = url
        shards = [name for name in list_files(url, "data.path", options) if name.endswith(TAR_SUFFIXES)]
    else:
        root, _, name = url.rpartition("/")
        shards = [name]
    if not shards:
        raise ConfigError("data.path", f"'{url}' holds no .tar shard")
    entries, ranges = [], {}
    for shard in shards:
        for member, offset, size in _shard_members(join(root, shard), options):
            entry = f"{shard}{TAR_SEPARATOR}{member}"
            entries.append(entry)
            ranges[entry] = [offset, size]
    if not entries:
        raise DataError(f"the .tar shards under '{url}' hold no files")
    return root, entries, ranges


def read_entry(
    root: str,
    entry: str,
    mode: str,
    options: Mapping[str, Any] | None,
    byte_range: list[int] | tuple[int, int] | None = None,
) -> Image.Image:
    """Decode one manifest entry of the store; any fault is a :class:`DataError` naming it.

    A tar entry is read by the byte range its listing recorded (``[offset, size]``).
    """
    if TAR_SEPARATOR in entry:
        shard, member = entry.split(TAR_SEPARATOR, 1)
        url = join(root, shard)
        where = f"'{member}' in tar shard '{url}'"
        if byte_range is None:
            raise DataError(f"the manifest gives no byte range for {where}; run the degrade pipeline again")
        offset, size = (int(value) for value in byte_range)
        fs, path = filesystem(url, options)
        with data_errors(url):
            data = fs.cat_file(path, start=offset, end=offset + size)
        if len(data) != size:
            raise DataError(f"cannot read image {where}: the shard ends {size - len(data)} bytes early")
    else:
        url = join(root, entry)
        where = f"'{url}'"
        fs, path = filesystem(url, options)
        with data_errors(url):
            data = fs.cat_file(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return image.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {where}: {type(err).__name__}: {err}") from err


def check_reachable(root: str, options: Mapping[str, Any] | None) -> None:
    """A :class:`DataError` naming ``root`` unless the store answers for it (before any training)."""
    fs, path = filesystem(root, options)
    with data_errors(root):
        fs.info(path)
