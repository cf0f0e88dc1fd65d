"""Every dataset of every registered pipeline is persisted by the catalog.

Airflow (and any other orchestrator that runs one node per process) starts a new Kedro session
for each task, so a dataset left to Kedro's default ``MemoryDataset`` would be lost between two
tasks. These checks read the real configuration, with the ``pairs_{split}`` factory resolved.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from kedro.framework.project import pipelines as registered_pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import AbstractDataset, MemoryDataset
from kedro.pipeline import Pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


@pytest.fixture(scope="module", params=[None, "test"], ids=["default-env", "test-env"])
def project(request: pytest.FixtureRequest) -> tuple[dict[str, Pipeline], object]:
    """The registered pipelines and the catalog of one environment (``None`` = ``kedro run``'s)."""
    with contextlib.chdir(PROJECT_ROOT):
        bootstrap_project(PROJECT_ROOT)
        with KedroSession.create(project_path=PROJECT_ROOT, env=request.param) as session:
            catalog = session.load_context().catalog
    return dict(registered_pipelines), catalog


def test_the_registry_has_the_documented_pipelines(project):
    pipelines, _ = project
    assert {"degrade", "teacher", "distill", "export", "evaluate", "__default__"} <= set(pipelines)
    assert pipelines["__default__"].nodes, "__default__ has no nodes"


def test_every_dataset_of_every_pipeline_is_declared_in_the_catalog(project):
    pipelines, catalog = project
    undeclared = {
        f"{pipeline_name}: {dataset}"
        for pipeline_name, pipeline in pipelines.items()
        for dataset in pipeline.datasets()
        if not _is_parameter(dataset) and dataset not in catalog
    }
    assert not undeclared, f"datasets that would fall back to MemoryDataset: {sorted(undeclared)}"


def test_no_dataset_between_nodes_is_held_in_memory(project):
    pipelines, catalog = project
    default = pipelines["__default__"]
    # Datasets that one node writes and another reads: exactly what crosses a task boundary.
    produced = {name for node in default.nodes for name in node.outputs}
    consumed = {name for node in default.nodes for name in node.inputs}
    crossing = sorted(produced & consumed)
    assert "teacher_model" in crossing and "pairs_train" in crossing
    for name in crossing:
        dataset = catalog.get(name)
        assert isinstance(dataset, AbstractDataset), name
        assert not isinstance(dataset, MemoryDataset), f"{name} is a {type(dataset).__name__}"
        assert "filepath" in dataset._describe(), f"{name} ({type(dataset).__name__}) has no file"


def test_the_pairs_factory_gives_each_split_its_own_file(project):
    _, catalog = project
    splits = ("train", "val", "test")
    paths = {split: catalog.get(f"pairs_{split}")._describe()["filepath"] for split in splits}
    assert len(set(map(str, paths.values()))) == 3
    assert all(str(path).endswith(f"pairs_{split}.npz") for split, path in paths.items())


def test_every_file_of_every_pipeline_is_written_by_a_project_dataset(project):
    """The project's datasets write atomically (``engine.checkpoint.atomic_write``); kedro-datasets'
    write straight into the final file, so none of them may persist a pipeline's output."""
    pipelines, catalog = project
    names = {name for pipeline in pipelines.values() for name in pipeline.datasets()}
    names = {name for name in names if not _is_parameter(name)}
    foreign = {
        name: type(catalog.get(name)).__module__
        for name in sorted(names)
        if not type(catalog.get(name)).__module__.startswith("ibmd_pipeline.io.")
    }
    assert not foreign, f"outputs written by datasets outside ibmd_pipeline.io: {foreign}"
