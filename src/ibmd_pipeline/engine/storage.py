"""Files on a local disk or in an object store (``s3://``, ``gs://``, ``memory://``, ...) through fsspec.

One place turns what fsspec and its backends (s3fs/botocore, gcsfs/google-auth) raise into one
:class:`StorageError` that names the file and says what to check: an unreachable endpoint, a
missing or refused credential, a missing bucket or file, a backend that is not installed, an
unknown protocol. The catalog's datasets (``io.datasets``), the catalog file formats
(``engine.catalog_files``) and the checkpoints (``engine.checkpoint``) read and write through it;
so can any reader of image sources.

**Atomic writes.** :func:`write_atomically` never leaves a partial file under the final name:

* local paths: :func:`atomic_write` (a temporary sibling, then a rename, or a hard
  link that refuses an existing name);
* other stores: the content is first written to a local temporary file (under ``TMPDIR``) and
  then uploaded in one call (``put_file``). An object store makes an object visible only once its
  upload is complete: one PUT, or a multipart upload that the store assembles on completion (s3fs
  aborts it on failure); with ``overwrite=False`` the upload is conditional (``mode="create"``,
  S3's ``If-None-Match: *``), so two writers of one name never replace each other's object.

``storage_options`` are fsspec's filesystem arguments (a catalog entry's ``credentials`` and
``fs_args``), e.g. ``key``/``secret``/``client_kwargs={"endpoint_url": ...}`` for s3fs or
``token``/``project`` for gcsfs. This module imports no backend: fsspec imports one when a URL
needs it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

__all__ = [
    "StorageError",
    "atomic_write",
    "is_local",
    "local_path",
    "open_url",
    "read_bytes",
    "storage_errors",
    "url_to_fs",
    "write_atomically",
]

_LOCAL_PROTOCOLS = {None, "file", "local"}

# Exception classes of the backends, by name, so that none of them needs importing here.
_CREDENTIAL_ERRORS = {
    "NoCredentialsError",  # botocore: no key found anywhere
    "PartialCredentialsError",  # botocore: a key without its secret
    "CredentialRetrievalError",  # botocore: a credential process or provider failed
    "DefaultCredentialsError",  # google-auth: no application default credentials
    "RefreshError",  # google-auth: a token that cannot be refreshed
}
_CONNECTION_ERRORS = {
    "EndpointConnectionError",  # botocore: nothing listens at the endpoint, or DNS fails
    "ConnectTimeoutError",  # botocore
    "ConnectionClosedError",  # botocore
    "ClientConnectorError",  # aiohttp (s3fs, gcsfs)
    "ServerDisconnectedError",  # aiohttp
    "ServerTimeoutError",  # aiohttp
    "InvalidURL",  # aiohttp
}


class StorageError(RuntimeError):
    """A file on a local disk or in an object store cannot be reached, found, read or written.

    ``url`` is the file (or folder) concerned; the message says what went wrong and what to check.
    """

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


# --------------------------------------------------------------------------- locations


def is_local(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` is a path on the local disk (no protocol, or ``file://``)."""
    protocol, _ = split_protocol(os.fspath(url))
    return protocol in _LOCAL_PROTOCOLS


def local_path(url: str | os.PathLike[str]) -> Path:
    """The local path of ``url`` (``file://`` removed), as written: relative paths stay relative."""
    text = os.fspath(url)
    if not is_local(text):
        raise ValueError(f"'{text}' is not a local path")
    return Path(text.removeprefix("file://").removeprefix("local://"))


def url_to_fs(url: str | os.PathLike[str], **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it (``fsspec.core.url_to_fs``).

    Raises :class:`StorageError` for an unknown protocol or a backend that is not installed.
    """
    url = os.fspath(url)
    with storage_errors(url, "open"):
        return fsspec.core.url_to_fs(url, **storage_options)


# --------------------------------------------------------------------------- errors


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _class_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if not text and err.args:
        text = " ".join(str(arg) for arg in err.args)
    return text.splitlines()[0] if text else type(err).__name__


def _diagnose(err: BaseException, local: bool) -> tuple[str, str] | None:
    """(what went wrong, what to check) for a fault of the store, or None when ``err`` is not one."""
    if local:
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):
            return (err.strerror or _first_line(err), "the path and its permissions")
        return None
    chain = list(_chain(err))
    for link in chain:
        names = _class_names(link)
        if names & _CREDENTIAL_ERRORS:
            return (
                f"no usable credentials ({_first_line(link)})",
                "the catalog entry's 'credentials' (a key of credentials.yml in the run's "
                "configuration environment, e.g. key and secret for s3://, token for gs://) or the "
                "store's own environment variables (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "GOOGLE_APPLICATION_CREDENTIALS)",
            )
    for link in chain:
        names = _class_names(link)
        code = getattr(link, "code", None)
        if isinstance(link, ModuleNotFoundError) or (
            isinstance(link, ImportError) and "install" in str(link).lower()
        ):
            return (
                f"its filesystem backend is not installed ({_first_line(link)})",
                "that the backend package is installed (s3fs for s3://, gcsfs for gs://; "
                "README, 'Object storage')",
            )
        if isinstance(link, ValueError) and "protocol not known" in str(link).lower():
            return (
                f"the protocol is unknown ({_first_line(link)})",
                "the path: a local path, file://, s3://, gs:// or memory://",
            )
        if names & _CONNECTION_ERRORS or isinstance(link, ConnectionError | TimeoutError):
            return (
                f"the store cannot be reached ({_first_line(link)})",
                "the endpoint (client_kwargs.endpoint_url in the entry's credentials or fs_args), "
                "the bucket's region, and that the network reaches the store",
            )
        if isinstance(link, PermissionError) or ("HttpError" in names and code in (401, 403)):
            return (
                f"the store refused access ({_first_line(link)})",
                "the credentials (key and secret, or token) and the bucket's permissions for this path",
            )
        if isinstance(link, FileNotFoundError) or ("HttpError" in names and code == 404):
            return (
                f"it does not exist ({_first_line(link)})",
                "the bucket name and the path",
            )
    if isinstance(err, OSError) and not isinstance(err, FileExistsError):
        return (f"the store answered with an error ({_first_line(err)})", "the path and the store's status")
    return None


@contextlib.contextmanager
def storage_errors(url: str | os.PathLike[str], action: str = "read") -> Iterator[None]:
    """Turn a store's fault raised inside the block into one :class:`StorageError` naming ``url``.

    ``action`` is the verb of the message (``read``, ``write``, ``list``, ``open``). Exceptions
    that are not a store's fault (a value the caller's code rejects, a ``FileExistsError`` of an
    exclusive write) pass unchanged; the original exception stays the cause.
    """
    url = os.fspath(url)
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        diagnosis = _diagnose(err, local=is_local(url))
        if diagnosis is None:
            raise
        problem, check = diagnosis
        raise StorageError(url, f"cannot {action} '{url}': {problem}. Check {check}.") from err


# --------------------------------------------------------------------------- reading


def read_bytes(url: str | os.PathLike[str], **storage_options: Any) -> bytes:
    """The whole content of the file ``url``; :class:`StorageError` names it on any fault of the store."""
    url = os.fspath(url)
    if is_local(url):
        with storage_errors(url):
            return local_path(url).read_bytes()
    fs, path = url_to_fs(url, **storage_options)
    with storage_errors(url):
        return fs.cat_file(path)


@contextlib.contextmanager
def open_url(url: str | os.PathLike[str], mode: str = "rb", **storage_options: Any) -> Iterator[IO[Any]]:
    """The file ``url`` opened for reading (``mode`` ``rb`` or ``r``), closed after the block.

    Faults of the store while opening become a :class:`StorageError` naming ``url``; what the
    block itself raises (say, an undecodable image) passes unchanged. For writing use
    :func:`write_atomically`: a file of fsspec opened for writing is committed when the block
    ends, even by an exception, which would publish a partial object.
    """
    if mode not in ("rb", "r"):
        raise ValueError(f"open_url reads only (mode 'rb' or 'r'), got {mode!r}; write with write_atomically")
    url = os.fspath(url)
    fs, path = url_to_fs(url, **storage_options)
    with storage_errors(url):
        handle = fs.open(path, mode)
    with handle:
        yield handle


# --------------------------------------------------------------------------- writing


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None], *, overwrite: bool = True) -> Path:
    """Write a local file through ``write(fileobj)`` into a temporary sibling, then move it into place.

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


def write_atomically(
    url: str | os.PathLike[str],
    write: Callable[[IO[bytes]], None],
    *,
    overwrite: bool = True,
    **storage_options: Any,
) -> str:
    """Write the file ``url`` through ``write(handle)``, so that no partial file is ever visible.

    A local path goes through :func:`atomic_write`. Any other store gets the content
    written to a local temporary file first and then uploaded in one call; a failure of ``write``
    uploads nothing. ``overwrite=False`` refuses an existing file with ``FileExistsError`` (on
    object stores with a conditional upload where the backend has one: s3fs, memory://).
    Returns ``url``.
    """
    url = os.fspath(url)
    if is_local(url):
        atomic_write(local_path(url), write, overwrite=overwrite)
        return url
    fs, path = url_to_fs(url, **storage_options)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="ibmd-upload-") as folder:
        staged = Path(folder) / name  # the target's name, so backends guess the same content type
        with open(staged, "wb") as handle:
            write(handle)
        with storage_errors(url, "write"):
            try:
                fs.put_file(str(staged), path, mode="overwrite" if overwrite else "create")
            except FileExistsError as err:
                raise FileExistsError(
                    errno.EEXIST, f"'{url}' already exists (File exists); a versioned save never replaces it"
                ) from err
    return url
