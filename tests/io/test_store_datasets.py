"""The catalog's datasets on object stores: ``memory://`` and a real S3 server (moto, through s3fs).

Every project dataset saves and loads on each store as on a local disk, with Kedro's versions
(``<filepath>/<version>/<file>``, latest on load) and the same content; a versioned save never
replaces an object; the Kedro-free formats (``engine.catalog_files``, ``engine.checkpoint``) and
the training command's catalog registration work on the same URLs. The S3 cases skip where moto
or s3fs is not installed (``tests/object_stores.py``).
"""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io.core import DatasetError, Version
from matplotlib.figure import Figure
from object_stores import Store
from PIL import Image

from ibmd_pipeline.commands.train import load_bundle, register_in_catalog
from ibmd_pipeline.engine.catalog_files import (
    latest_version_file,
    new_version_file,
    read_bundle,
    versions,
    write_bundle,
)
from ibmd_pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.storage import read_bytes, write_atomically
from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset
from ibmd_pipeline.io.reports import (
    FigureReportDataset,
    ImageReportDataset,
    JSONReportDataset,
    TextReportDataset,
)

OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
MOMENT = datetime.datetime(2026, 1, 3, tzinfo=datetime.timezone.utc)  # noqa: UP017 - as catalog_files


def _bundle(value: float) -> dict:
    return {
        "clean": torch.full((2, 1, 3, 4), value),
        "labels": torch.tensor([3, 1]),
        "mask": np.ones((2, 1, 3, 4), dtype=np.float32),
        "task": {"kind": "sr4x_bicubic", "value": value},
    }


def _checkpoint(value: float) -> dict:
    return {"kind": "teacher", "config": {"width": 8}, "models": {"w": torch.full((4, 4), value)}, "step": 3}


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((12, 16), value, dtype=np.uint8))


def _figure(value: float) -> Figure:
    figure = Figure(figsize=(2, 1.5))
    figure.subplots().plot([0, 1, 2], [1, value, 2])
    return figure


def _dataset(cls, store: Store, name: str, load: str | None = None, save: str | None = None):
    return cls(filepath=store.url(name), version=Version(load, save), credentials=store.options)


def _same(loaded, expected) -> None:
    if isinstance(expected, dict):
        assert loaded.keys() >= expected.keys()
        for key, value in expected.items():
            _same(loaded[key], value)
    elif isinstance(expected, torch.Tensor | np.ndarray):
        assert torch.equal(torch.as_tensor(loaded), torch.as_tensor(expected))
    elif isinstance(expected, Image.Image):
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
    else:
        assert loaded == expected


# (dataset, file name, first data, second data); the figure is compared as the PNG it wrote.
CASES = [
    (TensorBundleDataset, "pairs_train.npz", lambda: _bundle(1.0), lambda: _bundle(2.0)),
    (TorchCheckpointDataset, "teacher.pt", lambda: _checkpoint(1.0), lambda: _checkpoint(2.0)),
    (JSONReportDataset, "metrics.json", lambda: {"fid": 1.5}, lambda: {"fid": 2.5, "nan": None}),
    (TextReportDataset, "metrics_table.md", lambda: "| a |", lambda: "| b – FID |"),
    (ImageReportDataset, "grid.png", lambda: _image(10), lambda: _image(200)),
]


@pytest.mark.parametrize(("cls", "name", "first", "second"), CASES, ids=[case[1] for case in CASES])
def test_versioned_saves_load_the_latest_and_pinned_versions(store: Store, cls, name, first, second):
    _dataset(cls, store, name, save=OLD).save(first())
    _dataset(cls, store, name, save=NEW).save(second())

    assert store.files() == [f"{name}/{OLD}/{name}", f"{name}/{NEW}/{name}"]  # no temporary objects
    latest = _dataset(cls, store, name)
    _same(latest.load(), second())
    assert latest.exists()
    _same(_dataset(cls, store, name, load=OLD).load(), first())
    assert versions(store.url(name), **store.options) == [OLD, NEW]
    assert latest_version_file(store.url(name), **store.options) == store.url(name, NEW, name)


@pytest.mark.parametrize(("cls", "name", "first", "second"), CASES, ids=[case[1] for case in CASES])
def test_an_object_holds_the_bytes_a_local_file_holds(store: Store, tmp_path: Path, cls, name, first, second):
    """Same bytes as on a local disk: what a bucket holds reads like a local catalog file."""
    data = first()
    cls(filepath=store.url(name), credentials=store.options).save(data)
    local = tmp_path / name
    cls(filepath=str(local)).save(data)
    remote = read_bytes(store.url(name), **store.options)
    if name.endswith((".npz", ".pt")):  # zip archives stamp their members; compare what they hold
        _same(read_bundle(io.BytesIO(remote)) if name.endswith(".npz") else _load_torch(remote), data)
    else:
        assert remote == local.read_bytes()


def _load_torch(content: bytes) -> dict:
    return torch.load(io.BytesIO(content), weights_only=True)


def test_checkpoints_remember_their_catalog_version(store: Store):
    _dataset(TorchCheckpointDataset, store, "teacher.pt", save=OLD).save(
        _checkpoint(1.0) | {"catalog_version": "x"}
    )
    loaded = _dataset(TorchCheckpointDataset, store, "teacher.pt").load()
    assert loaded["catalog_version"] == OLD
    assert "catalog_version" not in _load_torch(
        read_bytes(store.url("teacher.pt", OLD, "teacher.pt"), **store.options)
    )
    unversioned = TorchCheckpointDataset(filepath=store.url("c.pt"), credentials=store.options)
    unversioned.save(_checkpoint(1.0))
    assert unversioned.load()["catalog_version"] is None


def test_a_figure_loads_as_the_image_it_wrote_and_previews_work(store: Store):
    plot = FigureReportDataset(filepath=store.url("plot.png"), credentials=store.options)
    plot.save(_figure(0.5))
    assert plot.load().size == (200, 150)
    assert base64.b64decode(plot.preview()) == read_bytes(store.url("plot.png"), **store.options)
    metrics = JSONReportDataset(filepath=store.url("m.json"), credentials=store.options)
    metrics.save({"fid": 1.0})
    assert json.loads(metrics.preview()) == {"fid": 1.0}


def test_an_unversioned_save_replaces_the_object_in_one_step(store: Store):
    table = TextReportDataset(filepath=store.url("table.md"), credentials=store.options)
    table.save("first")
    table.save("second")
    assert table.load() == "second" and store.files() == ["table.md"]


def test_a_save_into_an_existing_version_is_refused_and_keeps_the_first(store: Store):
    _dataset(TensorBundleDataset, store, "pairs.npz", save=NEW).save(_bundle(1.0))
    with pytest.raises(DatasetError, match="must not exist if versioning is enabled"):
        _dataset(TensorBundleDataset, store, "pairs.npz", save=NEW).save(_bundle(2.0))
    _same(_dataset(TensorBundleDataset, store, "pairs.npz").load(), _bundle(1.0))


def test_an_object_that_appears_during_a_versioned_save_is_not_replaced(store: Store, monkeypatch):
    """Two sessions with one version: both pass Kedro's "must not exist" check, then the second
    upload is conditional (S3's If-None-Match) and fails instead of replacing the first."""
    first = _dataset(JSONReportDataset, store, "metrics.json", save=NEW)
    second = _dataset(JSONReportDataset, store, "metrics.json", save=NEW)
    save_path = second._save_path

    def first_publishes_meanwhile():
        path = save_path()  # Kedro's check passes: nothing there yet
        first.save({"run": 1})
        return path

    monkeypatch.setattr(second, "_save_path", first_publishes_meanwhile)
    with pytest.raises(DatasetError, match="File exists"):
        second.save({"run": 2})
    monkeypatch.undo()
    assert json.loads(read_bytes(store.url("metrics.json", NEW, "metrics.json"), **store.options)) == {
        "run": 1
    }
    assert store.files() == [f"metrics.json/{NEW}/metrics.json"]


def test_write_atomically_refuses_an_existing_object_without_overwrite(store: Store):
    url = store.url("x.bin")
    write_atomically(url, lambda handle: handle.write(b"first"), **store.options)
    with pytest.raises(FileExistsError, match="x.bin"):
        write_atomically(url, lambda handle: handle.write(b"second"), overwrite=False, **store.options)
    write_atomically(url, lambda handle: handle.write(b"third"), **store.options)
    assert read_bytes(url, **store.options) == b"third"


def test_the_catalog_formats_work_on_urls_without_kedro(store: Store):
    entry = store.url("06_models", "teacher.pt")
    save_checkpoint(store.url("runs", "teacher.pt"), _checkpoint(1.0), **store.options)
    _same(load_checkpoint(store.url("runs", "teacher.pt"), **store.options), _checkpoint(1.0))

    target = new_version_file(entry, MOMENT, **store.options)
    assert target == f"{entry}/2026-01-03T00.00.00.000Z/teacher.pt"
    write_atomically(target, lambda handle: torch.save(_checkpoint(2.0), handle), **store.options)
    with pytest.raises(FileExistsError, match="not older than"):
        new_version_file(entry, MOMENT, **store.options)
    _same(
        TorchCheckpointDataset(filepath=entry, version=Version(None, None), credentials=store.options).load(),
        _checkpoint(2.0),
    )

    bundle_url = store.url("pairs.npz")
    write_atomically(bundle_url, lambda handle: write_bundle(handle, _bundle(3.0)), **store.options)
    _same(read_bundle(bundle_url, **store.options), _bundle(3.0))


def test_the_training_command_reads_and_registers_on_a_bucket(store: Store, monkeypatch):
    """``commands.train`` takes URLs; the store's client finds credentials in its environment."""
    if store.kind == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.options["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.options["secret"])
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", store.endpoint)
    bundle_url = store.url("pairs_train.npz", OLD, "pairs_train.npz")
    write_atomically(bundle_url, lambda handle: write_bundle(handle, _bundle(4.0)), **store.options)
    _same(load_bundle(bundle_url), _bundle(4.0))

    entry = store.url("06_models", "teacher.pt")
    registered = register_in_catalog(_checkpoint(5.0) | {"catalog_version": OLD}, entry, MOMENT)
    assert registered == f"{entry}/2026-01-03T00.00.00.000Z/teacher.pt"
    loaded = TorchCheckpointDataset(
        filepath=entry, version=Version(None, None), credentials=store.options
    ).load()
    _same(loaded, _checkpoint(5.0))
    assert loaded["catalog_version"] == "2026-01-03T00.00.00.000Z"


def test_local_paths_stay_as_written(tmp_path: Path, monkeypatch):
    """Relative local paths stay relative (the catalog's paths resolve against the project root)."""
    monkeypatch.chdir(tmp_path)
    dataset = TensorBundleDataset(filepath="data/pairs.npz", version=Version(None, OLD))
    dataset.save(_bundle(1.0))
    assert dataset._describe()["filepath"] == "data/pairs.npz"
    assert (tmp_path / "data" / "pairs.npz" / OLD / "pairs.npz").is_file()
    assert sorted(p.name for p in (tmp_path / "data" / "pairs.npz" / OLD).iterdir()) == ["pairs.npz"]
    file_url = TensorBundleDataset(filepath=f"file://{tmp_path}/data/pairs.npz", version=Version(None, None))
    _same(file_url.load(), _bundle(1.0))
