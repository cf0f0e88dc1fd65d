"""MLflow's half of tracking, against a real local file store: what the project writes into a
run reads back, and an enabled run without kedro-mlflow says how to install it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.hooks import start_kedro_mlflow
from ibmd_pipeline.tracking import MlflowRun, TrackingMissingError

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


def _run_in(store: Path, mlflow_client) -> MlflowRun:
    """A new run in experiment ``ibmd`` of the file store ``store`` (as kedro-mlflow opens one)."""
    client = mlflow_client(store)
    run = client.create_run(client.create_experiment("ibmd"), run_name="unit")
    return MlflowRun(client, run.info.run_id)


def test_curves_metrics_tags_and_artifacts_round_trip_through_a_file_store(tmp_path, mlflow_client):
    store = tmp_path / "mlruns"
    run = _run_in(store, mlflow_client)
    run.set_tags({"task": "jpeg", "airflow.dag_id": "ibmd-pipeline"})
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

    client = mlflow_client(store)
    stored = client.get_run(run.run_id)
    assert stored.data.tags["task"] == "jpeg" and stored.data.tags["airflow.dag_id"] == "ibmd-pipeline"
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


def test_missing_kedro_mlflow_fails_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "kedro_mlflow.framework.hooks.mlflow_hook", None)  # as if not installed
    install = r"pip install --no-deps kedro-mlflow==\d"
    with pytest.raises(TrackingMissingError, match=rf"tracking\.enabled.*{install}"):
        start_kedro_mlflow()


def test_saved_outputs_become_curves_metrics_and_artifacts_of_the_open_run(tmp_path, mlflow_client):
    """TrackingHooks.after_dataset_saved, on the run kedro-mlflow opened (here: one made directly)."""
    from ibmd_pipeline.hooks import TrackingHooks

    store = tmp_path / "mlruns"
    hooks = TrackingHooks()
    hooks._run = run = _run_in(store, mlflow_client)
    history = [{"step": 0.0, "val/gap/teacher_nfe1": 0.5}, {"step": 2.0, "loss/generator": 1.5}]
    hooks.after_dataset_saved("student_model", {"kind": "student", "history": history}, node=None)
    hooks.after_dataset_saved("metrics", REPORT, node=None)
    hooks.after_dataset_saved("metrics_table", "| student | 1 |\n", node=None)
    hooks.after_dataset_saved("pairs_test", {"clean": "not tracked"}, node=None)

    client = mlflow_client(store)
    stored = client.get_run(run.run_id)
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
    assert [point.step for point in client.get_metric_history(run.run_id, "distill/loss/generator")] == [2]
    artifacts = {info.path for info in client.list_artifacts(run.run_id, "evaluate")}
    assert artifacts == {"evaluate/metrics.json", "evaluate/metrics_table.md"}
