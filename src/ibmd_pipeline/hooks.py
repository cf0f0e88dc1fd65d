"""Kedro hooks of the project: every parameter checked before the first node runs, the run's
time budget planned from measured step times (``params:budget``), and optional MLflow tracking
of each run through kedro-mlflow (``params:tracking``).

With ``tracking.enabled: false`` (the default) the tracking hook reads the block, validates it
and does nothing else: kedro-mlflow's hook is not started and nothing is written. With
``kedro run --params tracking.enabled=true`` every ``kedro run`` (every Airflow task too) becomes
one MLflow run, opened, named, tagged and closed by kedro-mlflow as configured in
``conf/base/mlflow.yml``; this module adds what the plugin does not log by itself (all the
parameters up front, Airflow ids, training curves, evaluation metrics and report artefacts),
done by :mod:`ibmd_pipeline.tracking`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

from ibmd_pipeline.budget import (
    DISTILL_STEPS,
    BudgetPlan,
    StepTimes,
    explicit_step_keys,
    format_plan,
    format_revision,
    measure_step_times,
    parse_budget_config,
    plan_budget,
    planned_parameters,
    revise_distillation,
    summarize_plan,
)
from ibmd_pipeline.parameters import check_section_names, parameter_sections, validate_parameters
from ibmd_pipeline.tracking import (
    TRACKING_REQUIREMENTS,
    MlflowRun,
    TrackingConfig,
    TrackingMissingError,
    airflow_tags,
    evaluation_metrics,
    offline_mlflow_environment,
    parse_tracking_config,
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
    CPU worker is not refused for the GPU workers' ``engine.device: cuda``. A top-level
    parameter that is no section at all (a typo such as ``distil``) is refused in every run.
    """

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._params = dict(context.params)

    @hook_impl(tryfirst=True)  # before any other hook opens an MLflow run or the like
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Raise ``ConfigError`` for the first bad value; no node has run yet."""
        check_section_names(self._params)
        sections = parameter_sections(requested_pipeline(run_params.get("pipeline_names")).inputs())
        if "engine" not in parameter_sections(pipeline.inputs()):
            sections.discard("engine")
        # Read by the run's budget hook, not by a node: checked in every run.
        validate_parameters(self._params, sections | {"budget"})


#: The nodes whose step counts a budget plans, and the node that reads the distilled teacher.
TEACHER_NODE, DISTILL_NODE = "train_teacher", "distill_student"
#: The nodes that compute Inception features (the probe times Inception when one of them runs).
INCEPTION_NODES = {"compute_fid_reference", "evaluate_teacher", "evaluate_models"}


def base_parameters(context: Any) -> dict[str, Any]:
    """The parameters of ``conf/base`` alone (no ``conf/local``, no ``--env``, no ``--params``),
    merged section by section, interpolations left unresolved.

    Read as plain YAML: a second config loader would re-register the ``globals`` resolver and
    point this run's catalog at ``conf/base``'s data root."""
    import yaml

    loader = context.config_loader
    base = Path(str(loader.conf_source)) / getattr(loader, "base_env", "base")
    merged: dict[str, Any] = {}
    for path in sorted(base.glob("parameters*.yml")) + sorted(base.glob("parameters*/**/*.yml")):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


class RunBudgetHooks:
    """The expected run time at the start of every run that trains, and the time budget.

    Before the first node of a run that trains the teacher or distils (and after the parameters
    were validated), a few teacher steps and IBMD updates are timed on this machine
    (:func:`~ibmd_pipeline.budget.measure_step_times`, outside the training's random streams), the
    run's time is predicted, and the plan is printed: the precision path, the measured times,
    the steps, the expected time per stage and in total. When the prediction exceeds
    ``budget.minutes``, the teacher's steps and the distillation's updates are scaled down
    (:func:`~ibmd_pipeline.budget.plan_budget`) and the nodes that read ``params:teacher`` and
    ``params:distill`` get the planned values. On a CPU with native bf16, a stage's ``cpu_bf16:
    auto`` is decided by the probe, which times both precisions and keeps bf16 only when it is
    clearly faster (:func:`~ibmd_pipeline.budget.probe.choose_precision`); the node then reads
    ``cpu_bf16: always`` or ``never``. Steps set explicitly (``--params``, or another
    value than ``conf/base``'s) are never changed; a slice of a pipeline (``--nodes``, an Airflow
    task) is estimated but not scaled, since the rest of its run is not in view.

    When the distillation starts, the run's time so far is compared with the plan's, and off by
    more than the margin the distillation's updates are planned again from what is left of the
    budget (:func:`~ibmd_pipeline.budget.revise_distillation`), printed as a revision.

    ``measure`` replaces the probe (tests inject step times with it); ``clock`` is the run's clock
    (tests stop it).
    """

    def __init__(
        self,
        measure: Callable[..., StepTimes] = measure_step_times,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._measure = measure
        self._clock = clock
        self._params: dict[str, Any] = {}
        self._base: dict[str, Any] = {}
        self._overrides: dict[str, Any] = {}
        self.plan: BudgetPlan | None = None
        self._planned_at = 0.0
        self._nodes: set[str] = set()
        self._done: set[str] = set()
        self._revisable = False
        self._floor = 1.0

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._params = dict(context.params)
        self._base = base_parameters(context)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._overrides, self.plan, self._done, self._revisable = {}, None, set(), False
        nodes = {node.name for node in pipeline.nodes}
        trains, distils = TEACHER_NODE in nodes, DISTILL_NODE in nodes
        config = parse_budget_config(self._params.get("budget"))
        if not (trains or distils) or config.probe_steps == 0:
            return
        params = self._params
        for section in ("teacher", "distill"):
            distributed = (params.get(section) or {}).get("distributed") or {}
            if int(distributed.get("nproc_per_node", 1)) > 1:
                logger.info("no run plan: %s trains on several processes (the probe times one)", section)
                return
        teacher_checkpoint = None
        if distils and not trains:  # the distillation reads the teacher in the catalog
            try:
                teacher_checkpoint = catalog.load("teacher_model")
            except Exception as err:  # noqa: BLE001 - the distill node reports a missing teacher itself
                logger.info("no run plan: the teacher to distil cannot be read (%s)", err)
                return
        fid = ((params.get("evaluate") or {}).get("fid") or {}).get("enabled", True)
        times = self._measure(
            params,
            teacher=trains,
            distill=distils,
            teacher_checkpoint=teacher_checkpoint,
            repeats=config.probe_steps,
            inception=bool(fid) and bool(nodes & INCEPTION_NODES),
            report="evaluate_models" in nodes,
        )
        explicit = explicit_step_keys(params, self._base, run_params.get("runtime_params"))
        self.plan = plan_budget(
            config, times, params, nodes, explicit, scalable=not run_params.get("node_names")
        )
        self._planned_at = self._clock()
        self._nodes, self._floor = nodes, config.floor
        self._revisable = not run_params.get("node_names")
        # The block as one piece on the console (a log handler would wrap each line), and a one-line
        # summary in the log.
        print(format_plan(self.plan), flush=True)
        logger.info("run plan: %s", summarize_plan(self.plan))
        sections = planned_parameters(self.plan, params)
        for section, choice in times.precision.items():  # cpu_bf16: auto, decided by timing both
            values = dict(sections.get(section) or params[section])
            values["cpu_bf16"] = "always" if choice == "bf16" else "never"
            sections[section] = values
        self._overrides = {f"params:{section}": values for section, values in sections.items()}

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> Any:
        """The planned ``params:teacher`` / ``params:distill`` for the nodes that read them; the
        distillation's updates planned again from the time the run has taken so far."""
        if node.name == DISTILL_NODE and self.plan is not None and self._revisable:
            self._revise_distillation()
        planned = {name: values for name, values in self._overrides.items() if name in inputs}
        return planned or None

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        self._done.add(node.name)

    def _elapsed(self) -> float:
        assert self.plan is not None
        return self._clock() - self._planned_at + self.plan.times.startup + self.plan.times.probe

    def _revise_distillation(self) -> None:
        """Re-plan the distillation's updates from what the run has taken so far
        (:func:`~ibmd_pipeline.budget.revise_distillation`); the distill node then reads them."""
        assert self.plan is not None
        pending = self._nodes - self._done
        revised = revise_distillation(
            self.plan, self._params, self._done, pending, self._elapsed(), self._floor
        )
        if revised is self.plan:
            return
        self.plan = revised
        print(format_revision(revised), flush=True)
        logger.info(
            "run plan revised before the distillation: %s %d; expected total %.1f min",
            DISTILL_STEPS,
            revised.planned[DISTILL_STEPS],
            revised.expected_seconds / 60.0,
        )
        section = dict(self._overrides.get("params:distill") or self._params["distill"])
        changed = planned_parameters(revised, self._params).get("distill")
        section["train"] = dict((changed or self._params["distill"])["train"])
        self._overrides["params:distill"] = section

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """What the planned run took, against what its plan expected (and the budget)."""
        if self.plan is None:
            return
        budget = "" if self.plan.budget_minutes is None else f"; budget {self.plan.budget_minutes:g} min"
        if self.plan.first is not None:
            budget = (
                f" (revised before the distillation; at the start "
                f"{self.plan.first.expected_seconds / 60.0:.1f} min){budget}"
            )
        logger.info(
            "the run took %.1f min; its plan expected %.1f min%s",
            self._elapsed() / 60.0,
            self.plan.expected_seconds / 60.0,
            budget,
        )


def start_kedro_mlflow() -> Any:
    """A fresh kedro-mlflow ``MlflowHook``, or :class:`TrackingMissingError` with the install
    command when the plugin or MLflow is missing."""
    try:
        from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
    except ImportError as err:
        raise TrackingMissingError(
            f"parameter 'tracking.enabled' is true but kedro-mlflow cannot be imported ({err}): "
            f"{TRACKING_REQUIREMENTS}, or run without tracking"
        ) from err
    return MlflowHook()


#: Where kedro-mlflow finds its configuration in conf/<env>/ (the pattern its hook registers).
MLFLOW_CONFIG_PATTERNS = ["mlflow*", "mlflow*/**", "**/mlflow*"]


def attach_mlflow_settings(context: Any) -> None:
    """Give the context kedro-mlflow's settings as ``context.mlflow``, as the plugin's hook does,
    but without opening the store: validated ``mlflow.yml``, relative paths made ``file:`` URIs
    from the project root. The plugin's commands read them (``kedro mlflow ui`` opens the UI on
    that tracking URI) also while tracking is off. Nothing when kedro-mlflow is not installed.
    """
    try:
        from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig, _validate_uri
    except ImportError:
        return
    context.config_loader.config_patterns.setdefault("mlflow", MLFLOW_CONFIG_PATTERNS)
    try:
        values = context.config_loader["mlflow"]
    except MissingConfigException:
        values = {}
    settings = KedroMlflowConfig.model_validate(dict(values))
    for field in ("mlflow_tracking_uri", "mlflow_registry_uri"):
        uri = getattr(settings.server, field)
        if uri is not None:
            setattr(settings.server, field, _validate_uri(project_path=context.project_path, uri=uri))
    context.__setattr__("mlflow", settings)  # KedroContext is frozen; the plugin sets it this way too


class TrackingHooks:
    """kedro-mlflow's hook, run only when ``params:tracking`` enables it, plus what it leaves out.

    Every Kedro event is handed on to kedro-mlflow's ``MlflowHook`` (its own automatic
    registration is off in ``settings.py``, else it would record every run). Added to its run:

    * every parameter section at the start, formatted by the plugin's own parameter logging
      (it logs only the parameters of the nodes that run, and an Airflow task runs one node);
    * tags: the Airflow DAG, DAG-run, task ids and try number, and the task kind;
    * the teacher's and the student's training curves, as stepped metrics, read from the saved
      checkpoints (kedro-mlflow's metric datasets would need a node output per curve);
    * the evaluation report as metrics and the plots, grids and reports as artefacts, as they
      are saved (kedro-mlflow's artefact dataset would wrap, and change, every catalog entry);
    * the error of a failed run as the tag ``error``.
    """

    def __init__(self) -> None:
        self._config = TrackingConfig()
        self._params: dict[str, Any] = {}
        self._mlflow_hook: Any = None
        self._run: MlflowRun | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        """Validate ``params:tracking``; when enabled, start kedro-mlflow (it reads mlflow.yml)."""
        self._config = parse_tracking_config(context.params.get("tracking"))
        self._mlflow_hook = None
        self._run = None
        if not self._config.enabled:
            attach_mlflow_settings(context)
            return
        self._params = {key: value for key, value in context.params.items() if key != "tracking"}
        hook = start_kedro_mlflow()
        offline_mlflow_environment(os.environ)
        hook.after_context_created(context)
        self._mlflow_hook = hook

    @hook_impl
    def after_catalog_created(
        self,
        catalog: Any,
        conf_catalog: dict[str, Any],
        conf_creds: dict[str, Any],
        parameters: dict[str, Any],
        save_version: str,
        load_versions: dict[str, str],
    ) -> None:
        if self._mlflow_hook is not None:
            self._mlflow_hook.after_catalog_created(
                catalog, conf_catalog, conf_creds, parameters, save_version, load_versions
            )

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Open the MLflow run (after the parameters were validated) and log the parameters."""
        hook = self._mlflow_hook
        if hook is None:
            return
        run_config = hook.mlflow_config.tracking.run
        if run_config.name is None:
            run_config.name = default_run_name(run_params.get("pipeline_names"), run_params.get("node_names"))
        hook.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        if hook.run_id is None:  # mlflow.yml's `disable_tracking.pipelines` lists these pipelines
            return
        from mlflow.tracking import MlflowClient

        run = MlflowRun(MlflowClient(tracking_uri=hook.mlflow_config.server.mlflow_tracking_uri), hook.run_id)
        try:
            tags = airflow_tags(os.environ)
            task = self._params.get("task")
            if isinstance(task, Mapping) and "kind" in task:
                tags["task"] = str(task["kind"])
            run.set_tags(tags)
            parameters = {f"params:{name}": value for name, value in self._params.items()}
            hook.before_node_run(node=None, catalog=catalog, inputs=parameters, is_async=False)
        except Exception as error:
            # Kedro calls no error hook for a failure here: close the run before raising.
            hook.on_pipeline_error(error=error, run_params=run_params, pipeline=pipeline, catalog=catalog)
            raise
        self._run = run
        logger.info("MLflow run %s at %s", hook.run_id, hook.mlflow_config.server.mlflow_tracking_uri)

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool) -> None:
        if self._run is not None:
            self._mlflow_hook.before_node_run(node=node, catalog=catalog, inputs=inputs, is_async=is_async)

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
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        """Close the MLflow run as finished."""
        if self._mlflow_hook is not None:
            self._mlflow_hook.after_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
        self._run = None

    @hook_impl
    def on_pipeline_error(
        self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any
    ) -> None:
        """Close the MLflow run as failed, with the error as a tag."""
        if self._run is not None:
            self._run.set_tags({"error": f"{type(error).__name__}: {error}"[:_ERROR_TAG_LIMIT]})
        if self._mlflow_hook is not None:
            self._mlflow_hook.on_pipeline_error(
                error=error, run_params=run_params, pipeline=pipeline, catalog=catalog
            )
        self._run = None
