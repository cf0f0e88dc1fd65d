"""The ``export`` pipelines: the node on a real distilled student, an in-memory slice, and the
project catalog's ``student_torchscript`` entry (env ``test``).

The student comes from the distill package itself (one IBMD update of a tiny random teacher),
so the export is checked on exactly the checkpoint format the distill pipeline writes.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.io.core import DatasetError, Version
from kedro.runner import SequentialRunner
from teacher_checkpoints import tiny_teacher_checkpoint

from ibmd_pipeline.degradations.ops import inpaint_center
from ibmd_pipeline.deploy.export import ExportedStudent, eager_restore, example_inputs
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.io.torchscript import OnnxStudentDataset, TorchScriptStudentDataset
from ibmd_pipeline.pipeline_registry import register_pipelines
from ibmd_pipeline.pipelines.export import create_onnx_pipeline, create_pipeline
from ibmd_pipeline.pipelines.export.nodes import export_student
from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

SIZE = 16
PROJECT_ROOT = Path(__file__).resolve().parents[2]
ONE_UPDATE = {
    "student_nfe": 2,
    "aux_steps": 1,
    "workdir": None,
    "train": {"steps": 1, "batch_size": 2, "log_every": 1},
    "validation": {"every": 0, "batch_size": 2, "grid_examples": 2},
}


def distilled_student(task_kind: str = "inpaint_center") -> dict:
    """A student checkpoint made by ``distill_student`` from a tiny random teacher."""
    teacher = tiny_teacher_checkpoint(task_kind, image_size=SIZE, catalog_version="teacher-v1")
    clean = torch.rand(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    degraded = inpaint_center(clean, torch.Generator().manual_seed(1))
    config = parse_distill_config(ONE_UPDATE)
    return distill_student(
        degraded.corrupted,
        teacher,
        config,
        mask=degraded.mask,
        task_kind=task_kind,
        device="cpu",
        progress=False,
    )


@pytest.fixture(scope="module")
def student_model() -> dict:
    return distilled_student()


def _assert_reproduces(exported: ExportedStudent, student_model: dict) -> None:
    student = student_from_checkpoint(student_model)
    for steps in (1, 2):
        inputs = example_inputs(exported.metadata, 2, nfe=steps, seed=steps)
        expected = eager_restore(student, inputs, nfe=steps)
        assert (exported(**inputs, nfe=steps) - expected).abs().max() <= 1e-5


def test_export_node_on_a_distilled_student(student_model):
    exported = export_student(student_model, {"verify_batch_size": 1})
    meta = exported.metadata
    assert (meta.task_kind, meta.nfe, meta.needs_mask, meta.noise) == ("inpaint_center", 2, True, False)
    assert meta.teacher_version == "teacher-v1" and meta.step == 1 and meta.weights == "ema"
    _assert_reproduces(exported, student_model)


def test_export_node_validates_its_parameters_first(student_model):
    with pytest.raises(ConfigError) as err:
        export_student(student_model, {"atol": -1.0})
    assert err.value.key == "export.atol"
    with pytest.raises(ConfigError) as err:
        export_student(student_model, {"verify": True})
    assert err.value.key == "export.verify"


def test_pipeline_slice_writes_a_versioned_torchscript(tmp_path, student_model):
    dataset = TorchScriptStudentDataset(
        filepath=str(tmp_path / "student_torchscript.pt"), version=Version(None, None)
    )
    catalog = DataCatalog(
        {
            "student_model": MemoryDataset(student_model, copy_mode="assign"),
            "params:export": MemoryDataset({"verify_batch_size": 1}),
            "student_torchscript": dataset,
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    written = list((tmp_path / "student_torchscript.pt").glob("*/student_torchscript.pt"))
    assert len(written) == 1  # <filepath>/<version>/<file>
    _assert_reproduces(dataset.load(), student_model)
    assert create_onnx_pipeline().all_outputs() == {"student_onnx"}


def test_exported_model_datasets_refuse_other_objects(tmp_path):
    with pytest.raises(DatasetError, match="saves an ExportedStudent"):
        TorchScriptStudentDataset(filepath=str(tmp_path / "a.pt")).save({"kind": "student"})
    with pytest.raises(DatasetError, match="saves an ExportedOnnx"):
        OnnxStudentDataset(filepath=str(tmp_path / "a.onnx")).save(b"bytes")


def test_catalog_entry_of_the_test_env_round_trips(student_model):
    with contextlib.chdir(PROJECT_ROOT):
        loader = OmegaConfigLoader(
            conf_source=str(PROJECT_ROOT / "conf"),
            env="test",
            **{k: v for k, v in CONFIG_LOADER_ARGS.items()},
        )
        catalog = DataCatalog.from_config(loader["catalog"])
        dataset = catalog.get("student_torchscript")
        assert isinstance(dataset, TorchScriptStudentDataset)
        assert dataset._describe()["filepath"].startswith("data/test/06_models/")
        assert isinstance(catalog.get("student_onnx"), OnnxStudentDataset)
        assert loader["parameters"]["export"]["verify_batch_size"] == 1  # conf/test shrinks it
        exported = export_student(student_model, loader["parameters"]["export"])
        catalog.save("student_torchscript", exported)
        _assert_reproduces(catalog.load("student_torchscript"), student_model)


@pytest.mark.slow
@pytest.mark.skipif("export" not in register_pipelines(), reason="the export pipeline is not registered yet")
def test_kedro_run_env_test_exports_the_latest_student(student_model):
    student_versions = PROJECT_ROOT / "data" / "test" / "06_models" / "student.pt"
    before = set(student_versions.iterdir()) if student_versions.exists() else set()
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        try:
            with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
                catalog = session.load_context().catalog
                catalog.save("student_model", student_model)  # as the distill pipeline would
                session.run(pipeline_names=["export"])
            _assert_reproduces(catalog.load("student_torchscript"), student_model)
        finally:
            # This stand-in student must not become the latest student_model of later test runs.
            for version in set(student_versions.iterdir()) - before:
                shutil.rmtree(version)
