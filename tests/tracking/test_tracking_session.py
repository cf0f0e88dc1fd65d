"""Tracking through real ``kedro run --env test`` sessions: on with one parameter, off by default."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.tracking import MlflowMissingError

TEST_DATA = Path(__file__).resolve().parents[2] / "data" / "test"


def _tracking_on(store: Path) -> dict:
    return {"tracking": {"enabled": True, "uri": str(store)}}


def _only_run(client):
    (run,) = client.search_runs([client.get_experiment_by_name("ibmd").experiment_id])
    return run


@pytest.fixture(scope="module")
def tracked(run_kedro, tmp_path_factory):
    """``kedro run --env test --pipelines degrade,teacher --params tracking.enabled=true,...``."""
    tmp = tmp_path_factory.mktemp("tracked")
    params = {**_tracking_on(tmp / "mlruns"), "teacher": {"workdir": str(tmp / "work")}}
    return run_kedro(["degrade", "teacher"], params=params), tmp / "mlruns"


@pytest.mark.slow
def test_a_tracked_run_holds_params_tags_curves_and_artifacts(tracked, mlflow_client, tmp_path):
    kedro_run, store = tracked
    client = mlflow_client(store)
    run = _only_run(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "degrade+teacher"

    grid_file = kedro_run.versioned_file("08_reporting/degrade_grid.png")
    tags = run.data.tags
    assert tags["kedro.session_id"] == grid_file.parent.name  # the session id is the catalog version
    assert tags["kedro.pipelines"] == "degrade,teacher"
    assert (tags["kedro.env"], tags["task"]) == ("test", "sr4x_bicubic")

    params = run.data.params
    assert params["data.max_images"] == "300" and params["teacher.train.steps"] == "24"  # conf/test
    assert params["teacher.sampler.grid_nfe"] == "[1, 4, 16]" and params["seed"] == "0"
    assert not any(key.startswith("tracking.") for key in params)

    checkpoint = torch.load(kedro_run.versioned_file("06_models/teacher.pt"), weights_only=True)
    for key in ("loss", "val_loss"):
        expected = [(int(r["step"]), r[key]) for r in checkpoint["history"] if key in r]
        points = client.get_metric_history(run_id, f"teacher/{key}")
        curve = sorted((point.step, point.value) for point in points)
        assert [step for step, _ in curve] == [step for step, _ in expected] and len(expected) >= 2
        assert [value for _, value in curve] == pytest.approx([value for _, value in expected], rel=1e-12)

    stored = {info.path for where in ("degrade", "teacher") for info in client.list_artifacts(run_id, where)}
    assert stored == {"degrade/degrade_grid.png", "teacher/teacher_grid.png", "teacher/teacher_loss.png"}
    for artifact in ("degrade/degrade_grid.png", "teacher/teacher_grid.png"):
        logged = Path(client.download_artifacts(run_id, artifact, str(tmp_path)))
        saved = kedro_run.versioned_file(f"08_reporting/{Path(artifact).name}")  # what the catalog wrote
        with Image.open(logged) as ours, Image.open(saved) as catalogued:
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(catalogued))


@pytest.mark.slow
def test_a_failing_run_is_recorded_as_failed(run_kedro, mlflow_client, tmp_path):
    params = {**_tracking_on(tmp_path / "mlruns"), "data": {"image_size": 30}}
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        run_kedro(["degrade"], params=params)
    run = _only_run(mlflow_client(tmp_path / "mlruns"))
    assert run.info.status == "FAILED" and "data.image_size" in run.data.tags["error"]


def _data_files() -> set[Path]:
    return {path for path in TEST_DATA.rglob("*") if path.is_file()} if TEST_DATA.exists() else set()


@pytest.mark.slow
def test_tracking_without_mlflow_stops_before_any_node(run_kedro, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if MLflow were not installed
    before = _data_files()
    with pytest.raises(MlflowMissingError, match="pip install mlflow-skinny"):
        run_kedro(["degrade"], params=_tracking_on(tmp_path / "mlruns"))
    assert _data_files() == before  # no node ran: nothing was saved
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_tracking_off_imports_nothing_and_writes_nothing(project_root, tmp_path):
    store = tmp_path / "mlruns"
    script = textwrap.dedent(
        """
        import contextlib, json, sys
        from pathlib import Path
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        root, store = Path(sys.argv[1]), sys.argv[2]
        with contextlib.chdir(root):
            bootstrap_project(root)
            params = {"tracking": {"uri": store}}  # enabled stays false (conf/base)
            with KedroSession.create(project_path=root, env="test", runtime_params=params) as session:
                outputs = session.run(pipeline_names=["degrade"])
        mlflow = sorted(name for name in sys.modules if name.split(".")[0] == "mlflow")
        print(json.dumps({"outputs": sorted(outputs), "mlflow": mlflow}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(project_root), str(store)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outputs"] == ["corrupted_train", "degrade_grid", "pairs_test"]  # the run did run
    assert result["mlflow"] == []
    assert not store.exists()
