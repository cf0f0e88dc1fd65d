"""Faults of object stores: each gives one error that names the file and what to check, and no
partial version is ever published.

Against moto's S3 server through s3fs (skipped where they are not installed) and fsspec's
``memory://``: an unreachable endpoint, missing credentials, credentials the server refuses, a
missing bucket, a backend that is not installed, a credentials name the configuration lacks, a
corrupt or truncated object, and a save that fails half-way.
"""

from __future__ import annotations

import importlib.util
import socket

import fsspec
import numpy as np
import pytest
import torch
from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version
from object_stores import S3_KEY, S3Server, Store

from ibmd_pipeline.engine.checkpoint import CheckpointError, load_checkpoint
from ibmd_pipeline.engine.storage import StorageError, open_url, read_bytes, url_to_fs, write_atomically
from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset
from ibmd_pipeline.io.reports import JSONReportDataset

OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
#: One attempt per request, so that a refused connection fails at once.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


class DiskFull(OSError):
    """Stands for any fault that interrupts a write half-way."""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def _one_line_naming(error: BaseException, url: str, *phrases: str) -> str:
    message = str(error)
    assert len(message.splitlines()) == 1, message
    assert f"'{url}'" in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def _assert_nothing_published(store: Store, server: S3Server | None = None) -> None:
    if server is not None:
        server.accept_any_credentials()
    assert store.files() == []


# --------------------------------------------------------------------------- S3 faults


@pytest.fixture
def bucket(s3_server: S3Server) -> Store:
    """An empty bucket on the S3 server, as a store."""
    name = s3_server.new_bucket()
    return Store(
        kind="s3", root=f"s3://{name}/project", options=s3_server.options(), endpoint=s3_server.endpoint
    )


@pytest.mark.parametrize("action", ["load", "save"])
def test_an_unreachable_endpoint_names_the_file_and_the_endpoint(bucket: Store, action: str):
    unreachable = {
        **S3_KEY,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
        **ONE_ATTEMPT,
    }
    dataset = TensorBundleDataset(
        filepath=bucket.url("pairs.npz"), version=Version(None, NEW), credentials=unreachable
    )
    with pytest.raises(DatasetError) as caught:
        dataset.load() if action == "load" else dataset.save({"x": torch.ones(2)})
    assert isinstance(caught.value.__cause__, StorageError)
    url = bucket.url("pairs.npz") if action == "load" else bucket.url("pairs.npz", NEW, "pairs.npz")
    _one_line_naming(caught.value, url, "cannot be reached", "endpoint_url")
    _assert_nothing_published(bucket)


@pytest.mark.parametrize("action", ["load", "save"])
def test_missing_credentials_name_the_file_and_where_credentials_go(bucket: Store, action: str):
    no_key = {"client_kwargs": {"endpoint_url": bucket.endpoint}, **ONE_ATTEMPT}
    JSONReportDataset(
        filepath=bucket.url("metrics.json"), version=Version(None, OLD), credentials=bucket.options
    ).save({"fid": 1.0})
    dataset = JSONReportDataset(
        filepath=bucket.url("metrics.json"), version=Version(OLD, NEW), credentials=no_key
    )
    with pytest.raises(DatasetError) as caught:
        dataset.load() if action == "load" else dataset.save({"fid": 2.0})
    url = bucket.url("metrics.json", OLD if action == "load" else NEW, "metrics.json")
    _one_line_naming(caught.value, url, "no usable credentials", "credentials.yml", "AWS_ACCESS_KEY_ID")
    assert bucket.files() == [f"metrics.json/{OLD}/metrics.json"]


@pytest.mark.parametrize("action", ["load", "save"])
def test_credentials_the_server_refuses_name_the_file(bucket: Store, s3_server: S3Server, action: str):
    save_first = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, OLD), credentials=bucket.options
    )
    save_first.save({"models": {"w": torch.ones(2)}})
    dataset = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"),
        version=Version(OLD, NEW),
        credentials={**bucket.options, **ONE_ATTEMPT},
    )
    s3_server.require_credentials()  # "testing" is no key of moto's IAM: every request is refused
    try:
        with pytest.raises(DatasetError) as caught:
            dataset.load() if action == "load" else dataset.save({"models": {"w": torch.zeros(2)}})
    finally:
        s3_server.accept_any_credentials()
    url = bucket.url("teacher.pt", OLD if action == "load" else NEW, "teacher.pt")
    _one_line_naming(caught.value, url, "refused access", "credentials")
    assert bucket.files() == [f"teacher.pt/{OLD}/teacher.pt"]


@pytest.mark.parametrize("action", ["load", "save"])
def test_a_missing_bucket_names_the_file_and_the_bucket(s3_server: S3Server, action: str):
    url = "s3://ibmd-no-such-bucket/project/teacher.pt"
    dataset = TorchCheckpointDataset(
        filepath=url, version=Version(None, NEW), credentials=s3_server.options()
    )
    with pytest.raises(DatasetError) as caught:
        dataset.load() if action == "load" else dataset.save({"w": torch.ones(2)})
    named = url if action == "load" else f"{url}/{NEW}/teacher.pt"
    _one_line_naming(caught.value, named, "does not exist", "ibmd-no-such-bucket", "Check the bucket name")
    assert not fsspec.filesystem("s3", **s3_server.options()).exists("ibmd-no-such-bucket")


def test_storage_errors_reach_readers_without_kedro(bucket: Store):
    """What readers of image sources get (``engine.storage``): one StorageError naming the URL."""
    with pytest.raises(StorageError) as caught:
        read_bytes(bucket.url("images", "missing.png"), **bucket.options)
    _one_line_naming(
        caught.value, bucket.url("images", "missing.png"), "does not exist", "bucket name and the path"
    )
    with pytest.raises(StorageError, match="no usable credentials"):
        with open_url(
            bucket.url("images", "a.png"), client_kwargs={"endpoint_url": bucket.endpoint}, **ONE_ATTEMPT
        ):
            pass
    with pytest.raises(StorageError, match="missing.pt"):
        load_checkpoint(bucket.url("missing.pt"), **bucket.options)


# --------------------------------------------------------------------------- any store


def test_an_unknown_protocol_or_a_missing_backend_names_the_file():
    with pytest.raises(StorageError, match="'nosuch://b/x.npz': the protocol is unknown"):
        url_to_fs("nosuch://b/x.npz")
    missing = [
        protocol
        for protocol, module in (("s3", "s3fs"), ("gs", "gcsfs"), ("abfs", "adlfs"))
        if importlib.util.find_spec(module) is None
    ]
    if not missing:
        pytest.skip("every backend tried is installed")
    url = f"{missing[0]}://bucket/teacher.pt"
    with pytest.raises(DatasetError) as caught:
        TorchCheckpointDataset(filepath=url)
    _one_line_naming(caught.value, url, "backend is not installed", "nstall")


def test_a_credentials_name_missing_from_the_configuration_is_named():
    """Kedro resolves ``credentials: <name>`` against credentials.yml and names a missing one."""
    config = {
        "teacher_model": {
            "type": "ibmd_pipeline.io.datasets.TorchCheckpointDataset",
            "filepath": "s3://bucket/teacher.pt",
            "credentials": "ibmd_bucket",
        }
    }
    with pytest.raises(Exception, match="ibmd_bucket") as caught:
        DataCatalog.from_config(config, credentials={"other": {}})
    assert "credentials" in str(caught.value)


def test_a_save_that_fails_half_way_publishes_nothing(store: Store, monkeypatch):
    JSONReportDataset(
        filepath=store.url("metrics.json"), version=Version(None, OLD), credentials=store.options
    ).save({"fid": 1.0})

    def half_then_fail(handle) -> None:
        handle.write(b'{"fid": ')
        raise DiskFull("no space left on device")

    with pytest.raises(DiskFull):
        write_atomically(
            store.url("metrics.json", NEW, "metrics.json"), half_then_fail, overwrite=False, **store.options
        )
    monkeypatch.setattr(np, "savez_compressed", lambda handle, **arrays: half_then_fail(handle))
    bundle = TensorBundleDataset(
        filepath=store.url("pairs.npz"), version=Version(None, NEW), credentials=store.options
    )
    with pytest.raises(DatasetError, match="no space left on device") as caught:
        bundle.save({"x": torch.ones(2)})
    assert isinstance(caught.value.__cause__, DiskFull)
    assert store.files() == [f"metrics.json/{OLD}/metrics.json"]
    latest = JSONReportDataset(
        filepath=store.url("metrics.json"), version=Version(None, None), credentials=store.options
    )
    assert latest.load() == {"fid": 1.0}


def test_a_truncated_checkpoint_names_the_object_and_the_earlier_version_still_loads(store: Store):
    first, second = {"w": torch.ones(64, 64)}, {"w": torch.zeros(64, 64)}
    for version, models in ((OLD, first), (NEW, second)):
        TorchCheckpointDataset(
            filepath=store.url("teacher.pt"), version=Version(None, version), credentials=store.options
        ).save({"models": models})
    damaged = store.url("teacher.pt", NEW, "teacher.pt")
    content = read_bytes(damaged, **store.options)
    fs, path = url_to_fs(damaged, **store.options)
    fs.pipe_file(path, content[: len(content) // 2])

    with pytest.raises(CheckpointError) as direct:
        load_checkpoint(damaged, **store.options)
    _one_line_naming(direct.value, damaged, "truncated, corrupted")
    with pytest.raises(DatasetError) as caught:
        TorchCheckpointDataset(
            filepath=store.url("teacher.pt"), version=Version(None, None), credentials=store.options
        ).load()
    assert isinstance(caught.value.__cause__, CheckpointError) and damaged in str(caught.value)
    earlier = TorchCheckpointDataset(
        filepath=store.url("teacher.pt"), version=Version(OLD, None), credentials=store.options
    ).load()
    assert earlier["catalog_version"] == OLD and torch.equal(earlier["models"]["w"], first["w"])


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not an archive", b"not a bundle at all"])
def test_a_corrupt_bundle_names_the_object(store: Store, content: bytes):
    url = store.url("pairs.npz", NEW, "pairs.npz")
    write_atomically(url, lambda handle: handle.write(content), **store.options)
    with pytest.raises(DatasetError) as caught:
        TensorBundleDataset(
            filepath=store.url("pairs.npz"), version=Version(None, None), credentials=store.options
        ).load()
    _one_line_naming(caught.value, url, "cannot read tensor bundle")


# --------------------------------------------------------------------------- multipart uploads


@pytest.fixture
def small_parts(monkeypatch) -> int:
    """s3fs uploads files of two parts or more as multipart uploads: make a part 5 MiB (S3's
    smallest), so that a checkpoint of a few MiB takes the path of a large one."""
    import s3fs.core

    part = 5 * 2**20
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None, max_parts=10_000: part)
    return part


def _checkpoint_of(size: int, value: float) -> dict:
    return {"models": {"w": torch.full((size // 4,), value)}}


def test_a_multipart_upload_publishes_the_complete_object_once(bucket: Store, small_parts: int):
    dataset = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, NEW), credentials=bucket.options
    )
    dataset.save(_checkpoint_of(3 * small_parts, 1.0))
    loaded = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, None), credentials=bucket.options
    ).load()
    assert torch.equal(loaded["models"]["w"], _checkpoint_of(3 * small_parts, 1.0)["models"]["w"])
    assert bucket.files() == [f"teacher.pt/{NEW}/teacher.pt"]


def test_a_multipart_upload_cut_off_before_completion_publishes_nothing(
    bucket: Store, small_parts: int, monkeypatch
):
    """The connection drops after the parts went up: S3 shows no object (it assembles one only on
    CompleteMultipartUpload), s3fs aborts the upload, and the previous version still loads."""
    import s3fs.core

    TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, OLD), credentials=bucket.options
    ).save(_checkpoint_of(1024, 0.0))
    call_s3 = s3fs.core.S3FileSystem._call_s3

    async def drop_before_completion(self, method, *args, **kwargs):
        if method == "complete_multipart_upload":
            raise ConnectionError("connection reset by peer")
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", drop_before_completion)
    dataset = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, NEW), credentials=bucket.options
    )
    with pytest.raises(DatasetError) as caught:
        dataset.save(_checkpoint_of(3 * small_parts, 1.0))
    monkeypatch.undo()
    _one_line_naming(caught.value, bucket.url("teacher.pt", NEW, "teacher.pt"), "cannot be reached")
    assert bucket.files() == [f"teacher.pt/{OLD}/teacher.pt"]
    fs, path = url_to_fs(bucket.root, **bucket.options)
    uploads = fs.call_s3("list_multipart_uploads", Bucket=path.split("/")[0]).get("Uploads", [])
    assert uploads == []  # aborted, not left to accrue storage
    latest = TorchCheckpointDataset(
        filepath=bucket.url("teacher.pt"), version=Version(None, None), credentials=bucket.options
    ).load()
    assert latest["catalog_version"] == OLD


def test_exists_is_false_without_a_version_but_a_fault_of_the_store_is_raised(bucket: Store):
    fresh = TensorBundleDataset(
        filepath=bucket.url("pairs.npz"), version=Version(None, None), credentials=bucket.options
    )
    assert not fresh.exists()
    unreachable = {
        **S3_KEY,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
        **ONE_ATTEMPT,
    }
    cut_off = TensorBundleDataset(
        filepath=bucket.url("pairs.npz"), version=Version(None, None), credentials=unreachable
    )
    with pytest.raises(DatasetError, match="cannot be reached"):
        cut_off.exists()
