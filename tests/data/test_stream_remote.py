"""Streamed sources in an object store (``data.remote``): ``memory://`` and a real S3 server (moto).

The same small ImageNet-layout folder is read from the local disk and from the store: the same
seed gives the same manifests, labels and batches bit for bit, through reader processes that
open their own filesystem; tar shards in the store are read by byte range. Faults of the store
(a missing bucket, missing or refused credentials, a missing object, a corrupt image or shard)
are each one ``DataError`` naming the URL. The S3 cases skip where moto or s3fs is missing.
"""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from object_stores import S3_KEY, S3Server, Store
from PIL import Image

from ibmd_pipeline.data import DataConfig, DataError, build_pair_bundles, load_folder_images, remote
from ibmd_pipeline.data.stream import StepBatches, StreamedPairs, materialise, streams
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.training import epoch_batch_indices

SIZE = 16
TASK = TaskConfig(kind="sr4x_bicubic")
#: One attempt per request, so that a refused or failing request fails at once.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` random RGB PNGs of assorted sizes in three class folders (the ImageNet layout)."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(count):
        height, width = rng.integers(SIZE, 2 * SIZE, size=2)
        files[f"n0{i % 3}/img{i:03d}.png"] = _png(
            rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        )
    return files


def _write_local(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _shard(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as shard:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            shard.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _upload(store: Store, files: dict[str, bytes], *parts: str) -> str:
    fs = store.filesystem()
    for name, data in files.items():
        fs.pipe_file(fsspec_path(store, *parts, name), data)
    return store.url(*parts)


def fsspec_path(store: Store, *parts: str) -> str:
    return store.filesystem()._strip_protocol(store.url(*parts))


def _config(path: str, store: Store | None = None, **extra) -> DataConfig:
    values = {"source": "folder", "path": path, "image_size": SIZE, "channels": 3, "workers": 0}
    if store is not None and store.endpoint is not None:
        values["storage_options"] = {"client_kwargs": {"endpoint_url": store.endpoint}, **ONE_ATTEMPT}
    return parse_config(DataConfig, {**values, **extra}, "data")


@pytest.fixture
def credentials(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The store, with S3's accepted key in the environment (where a user's credentials live)."""
    if store.kind == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY["secret"])
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    return store


def _batches(bundle: dict, workers: int) -> list[dict[str, torch.Tensor]]:
    dataset = StreamedPairs(bundle)

    def plan(step: int) -> list[torch.Tensor]:
        return [epoch_batch_indices(len(dataset), 4, step, seed=5)]

    reader = StepBatches(dataset, plan, steps=4, workers=workers, prefetch=1)
    return [reader.get(step) for step in range(4)]


def test_a_bucket_streams_the_same_batches_as_the_same_local_folder(credentials: Store, tmp_path):
    files = _images(18)
    local = build_pair_bundles(_config(str(_write_local(tmp_path, files)), stream=True), TASK, seed=3)
    url = _upload(credentials, files, "imagenet")
    config = _config(url, credentials)
    assert streams(config)  # an object store is always streamed (auto)
    bucket = build_pair_bundles(config, TASK, seed=3)
    for split in ("train", "val", "test"):
        assert bucket[split]["stream"]["root"] == url  # the manifest keeps the URL
        assert bucket[split]["stream"]["files"] == local[split]["stream"]["files"]
        assert torch.equal(bucket[split]["labels"], local[split]["labels"])
        assert bucket[split]["class_names"] == local[split]["class_names"] == ["n00", "n01", "n02"]
    # Two reader processes, each opening its own filesystem, give the local batches bit for bit.
    for expected, got in zip(_batches(local["train"], 0), _batches(bucket["train"], 2), strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


def test_tar_shards_in_a_bucket_are_read_by_byte_range(credentials: Store, tmp_path, monkeypatch):
    files = _images(12, seed=1)
    names = sorted(files)
    shards = {
        "part-0.tar": _shard({n: files[n] for n in names[:7]}),
        "part-1.tar": _shard({n: files[n] for n in names[7:]}),
    }
    url = _upload(credentials, shards, "shards")
    local = build_pair_bundles(_config(str(_write_local(tmp_path, files)), stream=True), TASK, seed=1)
    bucket = build_pair_bundles(_config(url, credentials, source="tar"), TASK, seed=1)
    fs = remote.filesystem(url, bucket["train"]["stream"]["data"]["storage_options"])[0]

    def no_whole_shard(*args, **kwargs):
        raise AssertionError("a reader opened a whole shard")

    monkeypatch.setattr(fs, "open", no_whole_shard)
    for split in ("train", "val", "test"):
        a, b = StreamedPairs(local[split]), StreamedPairs(bucket[split])
        assert [f.split("::")[1] for f in b.manifest.files] == list(a.manifest.files)
        expected, got = materialise(a, range(len(a))), materialise(b, range(len(b)))
        assert torch.equal(expected["clean"], got["clean"])
        assert torch.equal(expected["corrupted"], got["corrupted"])


def test_a_corrupt_or_missing_object_is_one_error_naming_its_url(credentials: Store):
    files = _images(9, seed=2)
    url = _upload(credentials, files, "images")
    bundles = build_pair_bundles(_config(url, credentials), TASK, seed=0)
    dataset = StreamedPairs(bundles["train"])
    broken, missing = dataset.manifest.files[0], dataset.manifest.files[1]
    fs = credentials.filesystem()
    fs.pipe_file(fsspec_path(credentials, "images", broken), b"not a png")
    fs.rm_file(fsspec_path(credentials, "images", missing))
    with pytest.raises(DataError, match=f"cannot read image '{url}/{broken}'"):
        dataset[0]
    with pytest.raises(DataError) as caught:
        dataset[1]
    assert f"'{url}/{missing}'" in str(caught.value) and "does not exist" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_a_corrupt_shard_stops_the_listing_naming_it(credentials: Store):
    url = _upload(credentials, {"good.tar": _shard(_images(4)), "bad.tar": b"\x00garbage" * 100}, "shards")
    with pytest.raises(DataError, match=f"cannot read tar shard '{url}/bad.tar'"):
        build_pair_bundles(_config(url, credentials, source="tar"), TASK, seed=0)


def test_a_missing_bucket_fails_before_anything_is_read(s3_server: S3Server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY["secret"])
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    store = Store(kind="s3", root="s3://ibmd-no-such-bucket", endpoint=s3_server.endpoint)
    for source in ("folder", "tar"):
        with pytest.raises(DataError) as caught:
            build_pair_bundles(_config(store.url("images"), store, source=source), TASK, seed=0)
        message = str(caught.value)
        assert "'s3://ibmd-no-such-bucket/images'" in message and "does not exist" in message, message


def test_an_unreachable_store_fails_naming_the_url(s3_server: S3Server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY["secret"])
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    store = Store(kind="s3", root="s3://ibmd-images", endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(DataError) as caught:
        build_pair_bundles(_config(store.url("train"), store), TASK, seed=0)
    message = str(caught.value)
    assert "'s3://ibmd-images/train'" in message and "cannot be reached" in message, message


def test_missing_or_refused_credentials_are_one_error_naming_the_url(s3_server: S3Server, monkeypatch):
    credentials = Store(
        kind="s3",
        root=f"s3://{s3_server.new_bucket()}/project",
        options=s3_server.options(),
        endpoint=s3_server.endpoint,
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY["secret"])
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    url = _upload(credentials, _images(6), "images")
    bundles = build_pair_bundles(_config(url, credentials), TASK, seed=0)

    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DataError, match=f"'{url}'.*no usable credentials"):
        build_pair_bundles(_config(url, credentials), TASK, seed=0)
    with pytest.raises(DataError, match=f"'{url}'.*no usable credentials"):
        StreamedPairs(bundles["train"])  # a teacher or distillation fails before its first step

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY["secret"])
    monkeypatch.setattr(remote, "_FILESYSTEMS", {})
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.require_credentials()  # "testing" is no key of moto's IAM: every request is refused
    try:
        with pytest.raises(DataError, match=f"'{url}'.*refused access"):
            StreamedPairs(bundles["train"])
    finally:
        s3_server.accept_any_credentials()


def test_urls_are_validated_and_the_in_memory_reader_says_to_stream():
    url = "memory:///ibmd-images"
    with pytest.raises(ConfigError, match="data.stream.*always streamed"):
        _config(url, stream=False)
    with pytest.raises(ConfigError, match="data.path.*streamed sources"):
        _config(url, source="paired_ab")
    with pytest.raises(ConfigError, match="data.corrupted_path.*local folder"):
        _config("/tmp/x", source="paired_folders", corrupted_path=url)
    with pytest.raises(ConfigError, match="data.storage_options.*credentials \\(key, secret\\)"):
        _config("s3://b/images", storage_options={"key": "AKIA", "secret": "s", "anon": False})
    with pytest.raises(ConfigError, match="data.storage_options.*only used with an object-store URL"):
        _config("/tmp/images", storage_options={"anon": True})
    with pytest.raises(ConfigError, match="data.storage_options.*mapping"):
        _config("s3://b/images", storage_options="anon")
    assert _config("s3://b/images", storage_options={"anon": True}).storage_options == {"anon": True}
    with pytest.raises(ConfigError, match="data.path.*set data.stream: true"):
        load_folder_images(_config(url), seed=0)
