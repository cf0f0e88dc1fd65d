"""``kedro viz build`` produces a static site that shows every registered pipeline and node.

The real command runs once per test session, in a throwaway project folder (this project's
``pyproject.toml`` and a link to its ``conf/``; the package itself is imported from the
installed project), so the test never writes ``build/`` in the working tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kedro.framework.project import pipelines as registered_pipelines
from kedro.framework.startup import bootstrap_project

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 300


def _is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="session")
def viz_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``build/`` folder that ``kedro viz build`` wrote for this project."""
    working_tree_build = _snapshot(PROJECT_ROOT / "build")
    project = tmp_path_factory.mktemp("viz-project")
    (project / "pyproject.toml").write_bytes((PROJECT_ROOT / "pyproject.toml").read_bytes())
    (project / "conf").symlink_to(PROJECT_ROOT / "conf", target_is_directory=True)
    # Kedro insists on the source folder existing; the package comes from the installed project.
    (project / "src").mkdir()
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _snapshot(PROJECT_ROOT / "build") == working_tree_build, "the build wrote into the working tree"
    return project / "build"


@pytest.fixture(scope="session")
def pipelines() -> dict:
    bootstrap_project(PROJECT_ROOT)
    return dict(registered_pipelines)


@pytest.fixture(scope="session")
def main_api(viz_build: Path) -> dict:
    return json.loads((viz_build / "api" / "main").read_text(encoding="utf-8"))


def test_the_build_is_a_servable_static_site(viz_build: Path):
    index = (viz_build / "index.html").read_text(encoding="utf-8")
    assert "<html" in index.lower()
    assert any((viz_build / "assets").iterdir()), "no JavaScript/CSS assets were copied"


def _task_names(api_response: dict) -> set[str]:
    return {node["full_name"] for node in api_response["nodes"] if node["type"] == "task"}


def test_every_registered_pipeline_is_listed(main_api: dict, pipelines: dict):
    assert {pipeline["id"] for pipeline in main_api["pipelines"]} == set(pipelines)
    assert main_api["selected_pipeline"] == "__default__"


def test_every_node_of_the_default_pipeline_is_shown(main_api: dict, pipelines: dict):
    assert _task_names(main_api) == {node.name for node in pipelines["__default__"].nodes}


def test_each_pipeline_page_shows_exactly_its_nodes(viz_build: Path, pipelines: dict):
    for name, pipeline in pipelines.items():
        page = json.loads((viz_build / "api" / "pipelines" / name).read_text(encoding="utf-8"))
        assert page["selected_pipeline"] == name
        assert _task_names(page) == {node.name for node in pipeline.nodes}, name


def test_every_dataset_is_shown_with_its_catalog_type(main_api: dict, pipelines: dict):
    data_nodes = {node["name"]: node for node in main_api["nodes"] if node["type"] == "data"}
    expected = {name for name in pipelines["__default__"].datasets() if not _is_parameter(name)}
    assert expected <= set(data_nodes)
    for name in expected:
        dataset_type = data_nodes[name]["dataset_type"] or ""
        assert dataset_type and "MemoryDataset" not in dataset_type, (name, dataset_type)


def test_the_edges_follow_the_node_inputs_and_outputs(main_api: dict, pipelines: dict):
    ids = {node["id"]: node["name"] for node in main_api["nodes"]}
    edges = {(ids[edge["source"]], ids[edge["target"]]) for edge in main_api["edges"]}
    for node in pipelines["__default__"].nodes:
        for dataset in node.outputs:
            assert (node.name, dataset) in edges
        for dataset in node.inputs:
            if dataset != "parameters":
                assert (dataset, node.name) in edges
