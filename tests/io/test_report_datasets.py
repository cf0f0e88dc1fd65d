"""The report datasets: the files kedro-datasets wrote, now written atomically.

Each dataset writes the bytes the kedro-datasets class it replaces wrote (JSON indented by 2, UTF-8
text, PNG), so readers of the files see no change, and a save that fails half-way leaves the
previous version as the one that loads.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from kedro.io.core import DatasetError, Version
from kedro_datasets.json import JSONDataset
from kedro_datasets.pillow import ImageDataset
from kedro_datasets.text import TextDataset
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.io.reports import (
    FigureReportDataset,
    ImageReportDataset,
    JSONReportDataset,
    TextReportDataset,
)

matplotlib.use("Agg")
OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"
METRICS = {"student_nfe1": {"fid": 64.62, "ca": 0.88, "nan": float("nan")}, "images": [1, 2]}


class DiskFull(OSError):
    """Stands for any fault that interrupts a write half-way."""


def _image() -> Image.Image:
    return Image.fromarray(np.arange(12 * 16, dtype=np.uint8).reshape(12, 16))


def _figure() -> Figure:
    figure = Figure(figsize=(2, 1.5))
    figure.subplots().plot([0, 1, 2], [1, 0, 2])
    return figure


def _versioned(cls, path: Path, load: str | None = None, save: str | None = None):
    return cls(filepath=str(path), version=Version(load, save))


@pytest.mark.parametrize(
    ("ours", "theirs", "name", "data"),
    [
        (JSONReportDataset, JSONDataset, "metrics.json", METRICS),
        (TextReportDataset, TextDataset, "table.md", "| model | FID |\n|---|---|\n| student | 64.6 – ok |\n"),
        (ImageReportDataset, ImageDataset, "grid.png", _image()),
    ],
)
def test_files_equal_what_kedro_datasets_wrote(tmp_path: Path, ours, theirs, name, data) -> None:
    ours(filepath=str(tmp_path / "ours" / name)).save(data)
    (tmp_path / "theirs").mkdir()
    theirs(filepath=str(tmp_path / "theirs" / name)).save(data)
    assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes()


def test_each_dataset_loads_what_it_saved(tmp_path: Path) -> None:
    metrics = JSONReportDataset(filepath=str(tmp_path / "m.json"))
    metrics.save(METRICS)
    loaded = metrics.load()
    assert loaded["images"] == [1, 2] and loaded["student_nfe1"]["fid"] == 64.62
    assert np.isnan(loaded["student_nfe1"]["nan"])
    text = TextReportDataset(filepath=str(tmp_path / "t.md"))
    text.save("FID – 64.6")
    assert text.load() == "FID – 64.6"
    grid = ImageReportDataset(filepath=str(tmp_path / "g.png"))
    grid.save(_image())
    np.testing.assert_array_equal(np.asarray(grid.load()), np.asarray(_image()))
    plot = FigureReportDataset(filepath=str(tmp_path / "p.png"))
    plot.save(_figure())
    assert plot.load().size == (200, 150) and plot.load().format is None  # a PIL image of the PNG


def test_kedro_viz_previews(tmp_path: Path) -> None:
    metrics = JSONReportDataset(filepath=str(tmp_path / "m.json"))
    metrics.save({"fid": 1.5})
    assert json.loads(metrics.preview()) == {"fid": 1.5}
    plot = FigureReportDataset(filepath=str(tmp_path / "p.png"))
    plot.save(_figure())
    assert base64.b64decode(plot.preview()) == (tmp_path / "p.png").read_bytes()


def test_a_pyplot_figure_is_closed_once_saved(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([0, 1])
    FigureReportDataset(filepath=str(tmp_path / "p.png")).save(figure)
    assert figure.number not in plt.get_fignums()


@pytest.mark.parametrize(
    ("dataset", "data", "suffix"),
    [
        (JSONReportDataset, {"fid": 1.0}, ".json"),
        (TextReportDataset, "| a |", ".md"),
        (ImageReportDataset, _image(), ".png"),
        (FigureReportDataset, _figure(), ".png"),
    ],
)
def test_an_interrupted_save_keeps_the_previous_version(tmp_path: Path, monkeypatch, dataset, data, suffix):
    path = tmp_path / f"report{suffix}"
    _versioned(dataset, path, save=OLD).save(data)
    previous = (path / OLD / path.name).read_bytes()

    def disk_full(fd: int) -> None:  # the content is written, its flush to disk fails
        raise DiskFull("no space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DatasetError, match="no space left on device"):
        _versioned(dataset, path, save=NEW).save(data)
    monkeypatch.undo()
    assert list((path / NEW).iterdir()) == []  # neither a torn file nor the temporary one
    assert _versioned(dataset, path)._get_load_path() == path / OLD / path.name
    assert (path / OLD / path.name).read_bytes() == previous


def test_a_versioned_save_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """Two sessions with the same version: Kedro's "must not exist" check passes for both, then
    the second to publish finds the first's file and fails instead of replacing it."""
    path = tmp_path / "metrics.json"
    first = _versioned(JSONReportDataset, path, save=NEW)
    second = _versioned(JSONReportDataset, path, save=NEW)
    fsync = os.fsync

    def first_publishes_meanwhile(fd: int) -> None:
        monkeypatch.setattr(os, "fsync", fsync)
        first.save({"run": 1})
        fsync(fd)

    monkeypatch.setattr(os, "fsync", first_publishes_meanwhile)
    with pytest.raises(DatasetError, match="File exists"):
        second.save({"run": 2})
    assert json.loads((path / NEW / "metrics.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in (path / NEW).iterdir()) == ["metrics.json"]


def test_wrong_data_and_unknown_extensions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="saves a string"):
        TextReportDataset(filepath=str(tmp_path / "t.md")).save({"not": "text"})
    with pytest.raises(DatasetError, match="saves a PIL image"):
        ImageReportDataset(filepath=str(tmp_path / "g.png")).save(np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="saves a matplotlib Figure"):
        FigureReportDataset(filepath=str(tmp_path / "p.png")).save(_image())
    with pytest.raises(DatasetError, match="image format"):
        ImageReportDataset(filepath=str(tmp_path / "g.unknown")).save(_image())
    with pytest.raises(DatasetError, match="'nosuch://bucket/metrics.json': the protocol is unknown"):
        JSONReportDataset(filepath="nosuch://bucket/metrics.json")
    assert not list(tmp_path.iterdir())
