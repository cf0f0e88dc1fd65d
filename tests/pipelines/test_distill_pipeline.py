"""The ``distill`` pipeline: its inputs, nodes on an in-memory catalog, and a real Kedro run.

No trained teacher is needed: a tiny random teacher checkpoint in the documented format stands
in for it (unless the ``teacher`` pipeline is registered, then the end-to-end test trains one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure
from PIL import Image
from teacher_checkpoints import tiny_teacher_checkpoint

from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.trainer import DistillRun
from ibmd_pipeline.engine.config import ConfigError, config_to_dict
from ibmd_pipeline.io.datasets import TorchCheckpointDataset
from ibmd_pipeline.pipeline_registry import register_pipelines
from ibmd_pipeline.pipelines.common import TITLE_BAND
from ibmd_pipeline.pipelines.distill import create_pipeline
from ibmd_pipeline.pipelines.distill.nodes import distill_node, make_distill_grid, plot_distill_curves
from ibmd_pipeline.teacher.model import (
    CheckpointMismatchError,
)

SIZE = 16
DISTILL = {
    "aux_steps": 2,
    "workdir": None,
    "train": {"steps": 2, "batch_size": 3, "log_every": 1},
    "validation": {
        "every": 1, "batch_size": 6, "draws": 4, "teacher_nfe": 4, "reference_nfes": [1], "grid_examples": 3,
    },
}
# keep the thread count the test session chose (conftest), rather than one per core
ENGINE = {"device": "cpu", "num_threads": torch.get_num_threads()}


class KeptDataset(MemoryDataset):
    """A memory dataset the runner does not release, so the test can read an intermediate output."""

    def _release(self) -> None:
        pass


def fake_teacher(task_kind: str = "sr4x_bicubic", image_size: int = SIZE, seed: int = 0) -> dict:
    return tiny_teacher_checkpoint(task_kind, image_size=image_size, seed=seed)


def corrupted_bundle(task_kind: str = "sr4x_bicubic", count: int = 16) -> dict:
    images = torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {
        "corrupted": images,
        "task": config_to_dict(TaskConfig(kind=task_kind)),
        "image_size": SIZE,
        "channels": 1,
        "split": "train",
    }


# ---------------------------------------------------------------- structure


def test_free_inputs_are_corrupted_images_the_teacher_and_parameters_only():
    pipeline = create_pipeline()
    expected = {"corrupted_train", "teacher_model", "params:distill", "params:task", "params:engine"}
    assert pipeline.inputs() == expected
    assert not any(name.startswith("pairs_") or "clean" in name for name in pipeline.inputs())
    assert pipeline.all_outputs() == {"student_model", "distill_curves_plot", "distill_grid"}
    names = {node.name for node in pipeline.nodes}
    assert names == {"distill_student", "plot_distill_curves", "make_distill_grid"}


# ---------------------------------------------------------------- nodes


def test_distill_node_refuses_clean_images_and_mismatches_before_training(monkeypatch):
    monkeypatch.setattr(DistillRun, "step", pytest.fail)
    pairs = {**corrupted_bundle(), "clean": torch.zeros(16, 1, SIZE, SIZE)}
    with pytest.raises(ValueError, match="corrupted images only"):
        distill_node(pairs, fake_teacher(), DISTILL, {"kind": "sr4x_bicubic"}, ENGINE)
    with pytest.raises(ConfigError) as err:
        distill_node(corrupted_bundle(), fake_teacher(), DISTILL, {"kind": "jpeg"}, ENGINE)
    assert err.value.key == "task.kind"
    with pytest.raises(CheckpointMismatchError, match="task 'jpeg'"):
        distill_node(corrupted_bundle(), fake_teacher("jpeg"), DISTILL, {"kind": "sr4x_bicubic"}, ENGINE)
    with pytest.raises(ConfigError) as err:
        bad = {**DISTILL, "student_nfe": 3}
        distill_node(corrupted_bundle(), fake_teacher(), bad, {"kind": "sr4x_bicubic"}, ENGINE)
    assert err.value.key == "distill.student_nfe"
    with pytest.raises(ConfigError) as err:
        distill_node(corrupted_bundle(), fake_teacher(), DISTILL, {"kind": "sr4x_bicubic"}, {"device": "tpu"})
    assert err.value.key == "engine.device"


def test_pipeline_on_an_in_memory_catalog():
    teacher = fake_teacher()
    catalog = DataCatalog(
        {
            "corrupted_train": MemoryDataset(corrupted_bundle()),
            "teacher_model": MemoryDataset(teacher),
            "params:distill": MemoryDataset(DISTILL),
            "params:task": MemoryDataset({"kind": "sr4x_bicubic"}),
            "params:engine": MemoryDataset(ENGINE),
            "student_model": KeptDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    student = catalog.load("student_model")
    assert student["kind"] == "student" and student["step"] == 2
    assert isinstance(student["autocast_bf16"], bool)  # what the distillation ran in, recorded
    loaded = student_from_checkpoint(student, task_kind="sr4x_bicubic", image_size=SIZE, channels=1)
    assert loaded.nfe == 1 and loaded.noise

    figure = catalog.load("distill_curves_plot")
    assert isinstance(figure, Figure) and len(figure.axes) >= 4
    grid = catalog.load("distill_grid")
    tile = SIZE * 8 + 2  # tiles enlarged to 128 pixels, 2-pixel separators
    assert isinstance(grid, Image.Image) and grid.size == (4 * tile + 2, 3 * tile + 2 + TITLE_BAND)
    # the first column shows the held-out corrupted images (the last validation.batch_size)
    pixels = np.asarray(grid)[TITLE_BAND:]  # below the column titles
    held_out = corrupted_bundle()["corrupted"][-6:]
    first_tile = pixels[2 : 2 + 128 : 8, 2 : 2 + 128 : 8]
    np.testing.assert_array_equal(first_tile, ((held_out[0, 0] + 1) * 127.5).round().numpy())


def test_grid_and_curves_from_a_multi_step_inpainting_student():
    bundle = corrupted_bundle("inpaint_center")
    mask = torch.zeros(16, 1, SIZE, SIZE)
    mask[:, :, 4:12, 4:12] = 1.0
    bundle["mask"] = mask
    teacher = fake_teacher("inpaint_center")
    student = distill_node(bundle, teacher, {**DISTILL, "student_nfe": 2}, {"kind": "inpaint_center"}, ENGINE)
    assert student["config"]["generator"]["noise"] is False  # I2SB inpainting: xT carries the noise
    assert any("val/gap/student_nfe2" in r for r in student["history"])
    assert isinstance(plot_distill_curves(student), Figure)
    grid = make_distill_grid(student, teacher, bundle, ENGINE)
    assert grid.size == (4 * (SIZE * 8 + 2) + 2, 3 * (SIZE * 8 + 2) + 2 + TITLE_BAND)


# ---------------------------------------------------------------- end to end through KedroSession


@pytest.mark.slow
def test_kedro_run_env_test_distills_and_writes_versioned_outputs(degrade_run, run_kedro, project_root):
    assert {"teacher", "distill"} <= set(register_pipelines())
    run = run_kedro(["teacher", "distill"])
    student_file = run.versioned_file("06_models/student.pt")
    student = TorchCheckpointDataset(filepath=str(student_file)).load()
    assert student["kind"] == "student"
    assert student["config"]["teacher_version"] is not None
    assert student["step"] == 4  # conf/test/parameters_distill.yml
    loaded = student_from_checkpoint(student, task_kind="sr4x_bicubic", image_size=32, channels=1)
    xT = torch.zeros(2, 1, 32, 32)
    assert loaded.sample(xT, generator=torch.Generator().manual_seed(0)).shape == xT.shape
    run.versioned_file("08_reporting/distill_curves.png")
    with Image.open(run.versioned_file("08_reporting/distill_grid.png")) as grid:
        assert grid.size == (4 * 130 + 2, 4 * 130 + 2 + TITLE_BAND)  # 4 columns, conf/test grid_examples 4
    workdir = project_root / "data" / "test" / "06_models" / "distill_workdir"
    assert not list(workdir.glob("run-*/last.pt"))  # removed once the student was built
