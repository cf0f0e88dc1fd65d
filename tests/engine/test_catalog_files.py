"""The catalog's file formats without Kedro: tensor bundles and version folders."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io.core import VERSION_FORMAT, Version, generate_timestamp

from ibmd_pipeline.engine.catalog_files import (
    is_version_name,
    latest_version_file,
    new_version_file,
    read_bundle,
    version_name,
    version_of,
    versions,
    write_bundle,
)
from ibmd_pipeline.io.datasets import TensorBundleDataset

MOMENT = datetime.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=datetime.timezone.utc)  # noqa: UP017


def _bundle() -> dict:
    return {
        "clean": torch.linspace(-1, 1, 24).view(2, 1, 3, 4),
        "labels": torch.tensor([3, 1]),
        "mask": np.ones((2, 1, 3, 4), dtype=np.float32),
        "task": {"kind": "sr4x_bicubic"},
        "class_names": ["cat", "dog"],
    }


def _write(path: Path, bundle: dict) -> Path:
    with path.open("wb") as handle:
        write_bundle(handle, bundle)
    return path


def test_a_bundle_round_trips_arrays_as_tensors_and_plain_values_as_json(tmp_path: Path) -> None:
    loaded = read_bundle(_write(tmp_path / "b.npz", _bundle()))
    original = _bundle()
    assert set(loaded) == set(original)
    assert torch.equal(loaded["clean"], original["clean"]) and loaded["labels"].dtype == torch.int64
    assert torch.equal(loaded["mask"], torch.from_numpy(original["mask"]))
    assert loaded["task"] == {"kind": "sr4x_bicubic"} and loaded["class_names"] == ["cat", "dog"]


def test_the_catalog_dataset_and_the_kedro_free_reader_share_one_format(tmp_path: Path) -> None:
    entry = tmp_path / "pairs_train.npz"
    saved = TensorBundleDataset(filepath=str(entry), version=Version(None, "2026-01-01T00.00.00.000Z"))
    saved.save(_bundle())
    from_file = read_bundle(latest_version_file(entry))
    from_catalog = TensorBundleDataset(filepath=str(entry), version=Version(None, None)).load()
    assert from_file.keys() == from_catalog.keys()
    assert all(
        torch.equal(v, from_catalog[k]) if isinstance(v, torch.Tensor) else v == from_catalog[k]
        for k, v in from_file.items()
    )


def test_a_bundle_is_read_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, values=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        read_bundle(path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_bundle(tmp_path / "missing.npz")


def test_version_names_are_kedros() -> None:
    kedro_style = MOMENT.strftime(VERSION_FORMAT)  # microseconds; Kedro keeps milliseconds
    assert version_name(MOMENT) == kedro_style[:-4] + kedro_style[-1:] == "2026-01-02T03.04.05.678Z"
    assert is_version_name(generate_timestamp()) and is_version_name(version_name())
    assert not is_version_name("2026-01-02") and not is_version_name(".2026-01-02T03.04.05.678Z.tmp")
    version = "2026-01-02T03.04.05.678Z"
    assert version_of(Path(f"06_models/teacher.pt/{version}/teacher.pt")) == version
    assert version_of(Path("runs/teacher.pt")) is None


def test_the_latest_version_is_the_newest_folder_holding_the_file(tmp_path: Path) -> None:
    entry = tmp_path / "student.pt"
    with pytest.raises(FileNotFoundError, match="holds no version"):
        latest_version_file(entry)
    for version in ("2026-01-01T00.00.00.000Z", "2026-03-01T00.00.00.000Z"):
        (entry / version).mkdir(parents=True)
        (entry / version / "student.pt").write_bytes(b"x")
    (entry / "2026-04-01T00.00.00.000Z").mkdir()  # an interrupted save: no file
    (entry / "2026-05-01T00.00.00.000Z").mkdir()
    (entry / "2026-05-01T00.00.00.000Z" / "other.pt").write_bytes(b"x")  # not this entry's file
    (entry / "zzz").mkdir()
    (entry / "zzz" / "student.pt").write_bytes(b"x")  # not a version name
    assert versions(entry) == ["2026-01-01T00.00.00.000Z", "2026-03-01T00.00.00.000Z"]
    assert latest_version_file(entry) == entry / "2026-03-01T00.00.00.000Z" / "student.pt"


def test_a_new_version_must_sort_after_every_version_folder(tmp_path: Path) -> None:
    entry = tmp_path / "teacher.pt"
    assert new_version_file(entry, MOMENT) == entry / "2026-01-02T03.04.05.678Z" / "teacher.pt"
    (entry / "2026-01-02T03.04.05.678Z").mkdir(parents=True)  # even without its file yet
    with pytest.raises(FileExistsError, match="not older"):
        new_version_file(entry, MOMENT)
    later = new_version_file(entry, MOMENT + datetime.timedelta(milliseconds=1))
    assert later.parent.name == "2026-01-02T03.04.05.679Z"
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="is a file"):
        new_version_file(tmp_path / "file.pt", MOMENT)
