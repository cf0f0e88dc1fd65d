"""Crash-safe and untrusted files: interrupted catalog saves, truncated checkpoints, pickled
classes, undecodable images.

Every catalog dataset writes through ``engine.checkpoint.atomic_write`` (temporary sibling, then
``os.replace``, or a hard link for versioned saves), so a save that dies mid-write leaves nothing
under the final name and the previous version stays the one Kedro loads (the report datasets:
``tests/io/test_report_datasets.py``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io.core import DatasetError, Version
from PIL import Image

from ibmd_pipeline.data.config import DataConfig
from ibmd_pipeline.data.folders import DataWarning, load_folder_images
from ibmd_pipeline.deploy.export import export_torchscript
from ibmd_pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset
from ibmd_pipeline.io.torchscript import TorchScriptStudentDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy.conftest import make_student_checkpoint  # noqa: E402

OLD, NEW = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"


class DiskFull(OSError):
    """Stands for any fault that interrupts a write half-way."""


class Gadget:
    """A custom class: unpickling it could run arbitrary code, so a weights-only load refuses it."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


class PlainRecord:
    """An ordinary user class in a checkpoint."""

    def __init__(self, value: int):
        self.value = value


def _versioned(cls, filepath: Path, load: str | None = None, save: str | None = None):
    return cls(filepath=str(filepath), version=Version(load, save))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _half_write_then_fail(handle, *args, **kwargs) -> None:
    handle.write(b"PK\x03\x04 half of an archive")
    raise DiskFull("no space left on device")


def test_interrupted_bundle_save_keeps_previous_version(tmp_path: Path, monkeypatch):
    path = tmp_path / "pairs.npz"
    first = {"clean": torch.arange(6.0).view(2, 3), "task": {"kind": "sr4x_bicubic"}}
    _versioned(TensorBundleDataset, path, save=OLD).save(first)

    monkeypatch.setattr(np, "savez_compressed", _half_write_then_fail)
    with pytest.raises(DatasetError, match="no space left on device") as caught:
        _versioned(TensorBundleDataset, path, save=NEW).save({"clean": torch.zeros(2, 3)})
    monkeypatch.undo()
    assert isinstance(caught.value.__cause__, DiskFull)

    assert _leftovers(path / NEW) == []  # neither a torn file nor the temporary one
    latest = _versioned(TensorBundleDataset, path).load()
    assert torch.equal(latest["clean"], first["clean"]) and latest["task"] == first["task"]


def test_interrupted_checkpoint_save_keeps_previous_version(tmp_path: Path):
    path = tmp_path / "teacher.pt"
    weights = {"w": torch.randn(4, 4)}
    _versioned(TorchCheckpointDataset, path, save=OLD).save({"kind": "teacher", "models": weights})

    # A value torch.save cannot pickle fails after the archive was opened and partly written.
    with pytest.raises(DatasetError):
        _versioned(TorchCheckpointDataset, path, save=NEW).save({"models": weights, "bad": lambda: 0})

    assert _leftovers(path / NEW) == []
    latest = _versioned(TorchCheckpointDataset, path).load()
    assert latest["catalog_version"] == OLD and torch.equal(latest["models"]["w"], weights["w"])


def test_interrupted_torchscript_save_keeps_previous_version(tmp_path: Path, monkeypatch):
    path = tmp_path / "student.ts"
    exported = export_torchscript(make_student_checkpoint("sr4x_bicubic"))
    _versioned(TorchScriptStudentDataset, path, save=OLD).save(exported)

    monkeypatch.setattr(torch.jit, "save", lambda module, handle, **_: _half_write_then_fail(handle))
    with pytest.raises(DatasetError, match="no space left on device") as caught:
        _versioned(TorchScriptStudentDataset, path, save=NEW).save(exported)
    monkeypatch.undo()
    assert isinstance(caught.value.__cause__, DiskFull)

    assert _leftovers(path / NEW) == []
    loaded = _versioned(TorchScriptStudentDataset, path).load()
    assert loaded.metadata == exported.metadata


def test_truncated_checkpoint_names_the_file_and_earlier_version_still_loads(tmp_path: Path):
    path = tmp_path / "teacher.pt"
    first, second = {"w": torch.ones(64, 64)}, {"w": torch.zeros(64, 64)}
    _versioned(TorchCheckpointDataset, path, save=OLD).save({"models": first})
    _versioned(TorchCheckpointDataset, path, save=NEW).save({"models": second})
    damaged = path / NEW / "teacher.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    with pytest.raises(CheckpointError, match=str(damaged).replace(".", r"\.")):
        load_checkpoint(damaged)
    with pytest.raises(DatasetError) as caught:  # Kedro wraps the library's error, keeping it as cause
        _versioned(TorchCheckpointDataset, path).load()
    assert isinstance(caught.value.__cause__, CheckpointError)
    assert str(damaged) in str(caught.value)

    earlier = _versioned(TorchCheckpointDataset, path, load=OLD).load()
    assert earlier["catalog_version"] == OLD and torch.equal(earlier["models"]["w"], first["w"])


@pytest.mark.parametrize("cut", [0, 1, 100])
def test_checkpoint_cut_to_a_few_bytes_gives_checkpoint_error(tmp_path: Path, cut: int):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [Gadget(), PlainRecord(3)], ids=["code-running reduce", "plain class"])
def test_checkpoint_with_pickled_custom_class_is_refused(tmp_path: Path, payload, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "payload": payload}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    with pytest.raises(DatasetError) as caught:
        TorchCheckpointDataset(filepath=str(path)).load()
    assert isinstance(caught.value.__cause__, CheckpointError)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_checkpoint_holding_a_non_dict_is_refused(tmp_path: Path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="list.pt"):
        load_checkpoint(path)


def test_folder_source_skips_corrupt_image_with_one_warning(tmp_path: Path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "torn.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.png").write_bytes(b"this is not an image")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = load_folder_images(DataConfig(source="folder", path=str(tmp_path), image_size=16), seed=0)
    assert len(images.clean) == 4
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1
    message = str(data_warnings[0].message)
    assert "skipped 2 of 6" in message and "torn" in message and "notes" in message
