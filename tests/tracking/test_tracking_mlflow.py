"""MLflow's half of tracking, against a real local file store: what is written reads back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.hooks import TrackingHooks
from ibmd_pipeline.tracking import (
    PARAM_VALUE_LIMIT,
    MlflowMissingError,
    MlflowRun,
    flatten_params,
    resolve_tracking_uri,
)

matplotlib.use("Agg")

REPORT = {
    "records": [
        {"model": "teacher", "nfe": 4, "fid": 2.79, "lpips": 0.091, "ca": None, "sec_per_image": 0.0119,
         "seed": 0},
        {"model": "student", "nfe": 1, "fid": 0.27, "lpips": 0.141, "ca": 6.25, "sec_per_image": 0.0028,
         "seed": 0, "speedup_vs_teacher": {"4": 4.3}},
    ],
    "corrupted_input": {"fid": 3.5},
}


def _download(client, run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(tmp_path / "download")))


def _start(store: Path, **kwargs) -> MlflowRun:
    return MlflowRun.start(resolve_tracking_uri(str(store), store.parent), "ibmd", **kwargs)


def test_a_run_round_trips_through_a_file_store(tmp_path, mlflow_client):
    store = tmp_path / "mlruns"
    run = _start(store, run_name="unit", tags={"task": "jpeg", "kedro.env": "test"})
    # 150 parameters (two batches of MLflow's 100), one of them cut to MLflow's length limit
    params = flatten_params({"many": {f"p{i}": i for i in range(149)}, "data": {"ids": list(range(3000))}})
    run.log_params(params)
    run.log_metrics({"student_nfe1/fid": 0.27, "student_nfe1/lpips": 0.14})
    # 1200 curve points: two batches of MLflow's 1000
    history = [{"step": float(step), "loss": 1.0 / step, "lr/model": 1e-3} for step in range(1, 601)]
    run.log_history(history, "teacher")

    image = Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20), mode="L")
    figure = Figure(figsize=(2, 1), dpi=50)
    figure.add_subplot().plot([0, 1], [1, 0])
    run.log_object(image, "degrade/grid.png")
    run.log_object(figure, "teacher/loss.png")
    run.log_object(REPORT, "evaluate/metrics.json")
    run.log_object("| model | fid |\n", "evaluate/metrics_table.md")
    with pytest.raises(TypeError, match="cannot store a list as the artifact 'x.bin'"):
        run.log_object([1, 2], "x.bin")
    run.finish()

    client = mlflow_client(store)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "unit"
    assert stored.data.tags["task"] == "jpeg" and stored.data.tags["kedro.env"] == "test"
    assert stored.data.params == params and len(params) == 150
    assert len(stored.data.params["data.ids"]) == PARAM_VALUE_LIMIT
    assert stored.data.metrics["student_nfe1/fid"] == 0.27
    curve = client.get_metric_history(run.run_id, "teacher/loss")
    assert sorted((point.step, point.value) for point in curve) == [(s, 1.0 / s) for s in range(1, 601)]
    assert len(client.get_metric_history(run.run_id, "teacher/lr/model")) == 600

    with Image.open(_download(client, run.run_id, "degrade/grid.png", tmp_path)) as stored_image:
        np.testing.assert_array_equal(np.asarray(stored_image), np.asarray(image))
    with Image.open(_download(client, run.run_id, "teacher/loss.png", tmp_path)) as plot:
        assert plot.size == (100, 50)  # figsize x dpi
    assert json.loads(_download(client, run.run_id, "evaluate/metrics.json", tmp_path).read_text()) == REPORT
    table = _download(client, run.run_id, "evaluate/metrics_table.md", tmp_path).read_text()
    assert table == "| model | fid |\n"


def test_runs_share_their_experiment_and_a_failed_run_says_so(tmp_path, mlflow_client):
    store = tmp_path / "mlruns"
    first, second = _start(store), _start(store)
    first.finish()
    second.finish(failed=True)
    client = mlflow_client(store)
    experiment_id = client.get_experiment_by_name("ibmd").experiment_id
    runs = {run.info.run_id: run for run in client.search_runs([experiment_id])}
    assert {runs[first.run_id].info.status, runs[second.run_id].info.status} == {"FINISHED", "FAILED"}


def test_missing_mlflow_fails_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(MlflowMissingError, match=r"tracking\.enabled.*pip install mlflow-skinny==\d"):
        _start(tmp_path / "mlruns")
    assert not (tmp_path / "mlruns").exists()


def test_hook_logs_evaluation_metrics_curves_and_reports(tmp_path, mlflow_client):
    """The hook driven through the events a Kedro run fires (no pipeline needed)."""
    hooks = TrackingHooks()
    params = {"seed": 0, "task": {"kind": "jpeg"}, "tracking": {"enabled": True, "uri": "store"}}
    hooks.after_context_created(SimpleNamespace(params=params, project_path=tmp_path))
    run_params = {"run_id": "2026-01-01T00.00.00.000Z", "env": "test", "kedro_version": "1.7.0",
                  "pipeline_names": ["evaluate_models"], "node_names": None}
    hooks.before_pipeline_run(run_params, pipeline=None, catalog=None)
    history = [{"step": 0.0, "val/gap/teacher_nfe1": 0.5}, {"step": 2.0, "loss/generator": 1.5}]
    hooks.after_dataset_saved("student_model", {"kind": "student", "history": history}, node=None)
    hooks.after_dataset_saved("metrics", REPORT, node=None)
    hooks.after_dataset_saved("metrics_table", "| student | 1 |\n", node=None)
    hooks.after_dataset_saved("pairs_test", {"clean": "not tracked"}, node=None)
    hooks.after_pipeline_run(run_params, run_result={}, pipeline=None, catalog=None)

    client = mlflow_client(tmp_path / "store")  # the relative uri is taken from the project path
    (stored,) = client.search_runs([client.get_experiment_by_name("ibmd").experiment_id])
    assert stored.info.status == "FINISHED" and stored.info.run_name == "evaluate_models"
    assert stored.data.tags["task"] == "jpeg"
    assert stored.data.tags["kedro.session_id"] == run_params["run_id"]
    assert stored.data.params == {"seed": "0", "task.kind": "jpeg"}  # the tracking block is not a parameter
    assert stored.data.metrics == {
        "teacher_nfe4/fid": 2.79,
        "teacher_nfe4/lpips": 0.091,
        "teacher_nfe4/sec_per_image": 0.0119,
        "student_nfe1/fid": 0.27,
        "student_nfe1/lpips": 0.141,
        "student_nfe1/ca": 6.25,
        "student_nfe1/sec_per_image": 0.0028,
        "student_nfe1/speedup_vs_teacher_nfe4": 4.3,
        "corrupted_input/fid": 3.5,
        "distill/val/gap/teacher_nfe1": 0.5,
        "distill/loss/generator": 1.5,
    }
    curve = client.get_metric_history(stored.info.run_id, "distill/loss/generator")
    assert [point.step for point in curve] == [2]
    artifacts = {info.path for info in client.list_artifacts(stored.info.run_id, "evaluate")}
    assert artifacts == {"evaluate/metrics.json", "evaluate/metrics_table.md"}


def test_hook_closes_a_failed_run_as_failed_with_the_error(tmp_path, mlflow_client):
    hooks = TrackingHooks()
    params = {"tracking": {"enabled": True, "uri": str(tmp_path / "store"), "run_name": "nightly"}}
    hooks.after_context_created(SimpleNamespace(params=params, project_path=tmp_path))
    run_params = {"run_id": "s", "env": "local", "pipeline_names": ["distill"],
                  "node_names": ["distill_student"]}
    hooks.before_pipeline_run(run_params, pipeline=None, catalog=None)
    hooks.on_pipeline_error(RuntimeError("out of memory"), run_params, pipeline=None, catalog=None)
    client = mlflow_client(tmp_path / "store")
    (stored,) = client.search_runs([client.get_experiment_by_name("ibmd").experiment_id])
    assert stored.info.status == "FAILED" and stored.info.run_name == "nightly"
    assert stored.data.tags["error"] == "RuntimeError: out of memory"
    assert stored.data.tags["kedro.nodes"] == "distill_student"


def test_hook_closes_the_run_when_opening_it_fails_half_way(tmp_path, mlflow_client, monkeypatch):
    def refuse(self, params):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowRun, "log_params", refuse)
    hooks = TrackingHooks()
    params = {"tracking": {"enabled": True, "uri": str(tmp_path / "store")}}
    hooks.after_context_created(SimpleNamespace(params=params, project_path=tmp_path))
    with pytest.raises(OSError, match="disk full"):
        hooks.before_pipeline_run({"run_id": "s", "env": "test"}, pipeline=None, catalog=None)
    client = mlflow_client(tmp_path / "store")
    (stored,) = client.search_runs([client.get_experiment_by_name("ibmd").experiment_id])
    assert stored.info.status == "FAILED"
    hooks.after_dataset_saved("metrics", REPORT, node=None)  # no open run: nothing is logged
    assert client.get_run(stored.info.run_id).data.metrics == {}
