"""The Airflow export under a real Airflow 3 (``make test-airflow``; deselected by default).

Uses scripts/airflow_check.py: a throwaway environment with apache-airflow and the project
(``.airflow-venv/``, built once, a few minutes), DAGs generated on the ``test`` env, imported
by Airflow's DagBag, and the full DAG run by ``airflow dags test``, where each task is a Kedro
session of its own: it only passes if every dataset between two nodes is persisted.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from slugify import slugify

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA_ROOT = PROJECT_ROOT / "data" / "test"  # conf/test/globals.yml

pytestmark = pytest.mark.airflow


@pytest.fixture(scope="module")
def airflow(airflow_check, tmp_path_factory: pytest.TempPathFactory):
    """An Airflow environment with an empty DAGs folder and a fresh AIRFLOW_HOME."""
    started = time.monotonic()
    venv = airflow_check.ensure_airflow_venv()
    print(f"Airflow environment: {time.monotonic() - started:.0f} s")
    work = tmp_path_factory.mktemp("airflow")
    return airflow_check.AirflowEnv(venv=venv, airflow_home=work / "home", dags_folder=work / "dags")


@pytest.fixture(scope="module")
def dagbag(airflow, airflow_check) -> dict:
    """What Airflow's DagBag makes of the DAGs of ``__default__`` and ``distill`` (env test)."""
    airflow_check.create_dags(airflow, "test", ("__default__", "distill"), params={"retries": "0"})
    return airflow_check.inspect_dags(airflow)


def test_the_dags_import_without_errors(dagbag: dict):
    assert dagbag["import_errors"] == {}
    assert set(dagbag["dags"]) == {"ibmd-pipeline-test", "ibmd-pipeline-test-distill"}


def test_airflow_sees_one_task_per_node_with_the_kedro_dependencies(dagbag: dict, project_pipelines):
    dags = {"ibmd-pipeline-test": "__default__", "ibmd-pipeline-test-distill": "distill"}
    for dag_id, pipeline_name in dags.items():
        tasks = dagbag["dags"][dag_id]["tasks"]
        pipeline = project_pipelines[pipeline_name]
        assert set(tasks) == {slugify(node.name) for node in pipeline.nodes}
        for child, parents in pipeline.node_dependencies.items():
            upstream = sorted(slugify(parent.name) for parent in parents)
            assert tasks[slugify(child.name)]["upstream"] == upstream, child.name


def test_airflow_reads_the_schedules_queues_and_retries(dagbag: dict, airflow_config: dict):
    default, distill = dagbag["dags"]["ibmd-pipeline-test"], dagbag["dags"]["ibmd-pipeline-test-distill"]
    assert default["schedule"] == "None"
    assert distill["schedule"] == "0 2 * * *"
    gpu_tasks = {slugify(name) for name in airflow_config["default"]["gpu_nodes"]}
    for dag in (default, distill):
        assert dag["max_active_runs"] == 1
        for name, task in dag["tasks"].items():
            assert task["queue"] == ("gpu" if name in gpu_tasks else "default"), name
            assert task["retries"] == 0  # --params retries=0 overrides airflow.yml


@pytest.fixture(scope="module")
def output_folders(project_pipelines) -> dict[str, Path]:
    """Each output of ``__default__`` -> its versioned folder on the ``test`` env."""
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env="test") as session:
            catalog = session.load_context().catalog
            return {
                name: (PROJECT_ROOT / str(catalog.get(name)._describe()["filepath"])).resolve()
                for name in project_pipelines["__default__"].all_outputs()
            }


def test_the_full_dag_runs_end_to_end_with_each_task_in_its_own_session(
    airflow, airflow_check, dagbag: dict, output_folders: dict[str, Path]
):
    def files() -> set[Path]:
        return {path.resolve() for path in TEST_DATA_ROOT.rglob("*") if path.is_file()}

    before = files()
    airflow_check.migrate_db(airflow)
    started = time.monotonic()
    run = airflow_check.run_dag_test(airflow, "ibmd-pipeline-test")
    print(f"airflow dags test ibmd-pipeline-test: {time.monotonic() - started:.0f} s")
    assert run.state == "success", (run.task_states, run.errors())
    assert run.task_states == {name: "success" for name in dagbag["dags"]["ibmd-pipeline-test"]["tasks"]}
    # Every output got a new version on disk (<filepath>/<version>/<file>): the tasks, each in
    # its own session, handed each other files, not objects in memory.
    new_files = files() - before
    assert all(folder.is_relative_to(TEST_DATA_ROOT.resolve()) for folder in output_folders.values())
    new_versions_of = {path.parent.parent for path in new_files}
    missing = sorted(name for name, folder in output_folders.items() if folder not in new_versions_of)
    assert not missing, f"no new version of {missing}"
