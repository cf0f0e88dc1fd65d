"""Two ``kedro run --env test --pipelines=degrade`` started together keep their outputs apart.

Every versioned output goes to ``<filepath>/<save version>/<file>``, the save version being the
session's timestamp (millisecond resolution). Two sessions therefore write disjoint version
folders, each complete (atomic writes) and loadable. Two sessions created within the same
millisecond would share a version: Kedro refuses a save whose versioned path exists, and the
datasets' hard-link publish refuses one that appears while the save is written, so the run that
collides second fails (see docs/reliability.md). Started together, the two children did collide
now and then, so they create their sessions 50 ms apart (after both have imported everything)
and then run side by side; the test checks the timestamps differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kedro.io.core import DatasetError, Version
from PIL import Image

from ibmd_pipeline.io.datasets import TensorBundleDataset

CHILD = Path(__file__).with_name("_kedro_child.py")
DATA = Path(__file__).resolve().parents[2] / "data" / "test"
BUNDLES = {
    "pairs_train": "05_model_input/pairs_train.npz",
    "pairs_val": "05_model_input/pairs_val.npz",
    "pairs_test": "05_model_input/pairs_test.npz",
    "corrupted_train": "05_model_input/corrupted_train.npz",
}
GRID = "08_reporting/degrade_grid.png"


def test_two_simultaneous_degrade_runs_write_distinct_complete_versions(tmp_path: Path):
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "IBMD_CHILD_SYNC": str(sync)}
    runs = [  # sessions created 50 ms apart once both children are imported (_kedro_child.py)
        subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path / f"run{i}"), "degrade"],
            env={**env, "IBMD_CHILD_DELAY": str(0.05 * i)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while len(list(sync.glob("ready-*"))) < 2:
        assert all(run.poll() is None for run in runs), "a child exited before its session started"
        assert time.monotonic() < deadline, "the children did not get ready within 300 s"
        time.sleep(0.01)
    (sync / "go").touch()
    versions = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        versions.append(out.strip().splitlines()[-1].removeprefix("SESSION "))
    assert versions[0] != versions[1], f"both sessions got save version {versions[0]} (same millisecond)"

    for name, filepath in BUNDLES.items():
        loaded = []
        for version in versions:
            folder = DATA / filepath / version
            assert sorted(p.name for p in folder.iterdir()) == [Path(filepath).name], folder  # no temp files
            dataset = TensorBundleDataset(filepath=str(DATA / filepath), version=Version(version, None))
            loaded.append(dataset.load())
        first, second = loaded
        assert first.keys() == second.keys(), name
        for key, value in first.items():  # same parameters and seed: the same bundle, twice
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second[key]), f"{name}.{key}"
            else:
                assert value == second[key], f"{name}.{key}"
    for version in versions:
        with Image.open(DATA / GRID / version / Path(GRID).name) as image:
            image.load()


def test_a_second_save_into_an_existing_version_is_refused_and_keeps_the_first(tmp_path: Path):
    """What a same-millisecond collision does when the saves do not overlap in time."""
    path, version = tmp_path / "pairs.npz", "2026-01-01T00.00.00.000Z"
    TensorBundleDataset(filepath=str(path), version=Version(None, version)).save({"x": torch.ones(2)})
    with pytest.raises(DatasetError, match="must not exist if versioning is enabled"):
        TensorBundleDataset(filepath=str(path), version=Version(None, version)).save({"x": torch.zeros(2)})
    kept = TensorBundleDataset(filepath=str(path), version=Version(version, None)).load()
    assert torch.equal(kept["x"], torch.ones(2))
