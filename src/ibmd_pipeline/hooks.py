"""Kedro hooks of the project: every parameter checked before the first node runs, and optional
MLflow tracking of each run (``params:tracking``).

With ``tracking.enabled: false`` (the default) the hook reads the block, validates it and does
nothing else: MLflow is not imported and no folder is created. With ``kedro run --params
tracking.enabled=true`` every ``kedro run`` (every Airflow task too) becomes one MLflow run
holding the parameters, tags, the teacher's and the student's training curves, the evaluation
metrics and the report artefacts as they are saved. The work is done by
:mod:`ibmd_pipeline.tracking`; this module only connects it to Kedro's run events.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from ibmd_pipeline.parameters import parameter_sections, validate_parameters
from ibmd_pipeline.tracking import (
    MlflowRun,
    TrackingConfig,
    airflow_tags,
    evaluation_metrics,
    flatten_params,
    parse_tracking_config,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)

#: Catalog outputs stored as run artefacts, and their path inside the run.
ARTIFACT_FILES = {
    "degrade_grid": "degrade/degrade_grid.png",
    "teacher_loss_plot": "teacher/teacher_loss.png",
    "teacher_grid": "teacher/teacher_grid.png",
    "distill_curves_plot": "distill/distill_curves.png",
    "distill_grid": "distill/distill_grid.png",
    "metrics": "evaluate/metrics.json",
    "metrics_table": "evaluate/metrics_table.md",
    "evaluate_plot": "evaluate/evaluate_plot.png",
    "evaluate_grid": "evaluate/evaluate_grid.png",
}

#: Checkpoints whose ``history`` becomes stepped metrics, and the prefix of their names.
HISTORY_DATASETS = {"teacher_model": "teacher", "student_model": "distill"}

#: The evaluation report, logged as metrics (``student_nfe1/fid``...).
METRICS_DATASET = "metrics"

# Tag values are capped by MLflow (5000 characters is well inside every version's limit).
_ERROR_TAG_LIMIT = 5000


def default_run_name(pipeline_names: list[str] | None, node_names: list[str] | None) -> str:
    """``teacher``, ``degrade+teacher``, or ``distill:distill_student`` for one Airflow task."""
    name = "+".join(pipeline_names or ["__default__"])
    return f"{name}:{','.join(node_names)}" if node_names else name


def requested_pipeline(pipeline_names: list[str] | None) -> Pipeline:
    """The registered pipelines a run names (``__default__`` when it names none), whole: an
    Airflow task or ``--nodes`` runs a slice of them."""
    from kedro.framework.project import pipelines

    return sum((pipelines[name] for name in pipeline_names or ["__default__"]), Pipeline([]))


class ParameterValidationHooks:
    """Validates the parameters of a run before its first node, so that a bad value fails in
    seconds with the key and the allowed values, and nothing runs or is saved.

    Checked: every section that the *named* pipelines read, even when only some of their nodes
    run. Each Airflow task runs one node of ``__default__`` in a session of its own, so the
    first task of a DAG run already refuses a bad ``evaluate`` value instead of the last one,
    hours of training later. Sections that no named pipeline reads are not checked:
    ``--pipelines degrade`` is not blocked by a half-edited ``evaluate`` block it never uses
    (the run that does use it will refuse it before it starts). The one exception is
    ``engine``: it describes the machine a node runs on (``cuda`` is refused where no GPU is),
    so it is checked only when a node that reads it runs here; an Airflow plotting task on a
    CPU worker is not refused for the GPU workers' ``engine.device: cuda``.
    """

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._params = dict(context.params)

    @hook_impl(tryfirst=True)  # before any other hook opens an MLflow run or the like
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Raise ``ConfigError`` for the first bad value; no node has run yet."""
        sections = parameter_sections(requested_pipeline(run_params.get("pipeline_names")).inputs())
        if "engine" not in parameter_sections(pipeline.inputs()):
            sections.discard("engine")
        validate_parameters(self._params, sections)


class TrackingHooks:
    """Records each Kedro run in MLflow when ``params:tracking`` enables it."""

    def __init__(self) -> None:
        self._config = TrackingConfig()
        self._params: dict[str, Any] = {}
        self._project_path = Path.cwd()
        self._run: MlflowRun | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """Validate ``params:tracking`` once per session, before anything runs."""
        params = context.params
        self._config = parse_tracking_config(params.get("tracking"))
        self._params = dict(params) if self._config.enabled else {}
        self._project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Open the MLflow run (fails here, before any node, when MLflow is missing)."""
        if not self._config.enabled:
            return
        if self._run is not None:  # an earlier run in this process was interrupted
            self._run.finish(failed=True)
            self._run = None
        config = self._config
        pipeline_names = run_params.get("pipeline_names")
        node_names = run_params.get("node_names")
        tags = {
            "kedro.session_id": str(run_params.get("run_id")),
            "kedro.pipelines": ",".join(pipeline_names or ["__default__"]),
            "kedro.env": str(run_params.get("env")),
            "kedro.version": str(run_params.get("kedro_version")),
            **airflow_tags(os.environ),
        }
        if node_names:
            tags["kedro.nodes"] = ",".join(node_names)
        task = self._params.get("task")
        if isinstance(task, Mapping) and "kind" in task:
            tags["task"] = str(task["kind"])
        uri = resolve_tracking_uri(config.uri, self._project_path)
        run = MlflowRun.start(
            uri,
            config.experiment,
            run_name=config.run_name or default_run_name(pipeline_names, node_names),
            tags=tags,
        )
        try:
            run.log_params(flatten_params(self._params, exclude=("tracking",)))
        except Exception:
            # Kedro calls no error hook for a failure here: close the run before raising.
            run.finish(failed=True)
            raise
        self._run = run
        logger.info("MLflow run %s in experiment '%s' at %s", run.run_id, config.experiment, uri)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        """Log what a saved output holds: curves, evaluation metrics, report artefacts."""
        run = self._run
        if run is None:
            return
        if self._config.log_histories and dataset_name in HISTORY_DATASETS and isinstance(data, Mapping):
            run.log_history(data.get("history", []), HISTORY_DATASETS[dataset_name])
        if dataset_name == METRICS_DATASET and isinstance(data, Mapping):
            run.log_metrics(evaluation_metrics(data))
        if self._config.log_artifacts and dataset_name in ARTIFACT_FILES:
            run.log_object(data, ARTIFACT_FILES[dataset_name])

    @hook_impl
    def after_pipeline_run(
        self, run_params: dict[str, Any], run_result: Any, pipeline: Any, catalog: Any
    ) -> None:
        """Close the MLflow run as finished."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    @hook_impl
    def on_pipeline_error(
        self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any
    ) -> None:
        """Close the MLflow run as failed, with the error as a tag."""
        if self._run is not None:
            self._run.set_tags({"error": f"{type(error).__name__}: {error}"[:_ERROR_TAG_LIMIT]})
            self._run.finish(failed=True)
            self._run = None
