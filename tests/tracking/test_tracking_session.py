"""Tracking through real ``kedro run --env test`` sessions: kedro-mlflow records a run when one
parameter says so, with everything the project adds; off by default, it records nothing.

The ``test`` env's runs go to kedro-mlflow's store under the test data root
(``data/test/09_tracking/mlruns``, conf/base/mlflow.yml); each test looks at the runs it added.
(The store is not wiped between tests: MLflow keeps one store object per URI in the process,
and it fails once its folder is gone.)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.tracking import TrackingMissingError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = PROJECT_ROOT / "data" / "test"
STORE = TEST_DATA / "09_tracking" / "mlruns"
TRACKING_ON = {"tracking": {"enabled": True}}
AIRFLOW_TASK = {
    "AIRFLOW_CTX_DAG_ID": "ibmd-pipeline-test",
    "AIRFLOW_CTX_DAG_RUN_ID": "manual__2026-01-02",
    "AIRFLOW_CTX_TASK_ID": "make-pairs",
    "AIRFLOW_CTX_TRY_NUMBER": "1",
}


@pytest.fixture
def new_runs(mlflow_client):
    """A function listing the runs this test added to the test env's store. Afterwards no
    MLflow run may be left active in this process (the next session would log into it)."""

    def runs() -> list:
        if not STORE.exists():
            return []
        client = mlflow_client(STORE)
        experiment = client.get_experiment_by_name("ibmd")
        return [] if experiment is None else client.search_runs([experiment.experiment_id])

    before = {run.info.run_id for run in runs()}
    yield lambda: [run for run in runs() if run.info.run_id not in before]
    if "mlflow" in sys.modules:
        assert sys.modules["mlflow"].active_run() is None


def _data_files() -> set[Path]:
    """The files under the test data root, the MLflow store's aside."""
    found = {path for path in TEST_DATA.rglob("*") if path.is_file()} if TEST_DATA.exists() else set()
    return {path for path in found if STORE not in path.parents}


@pytest.mark.slow
def test_a_tracked_run_holds_params_tags_curves_and_artifacts(new_runs, run_kedro, mlflow_client, tmp_path):
    params = {**TRACKING_ON, "teacher": {"workdir": str(tmp_path / "work")}}
    kedro_run = run_kedro(["degrade", "teacher"], params=params)
    client = mlflow_client(STORE)
    (run,) = new_runs()
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "degrade+teacher"

    grid_file = kedro_run.versioned_file("08_reporting/degrade_grid.png")
    tags = run.data.tags
    assert tags["run_id"] == grid_file.parent.name  # the Kedro session id is the catalog version
    assert (tags["env"], tags["task"]) == ("test", "sr4x_bicubic")
    assert tags["kedro_command"] == "kedro run --pipeline=degrade,teacher"  # kedro-mlflow's wording

    params = run.data.params
    assert params["data.max_images"] == "300" and params["teacher.train.steps"] == "24"  # conf/test
    assert params["teacher.sampler.grid_nfe"] == "[1, 4, 16]" and params["seed"] == "0"
    assert params["evaluate.num_images"] == "16"  # every section, not only those of the nodes that ran
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


def run_nodes(params: dict, pipeline: str, nodes: list[str]) -> None:
    """One Airflow task: some nodes of a registered pipeline in a session of their own."""
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env="test", runtime_params=params) as session:
            session.run(pipeline_names=[pipeline], node_names=nodes)


@pytest.mark.slow
def test_an_airflow_task_is_a_run_tagged_with_its_dag_run(new_runs, monkeypatch):
    for variable, value in AIRFLOW_TASK.items():
        monkeypatch.setenv(variable, value)
    run_nodes(TRACKING_ON, "__default__", ["make_pairs"])
    (run,) = new_runs()
    assert run.info.status == "FINISHED" and run.info.run_name == "__default__:make_pairs"
    tags = run.data.tags
    airflow = {key: tags[key] for key in tags if key.startswith("airflow.")}
    assert airflow == {"airflow.dag_id": "ibmd-pipeline-test", "airflow.dag_run_id": "manual__2026-01-02",
                       "airflow.task_id": "make-pairs", "airflow.try_number": "1"}
    assert run.data.params["distill.train.steps"] == "4"  # the whole run's parameters, in one task's run


@pytest.mark.slow
def test_a_failing_run_is_recorded_as_failed(new_runs, degrade_run, run_kedro):
    # A valid value that the data contradict: the teacher node refuses it once it sees the pairs.
    params = {**TRACKING_ON, "task": {"kind": "jpeg"}}
    with pytest.raises(ConfigError, match=r"re-run the degrade pipeline"):
        run_kedro(["teacher"], params=params)
    (run,) = new_runs()
    assert run.info.status == "FAILED" and "re-run the degrade pipeline" in run.data.tags["error"]


@pytest.mark.slow
def test_a_bad_parameter_stops_before_the_run_is_opened(new_runs, run_kedro):
    before = _data_files()
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        run_kedro(["degrade"], params={**TRACKING_ON, "data": {"image_size": 4}})
    assert new_runs() == []
    assert _data_files() == before  # no node saved anything


@pytest.mark.slow
def test_tracking_without_kedro_mlflow_stops_before_any_node(new_runs, run_kedro, monkeypatch):
    import ibmd_pipeline.hooks

    def not_installed():  # what start_kedro_mlflow raises then (test_tracking_mlflow.py)
        raise TrackingMissingError("parameter 'tracking.enabled' is true but kedro-mlflow cannot be imported")

    # (Removing the module itself would also break Kedro's loading of the plugin's entry points.)
    monkeypatch.setattr(ibmd_pipeline.hooks, "start_kedro_mlflow", not_installed)
    before = _data_files()
    with pytest.raises(TrackingMissingError, match="kedro-mlflow cannot be imported"):
        run_kedro(["degrade"], params=TRACKING_ON)
    assert _data_files() == before  # no node ran: nothing was saved
    assert new_runs() == []


@pytest.mark.slow
def test_tracking_off_starts_no_kedro_mlflow_hook_and_records_nothing(new_runs):
    outputs, hooks = None, []
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
            hooks = session._hook_manager.get_plugins()
            # kedro-mlflow's settings are on the context for its commands (`kedro mlflow ui`)
            settings = session.load_context().mlflow
            outputs = session.run(pipeline_names=["degrade"])
    assert settings.server.mlflow_tracking_uri == STORE.as_uri()
    assert settings.tracking.experiment.name == "ibmd"
    assert sorted(outputs) == ["corrupted_train", "degrade_grid", "pairs_test"]  # the run did run
    # kedro-mlflow's own hook, which would record every run, is not registered (settings.py)
    assert not any(type(hook).__module__.startswith("kedro_mlflow") for hook in hooks)
    assert new_runs() == [] and not (PROJECT_ROOT / "mlruns").exists()
