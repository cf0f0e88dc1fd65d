"""The ``evaluate`` pipelines: structure, nodes, the titled grid, a slice on an in-memory catalog,
and a real Kedro run.

Tiny random teacher/student checkpoints in their packages' formats stand in for trained ones
(builders shared with ``tests/evaluation``, loaded from there by path).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.evaluation import StaleReferenceError, check_report
from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset
from ibmd_pipeline.pipeline_registry import register_pipelines
from ibmd_pipeline.pipelines.common import TITLE_BAND, make_image_grid
from ibmd_pipeline.pipelines.evaluate import (
    create_models_pipeline,
    create_pipeline,
    create_reference_pipeline,
    create_teacher_pipeline,
)
from ibmd_pipeline.pipelines.evaluate.nodes import evaluate_models_node

_spec = importlib.util.spec_from_file_location(
    "evaluation_fakes", Path(__file__).resolve().parents[1] / "evaluation" / "evaluation_fakes.py"
)
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)

ENGINE = {"device": "cpu", "num_threads": torch.get_num_threads()}  # keep the test session's threads
TASK = {"kind": "sr4x_bicubic"}
DATA = {"source": "embedded"}
RECORD_KEYS = {
    "model", "nfe", "fid", "lpips", "ca", "psnr", "ssim", "sec_per_image", "images_per_sec", "seed",
    "kid", "fd_classifier", "kid_classifier", "consistency", "energy_distance", "diversity", "intervals",
}  # fmt: skip


class KeptDataset(MemoryDataset):
    """A memory dataset the runner does not release, so the test can read an intermediate output."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def metric_networks_built_once():
    with fakes.shared_metric_networks():
        yield


@pytest.fixture(scope="module")
def models():
    teacher = fakes.make_teacher()
    return {"teacher": teacher, "student": fakes.make_student(teacher, nfe=2)}


# ---------------------------------------------------------------- structure


def test_evaluate_is_the_reference_the_teacher_and_the_models_pipelines():
    reference, teacher = create_reference_pipeline(), create_teacher_pipeline()
    models_only, both = create_models_pipeline(), create_pipeline()
    assert reference.inputs() == {"pairs_train", "pairs_test", "params:evaluate", "params:engine"}
    assert reference.all_outputs() == {"classifier_model", "fid_reference_stats"}
    assert teacher.inputs() == {
        "pairs_test", "teacher_model", "classifier_model", "fid_reference_stats",
        "params:evaluate", "params:task", "params:engine",
    }  # fmt: skip
    assert teacher.all_outputs() == {"teacher_evaluation"}
    assert models_only.inputs() == {
        "pairs_test", "teacher_model", "student_model", "classifier_model", "fid_reference_stats",
        "teacher_evaluation", "params:evaluate", "params:data", "params:task", "params:engine",
    }  # fmt: skip
    assert models_only.all_outputs() == {"metrics", "metrics_table", "evaluate_plot", "evaluate_grid"}
    names = {n.name for p in (reference, teacher, models_only) for n in p.nodes}
    assert {n.name for n in both.nodes} == names
    registered = register_pipelines()
    assert {"evaluate", "evaluate_reference", "evaluate_teacher", "evaluate_models"} <= set(registered)
    assert {n.name for n in both.nodes} <= {n.name for n in registered["__default__"].nodes}


# ---------------------------------------------------------------- nodes


def test_models_node_checks_parameters_and_task_before_any_work(monkeypatch, models):
    monkeypatch.setattr("ibmd_pipeline.pipelines.evaluate.nodes.run_evaluation", pytest.fail)
    pairs = fakes.make_pairs(12)
    args = (pairs, models["teacher"], models["student"], {}, {}, {})
    with pytest.raises(ConfigError) as err:
        evaluate_models_node(*args, {**fakes.TINY, "fid": {"dims": 100}}, DATA, TASK, ENGINE)
    assert err.value.key == "evaluate.fid.dims"
    with pytest.raises(ConfigError, match="re-run the degrade pipeline") as err:
        evaluate_models_node(*args, fakes.TINY, DATA, {"kind": "jpeg"}, ENGINE)
    assert err.value.key == "task.kind"
    with pytest.raises(ConfigError) as err:
        evaluate_models_node(*args, fakes.TINY, DATA, TASK, {"device": "tpu"})
    assert err.value.key == "engine.device"


def test_grid_columns_get_their_titles_in_a_band_above():
    columns = [torch.full((2, 1, 4, 4), value) for value in (-1.0, 0.0, 1.0)]
    plain = make_image_grid(columns, padding=2)
    titled = make_image_grid(columns, padding=2, titles=["corrupted", "teacher NFE 100", "clean"])
    assert titled.size == (plain.size[0], plain.size[1] + TITLE_BAND)
    pixels = np.asarray(titled)
    np.testing.assert_array_equal(pixels[TITLE_BAND:], np.asarray(plain))  # the images are untouched
    assert (pixels[:TITLE_BAND] < 128).any()  # dark text on the white band
    with pytest.raises(ValueError, match="2 titles for 3 columns"):
        make_image_grid(columns, titles=["a", "b"])


# ---------------------------------------------------------------- pipeline slice, in memory


def test_pipelines_on_an_in_memory_catalog_with_references_through_their_datasets(tmp_path, models):
    pairs_test = fakes.make_pairs(12)
    catalog = DataCatalog(
        {
            "pairs_train": MemoryDataset(fakes.make_pairs(40, seed=3, split="train")),
            "pairs_test": MemoryDataset(pairs_test),
            "teacher_model": MemoryDataset(models["teacher"]),
            "student_model": MemoryDataset(models["student"]),
            # the references go through their real (unversioned) datasets: file round trips included
            "classifier_model": TorchCheckpointDataset(filepath=str(tmp_path / "classifier.pt")),
            "fid_reference_stats": TensorBundleDataset(filepath=str(tmp_path / "fid_reference_stats.npz")),
            "teacher_evaluation": TorchCheckpointDataset(filepath=str(tmp_path / "teacher_evaluation.pt")),
            "params:evaluate": MemoryDataset(fakes.TINY),
            "params:data": MemoryDataset(DATA),
            "params:task": MemoryDataset(TASK),
            "params:engine": MemoryDataset(ENGINE),
            "metrics": KeptDataset(copy_mode="assign"),
        }
    )
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    assert {"metrics_table", "evaluate_plot", "evaluate_grid"} <= set(outputs)
    metrics = catalog.load("metrics")
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
    assert [(r["model"], r["nfe"]) for r in metrics["records"]] == [
        ("teacher", 1),
        ("teacher", 3),
        ("student", 1),
        ("student", 2),
    ]
    assert all(RECORD_KEYS <= set(r) for r in metrics["records"]) and metrics["dataset"] == "embedded"
    assert metrics["classifier"]["clean_test_accuracy"] is not None
    assert metrics["checkpoints"]["classifier"] is None  # an unversioned dataset has no version
    assert len(metrics["comparisons"]) == 4
    table = catalog.load("metrics_table")
    assert table.count("| Teacher (I2SB) |") == 4 and table.count("| IBMD student |") == 4  # two tables
    assert isinstance(catalog.load("evaluate_plot"), Figure)
    grid = catalog.load("evaluate_grid")
    assert metrics["grid_columns"] == [
        "corrupted",
        "teacher NFE 1",
        "teacher NFE 3",
        "student NFE 1",
        "student NFE 2",
        "clean",
    ]
    tile = 16 * 8 + 2  # tiles enlarged to 128 pixels, 2-pixel separators
    assert isinstance(grid, Image.Image) and grid.size == (6 * tile + 2, 3 * tile + 2 + TITLE_BAND)

    # evaluate_models alone reuses the cached references and the cached teacher evaluation ...
    catalog["metrics"] = KeptDataset(copy_mode="assign")
    SequentialRunner().run(create_models_pipeline(), catalog)
    again = catalog.load("metrics")
    assert [r["fid"] for r in again["records"]] == [r["fid"] for r in metrics["records"]]
    assert [r["kid_classifier"] for r in again["records"]] == [
        r["kid_classifier"] for r in metrics["records"]
    ]
    # ... refuses them for other test images ...
    catalog["pairs_test"] = MemoryDataset(fakes.make_pairs(12, seed=9))
    with pytest.raises(StaleReferenceError, match="--pipelines=evaluate_reference"):
        SequentialRunner().run(create_models_pipeline(), catalog)
    # ... and the teacher evaluation for another teacher
    catalog["pairs_test"] = MemoryDataset(pairs_test)
    other = fakes.make_teacher(seed=5)
    other["catalog_version"] = "teacher-v2"
    catalog["teacher_model"] = MemoryDataset(other)
    with pytest.raises(StaleReferenceError, match="--pipelines=evaluate_teacher"):
        SequentialRunner().run(create_models_pipeline(), catalog)


# ---------------------------------------------------------------- end to end through KedroSession


@pytest.mark.slow
def test_kedro_run_env_test_of_the_whole_default_pipeline(run_kedro):
    assert {"degrade", "teacher", "distill", "evaluate"} <= set(register_pipelines())
    run = run_kedro(["__default__"])  # `kedro run --env test`
    metrics_file = run.versioned_file("08_reporting/metrics.json")
    metrics = json.loads(metrics_file.read_text())  # json.loads accepts NaN; allow_nan=False below does not
    json.dumps(metrics, allow_nan=False)
    check_report(metrics)
    assert (metrics["num_images"], metrics["task"], metrics["dataset"]) == (16, "sr4x_bicubic", "embedded")
    rows = [(r["model"], r["nfe"]) for r in metrics["records"]]
    assert rows == [("teacher", 1), ("teacher", 4), ("student", 1)]
    for record in metrics["records"]:
        assert RECORD_KEYS <= set(record)
        for metric in ("fid", "kid", "lpips", "fd_classifier", "energy_distance"):
            assert isinstance(record[metric], float) and metric in record["intervals"], metric
        assert 0.0 <= record["ca"] <= 100.0
    assert metrics["weights"]["fid"] and metrics["weights"]["lpips"]
    versions = metrics["checkpoints"]
    assert versions["teacher"] == versions["teacher_of_student"] is not None
    assert versions["student"] is not None and versions["classifier"] is not None
    assert versions["teacher_evaluation"] is not None
    assert metrics["classifier"]["ceiling"] is not None and metrics["corrupted_input"]["fid"] > 0
    assert metrics["fid"] == {"dims": 64, "reference": "disjoint", "reference_images": 32}
    assert metrics["speed"]["batch_size"] == 4 and metrics["protocol"]["closeness"]["teacher"] == "teacher@4"
    table = run.versioned_file("08_reporting/metrics_table.md").read_text()
    assert "| IBMD student | 1 |" in table and "student NFE 1 − teacher NFE 4" in table
    run.versioned_file("08_reporting/evaluate_plot.png")
    run.versioned_file("06_models/classifier.pt")
    run.versioned_file("07_model_output/fid_reference_stats.npz")
    run.versioned_file("07_model_output/teacher_evaluation.pt")
    with Image.open(run.versioned_file("08_reporting/evaluate_grid.png")) as grid:
        assert grid.size[1] == 4 * 130 + 2 + TITLE_BAND  # conf/test grid_rows 4, titled columns

    # after a new distillation only evaluate_models runs, on the cached references and teacher evaluation
    rerun = run_kedro(["evaluate_models"])
    again = json.loads(rerun.versioned_file("08_reporting/metrics.json").read_text())
    assert again["checkpoints"]["classifier"] == versions["classifier"]
    assert again["checkpoints"]["teacher_evaluation"] == versions["teacher_evaluation"]
    assert [r["fid"] for r in again["records"]] == [r["fid"] for r in metrics["records"]]
    written = [str(p) for p in rerun.written]
    assert not [
        p for p in written if "classifier.pt" in p or "fid_reference" in p or "teacher_evaluation" in p
    ]
