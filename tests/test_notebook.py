"""notebooks/walkthrough.ipynb runs headless on the `test` env's outputs and shows the latest of them.

The default pipeline runs first (`kedro run --env test`, about two minutes on two cores), then the
notebook is executed in a fresh kernel of this interpreter with ``KEDRO_ENV=test``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from pathlib import Path

import nbformat
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import Version
from kedro_datasets.pillow import ImageDataset
from nbclient import NotebookClient
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "walkthrough.ipynb"
KERNEL_NAME = "ibmd-pipeline-test"
CELL_TIMEOUT_S = 120
# The images the notebook shows, in order.
SHOWN = [
    "degrade_grid",
    "teacher_loss_plot",
    "teacher_grid",
    "distill_curves_plot",
    "distill_grid",
    "evaluate_plot",
    "evaluate_grid",
]


def _kedro_session() -> KedroSession:
    bootstrap_project(PROJECT_ROOT)
    return KedroSession.create(project_path=PROJECT_ROOT, env="test")


@pytest.fixture(scope="module")
def test_env_outputs() -> dict:
    """Run the default pipeline on the `test` env; return what its catalog then loads as latest."""
    with contextlib.chdir(PROJECT_ROOT):
        with _kedro_session() as session:
            session.run()
        with _kedro_session() as session:
            context = session.load_context()
            catalog_config = context.config_loader["catalog"]
            latest = Version(None, None)
            images = [ImageDataset(filepath=catalog_config[n]["filepath"], version=latest) for n in SHOWN]
            return {
                "metrics_table": context.catalog.load("metrics_table"),
                "metrics": context.catalog.load("metrics"),
                "image_sizes": [image.load().size for image in images],
            }


@pytest.fixture(scope="module")
def executed(test_env_outputs, tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The notebook after a headless run in a kernel of this interpreter, with KEDRO_ENV=test."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    kernel_dir = jupyter_path / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ibmd-pipeline (test)",
        "language": "python",
        "env": {"KEDRO_ENV": "test", "KEDRO_DISABLE_TELEMETRY": "true", "MPLBACKEND": "Agg"},
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(kernel))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_path))
        # Started from notebooks/, as Jupyter would: the notebook finds the project root itself.
        client = NotebookClient(
            notebook,
            kernel_name=KERNEL_NAME,
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        client.execute()
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    return [output for cell in code_cells for output in cell.get("outputs", [])]


def _printed(notebook: nbformat.NotebookNode) -> str:
    streams = [output for output in _outputs(notebook) if output.get("output_type") == "stream"]
    return "".join(output["text"] for output in streams)


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(not cell.outputs and cell.execution_count is None for cell in code_cells)
    markdown = " ".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    for topic in ("Inverse Bridge Matching Distillation", "How to read the table", "kedro run --pipelines="):
        assert topic in markdown


def test_the_notebook_runs_without_errors(executed: nbformat.NotebookNode):
    errors = [output for output in _outputs(executed) if output.get("output_type") == "error"]
    assert not errors, errors
    assert "env: test" in _printed(executed)


def test_it_shows_the_latest_images_of_every_step(executed: nbformat.NotebookNode, test_env_outputs: dict):
    shown = [
        Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))).size
        for output in _outputs(executed)
        if "image/png" in output.get("data", {})
    ]
    assert shown == test_env_outputs["image_sizes"]


def test_it_shows_the_metrics_table_and_the_records(executed: nbformat.NotebookNode, test_env_outputs: dict):
    data = [output["data"] for output in _outputs(executed) if "data" in output]
    markdown = [shown["text/markdown"] for shown in data if "text/markdown" in shown]
    assert markdown == [test_env_outputs["metrics_table"]]
    printed = _printed(executed)
    for record in test_env_outputs["metrics"]["records"]:
        assert f"{record['model']:>8}  NFE {record['nfe']:>4}" in printed
