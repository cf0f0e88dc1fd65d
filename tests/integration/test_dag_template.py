"""The DAG files that `kedro airflow create -j airflow/dag_template.j2` writes, read without Airflow.

Airflow itself imports and runs them in test_airflow.py (``make test-airflow``); these checks
parse the generated Python and compare it with the registered pipelines and airflow.yml.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from slugify import slugify

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = PROJECT_ROOT / "airflow" / "dag_template.j2"


def task_id(name: str) -> str:
    """The task id the templates give a node or pipeline name."""
    return slugify(name)


@dataclass(frozen=True)
class GeneratedDag:
    """What a generated DAG file declares."""

    dag_arguments: dict[str, object]
    default_args: dict[str, object]
    tasks: dict[str, dict[str, object]]  # task_id -> @task keyword arguments
    edges: set[tuple[str, str]]
    runs: dict[str, list]  # task_id -> positional/keyword values passed to _run_kedro


def _literal(node: ast.AST) -> object:
    return ast.literal_eval(node)


def parse_dag_file(path: Path) -> GeneratedDag:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    dag_arguments: dict[str, object] = {}
    default_args: dict[str, object] = {}
    tasks: dict[str, dict[str, object]] = {}
    runs: dict[str, list] = {}
    edges: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)):
                    continue
                if decorator.func.id == "dag":
                    for keyword in decorator.keywords:
                        if keyword.arg == "default_args":
                            default_args = {kw.arg: ast.unparse(kw.value) for kw in keyword.value.keywords}
                        elif keyword.arg != "start_date":
                            dag_arguments[keyword.arg] = _literal(keyword.value)
                elif decorator.func.id == "task":
                    arguments = {keyword.arg: _literal(keyword.value) for keyword in decorator.keywords}
                    tasks[arguments["task_id"]] = arguments
                    call = next(
                        inner
                        for inner in ast.walk(node)
                        if isinstance(inner, ast.Call) and getattr(inner.func, "id", None) == "_run_kedro"
                    )
                    runs[arguments["task_id"]] = [ast.unparse(arg) for arg in call.args] + [
                        _literal(kw.value) for kw in call.keywords
                    ]
        # tasks["a"] >> tasks["b"]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift):
            if isinstance(node.left, ast.Subscript) and isinstance(node.right, ast.Subscript):
                edges.add((_literal(node.left.slice), _literal(node.right.slice)))
    return GeneratedDag(dag_arguments, default_args, tasks, edges, runs)


def kedro_airflow_create(target: Path, env: str, pipelines: str, params: str | None = None) -> dict:
    """Run the real `kedro airflow create` with the project's template; return the files by name."""
    command = [sys.executable, "-m", "kedro", "airflow", "create", "-j", str(TEMPLATE), "-t", str(target)]
    command += ["-e", env, "-p", pipelines] + (["--params", params] if params else [])
    result = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {path.name: path for path in target.glob("*.py")}


@pytest.fixture(scope="module")
def node_dags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return kedro_airflow_create(tmp_path_factory.mktemp("dags"), "test", "__default__,distill")


@pytest.fixture(scope="module")
def pipeline_dags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    target = tmp_path_factory.mktemp("dags")
    return kedro_airflow_create(target, "local", "__default__,distill", "task_per=pipeline")


def test_the_generated_files_are_python_with_one_dag_each(node_dags: dict[str, Path]):
    assert set(node_dags) == {"ibmd_pipeline_test_dag.py", "ibmd_pipeline_test_distill_dag.py"}
    for path in node_dags.values():
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_dag_ids_name_the_env_and_the_pipeline(node_dags, pipeline_dags, airflow_check):
    files = {**node_dags, **pipeline_dags}
    ids = {name: parse_dag_file(path).dag_arguments["dag_id"] for name, path in files.items()}
    assert ids == {
        "ibmd_pipeline_test_dag.py": "ibmd-pipeline-test",
        "ibmd_pipeline_test_distill_dag.py": "ibmd-pipeline-test-distill",
        "ibmd_pipeline_dag.py": "ibmd-pipeline",
        "ibmd_pipeline_distill_dag.py": "ibmd-pipeline-distill",
    }
    assert airflow_check.dag_id_for("distill", "test") == "ibmd-pipeline-test-distill"
    assert airflow_check.dag_id_for("__default__", "local") == "ibmd-pipeline"


def test_one_task_per_node_wired_like_the_kedro_pipeline(node_dags, project_pipelines):
    files = {"ibmd_pipeline_test_dag.py": "__default__", "ibmd_pipeline_test_distill_dag.py": "distill"}
    for file_name, pipeline_name in files.items():
        dag = parse_dag_file(node_dags[file_name])
        pipeline = project_pipelines[pipeline_name]
        assert set(dag.tasks) == {task_id(node.name) for node in pipeline.nodes}
        expected_edges = {
            (task_id(parent.name), task_id(child.name))
            for child, parents in pipeline.node_dependencies.items()
            for parent in parents
        }
        assert dag.edges == expected_edges
        for node in pipeline.nodes:
            assert dag.runs[task_id(node.name)] == ["PIPELINE_NAME", [node.name]]


def test_schedules_and_retries_come_from_airflow_yml(node_dags, airflow_config):
    default = parse_dag_file(node_dags["ibmd_pipeline_test_dag.py"])
    distill = parse_dag_file(node_dags["ibmd_pipeline_test_distill_dag.py"])
    assert default.dag_arguments["schedule"] is None  # the full run is triggered by hand
    assert distill.dag_arguments["schedule"] == airflow_config["distill"]["schedule"] == "0 2 * * *"
    assert default.default_args["retries"] == str(airflow_config["default"]["retries"])
    assert distill.default_args["retries"] == str(airflow_config["distill"]["retries"])
    assert default.dag_arguments["max_active_runs"] == 1


def test_gpu_nodes_go_to_the_gpu_queue(node_dags, airflow_config):
    gpu_tasks = {task_id(name) for name in airflow_config["default"]["gpu_nodes"]}
    for path in node_dags.values():
        for name, arguments in parse_dag_file(path).tasks.items():
            expected = airflow_config["default"]["gpu_queue"] if name in gpu_tasks else None
            assert arguments.get("queue") == expected, name


def test_one_task_per_pipeline_runs_the_stages_in_order(pipeline_dags, airflow_config):
    stages = airflow_config["default"]["stages"]
    default = parse_dag_file(pipeline_dags["ibmd_pipeline_dag.py"])
    assert list(default.tasks) == [task_id(stage) for stage in stages]
    # A chain built in a loop: the edges are not literal in the file, so check the wiring code.
    source = pipeline_dags["ibmd_pipeline_dag.py"].read_text(encoding="utf-8")
    assert "for upstream, downstream in zip(tasks, tasks[1:]):" in source
    for stage in stages:
        assert default.runs[task_id(stage)] == [repr(stage)]
        on_gpu = stage in airflow_config["default"]["gpu_pipelines"]
        assert default.tasks[task_id(stage)].get("queue") == ("gpu" if on_gpu else None)
    distill = parse_dag_file(pipeline_dags["ibmd_pipeline_distill_dag.py"])
    assert distill.tasks == {"distill": {"task_id": "distill", "queue": "gpu"}}


def test_airflow_yml_names_only_existing_nodes_and_pipelines(airflow_config, project_pipelines):
    settings = airflow_config["default"]
    default_nodes = {node.name for node in project_pipelines["__default__"].nodes}
    assert set(settings["gpu_nodes"]) <= default_nodes
    assert set(settings["gpu_pipelines"]) <= set(settings["stages"])
    # The stages, run one after another, are exactly the full run.
    assert set(settings["stages"]) <= set(project_pipelines)
    staged = [node.name for stage in settings["stages"] for node in project_pipelines[stage].nodes]
    assert sorted(staged) == sorted(default_nodes)
    # ... and each stage only reads what earlier stages wrote.
    written: set[str] = set()
    for stage in settings["stages"]:
        needed = {name for name in project_pipelines[stage].inputs() if not name.startswith("params:")}
        assert needed <= written, f"{stage} runs before {sorted(needed - written)} exist"
        written |= project_pipelines[stage].all_outputs()
