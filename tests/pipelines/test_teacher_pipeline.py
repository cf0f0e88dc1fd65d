"""The ``teacher`` pipeline: its nodes, a slice on an in-memory catalog, and a real Kedro run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.pipeline_registry import register_pipelines
from ibmd_pipeline.pipelines.common import TITLE_BAND
from ibmd_pipeline.pipelines.degrade.nodes import make_pairs
from ibmd_pipeline.pipelines.teacher import create_pipeline
from ibmd_pipeline.pipelines.teacher.nodes import make_teacher_grid, plot_teacher_loss, train_teacher_node
from ibmd_pipeline.teacher import CheckpointMismatchError, teacher_from_checkpoint

TINY_TEACHER = {
    "model": {"network": {"preset": "tiny"}},
    "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "log_every": 2, "warmup_steps": 1},
    "sampler": {"grid_nfe": [1, 3], "n_examples": 2},
    "validation": {"every": 2, "batch_size": 2},
}
ENGINE = {"device": "cpu", "num_threads": 1}
TASK = {"kind": "sr4x_pool"}


class KeptMemoryDataset(MemoryDataset):
    """A memory dataset the runner cannot release, so the test can inspect an intermediate output."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="module")
def pairs():
    train, val, _ = make_pairs({"max_images": 40}, TASK, 0)
    return train, val


def test_registry_runs_teacher_after_degrade():
    pipelines = register_pipelines()
    assert {"degrade", "teacher"} <= set(pipelines)
    teacher_inputs = pipelines["teacher"].inputs()
    assert {"pairs_train", "pairs_val", "params:teacher", "params:engine"} <= teacher_inputs
    default_nodes = [node.name for node in pipelines["__default__"].nodes]
    assert default_nodes.index("make_pairs") < default_nodes.index("train_teacher")


def test_pipeline_on_an_in_memory_catalog(pairs):
    train, val = pairs
    catalog = DataCatalog(
        {
            "pairs_train": MemoryDataset(train),
            "pairs_val": MemoryDataset(val),
            "params:teacher": MemoryDataset(TINY_TEACHER),
            "params:task": MemoryDataset(TASK),
            "params:engine": MemoryDataset(ENGINE),
            "params:seed": MemoryDataset(4),
            "teacher_model": KeptMemoryDataset(),
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    assert set(outputs) == {"teacher_loss_plot", "teacher_grid"}
    checkpoint = catalog.load("teacher_model")
    assert checkpoint["kind"] == "teacher" and checkpoint["step"] == 6
    # bf16 defaults off (conf: teacher.train.bf16), so the checkpoint records float32 training
    assert checkpoint["autocast_bf16"] is False
    assert checkpoint["config"]["teacher"]["train"]["seed"] == 4  # the global seed
    assert checkpoint["config"]["task"]["kind"] == "sr4x_pool" and checkpoint["config"]["image_size"] == 32
    assert isinstance(catalog.load("teacher_loss_plot"), Figure)
    grid = catalog.load("teacher_grid")
    tile = 32 * 4 + 2  # tiles enlarged 4x, 2-pixel separators
    # corrupted | NFE 1 | NFE 3 | clean, under their titles
    assert grid.mode == "L" and grid.size == (4 * tile + 2, 2 * tile + 2 + TITLE_BAND)
    below_titles = np.asarray(grid)[TITLE_BAND:]
    clean_tile = below_titles[2 : 2 + 128 : 4, 3 * tile + 2 : 3 * tile + 2 + 128 : 4]
    np.testing.assert_array_equal(clean_tile, ((val["clean"][0, 0] + 1) * 127.5).round().numpy())


def test_grid_node_refuses_a_teacher_of_other_parameters(pairs):
    train, val = pairs
    short = {**TINY_TEACHER, "train": {**TINY_TEACHER["train"], "steps": 2}}
    checkpoint = train_teacher_node(train, val, short, TASK, ENGINE, 0)
    assert isinstance(plot_teacher_loss(checkpoint), Figure)
    assert isinstance(make_teacher_grid(checkpoint, val, TINY_TEACHER, ENGINE), Image.Image)
    with pytest.raises(CheckpointMismatchError, match="unet"):
        make_teacher_grid(checkpoint, val, {**TINY_TEACHER, "model": {"network": {"preset": "cpu"}}}, ENGINE)
    _, other_val, _ = make_pairs({"max_images": 40}, {"kind": "jpeg"}, 0)
    with pytest.raises(CheckpointMismatchError, match="task 'sr4x_pool'"):
        make_teacher_grid(checkpoint, other_val, TINY_TEACHER, ENGINE)


# ---------------------------------------------------------------- end to end through KedroSession


@pytest.mark.slow
def test_kedro_run_env_test_trains_and_writes_the_teacher(degrade_run, run_kedro, tmp_path):
    # One thread: on a shared, oversubscribed machine two OpenMP threads of a tiny network wait
    # for each other most of the time (measured: 10x slower than one).
    params = {"teacher": {"workdir": str(tmp_path / "work")}, "engine": {"num_threads": 1}}
    run = run_kedro(["teacher"], params=params)
    model_file = run.versioned_file("06_models/teacher.pt")
    checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    assert checkpoint["kind"] == "teacher" and checkpoint["step"] == 24  # conf/test/parameters_teacher.yml
    assert checkpoint["config"]["unet"]["model_channels"] == 16 and checkpoint["config"]["image_size"] == 32
    assert any("val_loss" in record for record in checkpoint["history"])
    teacher = teacher_from_checkpoint(checkpoint, task_kind="sr4x_bicubic", image_size=32, channels=1)
    assert teacher.bridge.kind == "i2sb"
    assert len(list((tmp_path / "work").glob("run-*/last.pt"))) == 1  # the resumable working checkpoint
    with Image.open(run.versioned_file("08_reporting/teacher_grid.png")) as grid:
        assert grid.size == (5 * 130 + 2, 4 * 130 + 2 + TITLE_BAND)  # corrupted | 3 NFEs | clean, 4 examples
    with Image.open(run.versioned_file("08_reporting/teacher_loss.png")) as plot:
        assert plot.size[0] > 100 and plot.size[1] > 100
