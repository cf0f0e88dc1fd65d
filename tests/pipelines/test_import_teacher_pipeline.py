"""The ``import_teacher`` pipeline: an official file in, ``teacher_model`` out, ``distill`` unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from ibmd_pipeline.io.datasets import TorchCheckpointDataset
from ibmd_pipeline.pipeline_registry import register_pipelines
from ibmd_pipeline.pipelines.distill import create_pipeline as distill_pipeline
from ibmd_pipeline.pipelines.import_teacher import create_pipeline
from ibmd_pipeline.teacher.importers import AdmArchitecture, TeacherImportError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "importers"))
from official_files import i2sb_options, save_i2sb_checkpoint  # noqa: E402
from reference.originals import Image256Net, adm_unet, i2sb_noise_levels, randomize_  # noqa: E402
from test_distill_pipeline import DISTILL, ENGINE, SIZE, KeptDataset, corrupted_bundle  # noqa: E402

# A gray 16x16 I2SB network, the shape of the distill tests' data.
GRAY = AdmArchitecture(
    image_size=SIZE, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
    attention_rates=(2,), num_head_channels=32, resblock_updown=True, use_scale_shift_norm=True,
)  # fmt: skip
TASK = {"kind": "sr4x_bicubic", "operators": "i2sb"}
DATA = {"image_size": SIZE, "channels": 1, "resize": "i2sb"}


def _official_file(folder: Path) -> Path:
    unet = randomize_(adm_unet(GRAY), torch.Generator().manual_seed(0))
    net = Image256Net(unet, i2sb_noise_levels(), cond=False)
    return save_i2sb_checkpoint(folder, net, i2sb_options("sr4x-bicubic", image_size=SIZE))


def _params(path: Path) -> dict:
    return {"format": "i2sb", "checkpoint": str(path), "num_head_channels": 32}


def test_the_pipeline_is_registered_and_reads_parameters_only():
    pipeline = create_pipeline()
    assert pipeline.inputs() == {"params:teacher_import", "params:task", "params:data"}
    assert pipeline.all_outputs() == {"teacher_model"}
    assert register_pipelines()["import_teacher"].all_outputs() == {"teacher_model"}
    assert "import_teacher" not in {node.name for node in register_pipelines()["__default__"].nodes}


def test_imported_teacher_is_distilled_by_the_unchanged_distill_pipeline(tmp_path):
    path = _official_file(tmp_path / "sr4x-bicubic")
    catalog = DataCatalog(
        {
            "params:teacher_import": MemoryDataset(_params(path)),
            "params:task": MemoryDataset(TASK),
            "params:data": MemoryDataset(DATA),
            "params:distill": MemoryDataset(DISTILL),
            "params:engine": MemoryDataset(ENGINE),
            "corrupted_train": MemoryDataset(corrupted_bundle()),
            "teacher_model": KeptDataset(copy_mode="assign"),
            "student_model": KeptDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline() + distill_pipeline(), catalog)
    teacher = catalog.load("teacher_model")
    assert teacher["config"]["teacher"]["import"]["format"] == "i2sb"
    assert teacher["config"]["bridge"]["noise_levels"] == "i2sb"
    student = catalog.load("student_model")
    assert student["kind"] == "student" and student["step"] == DISTILL["train"]["steps"]
    assert student["config"]["teacher"]["bridge"]["noise_levels"] == "i2sb"


def test_a_bad_file_writes_no_version(tmp_path):
    path = _official_file(tmp_path / "bad")
    payload = torch.load(path, weights_only=True)
    payload["net"]["diffusion_model.out.2.weight"] = torch.zeros(1, 32, 5, 5)
    torch.save(payload, path)
    teacher_dir = tmp_path / "06_models" / "teacher.pt"
    catalog = DataCatalog(
        {
            "params:teacher_import": MemoryDataset(_params(path)),
            "params:task": MemoryDataset(TASK),
            "params:data": MemoryDataset(DATA),
            "teacher_model": TorchCheckpointDataset(filepath=str(teacher_dir), version=None),
        }
    )
    named = r"out\.2\.weight network \(1, 32, 3, 3\) vs state_dict \(1, 32, 5, 5\)"
    with pytest.raises(TeacherImportError, match=named):
        SequentialRunner().run(create_pipeline(), catalog)
    assert not teacher_dir.exists()
