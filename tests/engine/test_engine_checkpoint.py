"""Atomic writes and weights-only checkpoint loading (engine.checkpoint)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import ibmd_pipeline.engine.checkpoint as checkpoint_module
from ibmd_pipeline.engine.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint


def payload(value: float) -> dict:
    return {"config": {"lr": value, "mult": [1, 2]}, "model": {"w": torch.full((3,), value)}, "step": 4}


def test_round_trip(tmp_path: Path):
    path = save_checkpoint(tmp_path / "nested" / "ckpt.pt", payload(1.5))
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"lr": 1.5, "mult": [1, 2]} and loaded["step"] == 4
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.5))


def test_failed_write_keeps_the_old_file_intact(tmp_path: Path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", payload(1.0))
    before = path.read_bytes()

    def half_then_crash(obj, handle):  # a kill in the middle of torch.save
        handle.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, payload(2.0))
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_atomic_write_interrupted_by_keyboard(tmp_path: Path):
    target = tmp_path / "file.bin"
    atomic_write(target, lambda h: h.write(b"old"))

    def interrupted(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_missing_truncated_and_unsafe_files_are_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "absent.pt")
    assert "absent.pt" in str(info.value)

    good = save_checkpoint(tmp_path / "good.pt", payload(1.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pt' cannot be read"):
        load_checkpoint(truncated)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": Path("x")}, unsafe)  # a pickled class: refused by weights_only
    with pytest.raises(CheckpointError, match="unsafe.pt' cannot be read"):
        load_checkpoint(unsafe)

    not_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_dict)
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_checkpoint(not_dict)

    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain_pickle)


def test_map_location(tmp_path: Path):
    path = save_checkpoint(tmp_path / "c.pt", payload(3.0))
    assert load_checkpoint(path, map_location=torch.device("cpu"))["model"]["w"].device.type == "cpu"


def test_no_overwrite_write_refuses_an_existing_file(tmp_path: Path):
    path = save_checkpoint(tmp_path / "ckpt.pt", payload(1.0))
    with pytest.raises(FileExistsError):
        atomic_write(path, lambda handle: torch.save(payload(2.0), handle), overwrite=False)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    fresh = atomic_write(
        tmp_path / "new.pt", lambda handle: torch.save(payload(3.0), handle), overwrite=False
    )
    assert torch.equal(load_checkpoint(fresh)["model"]["w"], torch.full((3,), 3.0))
