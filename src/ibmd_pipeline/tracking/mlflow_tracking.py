"""Recording a run's parameters, metrics, training curves and reports in MLflow.

Two halves:

* pure functions that turn the project's objects into what MLflow stores: nested parameters
  into dotted keys (:func:`flatten_params`), the evaluation report into metric names such as
  ``student_nfe1/fid`` (:func:`evaluation_metrics`), a trainer's ``history`` into stepped
  metrics (:func:`history_metrics`);
* :class:`MlflowRun`, one MLflow run written through ``MlflowClient`` with an explicit run id
  (no process-wide "active run"), so that several Kedro sessions in one process (tests,
  notebooks) never log into each other's runs.

MLflow is imported only when a run is started: with tracking off, importing this module costs
nothing and needs no MLflow installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ibmd_pipeline.tracking.config import is_local_file_store

__all__ = [
    "MLFLOW_REQUIREMENT",
    "PARAM_VALUE_LIMIT",
    "MlflowMissingError",
    "MlflowRun",
    "SteppedMetric",
    "airflow_tags",
    "evaluation_metrics",
    "flatten_params",
    "history_metrics",
    "require_mlflow",
]

#: What ``tracking.enabled`` needs installed (the client only; ``mlflow`` itself adds the UI).
MLFLOW_REQUIREMENT = "mlflow-skinny==3.17.2"

#: MLflow refuses parameter values longer than this (``mlflow.utils.validation``); longer
#: values are cut and say how much was cut, instead of failing the run.
PARAM_VALUE_LIMIT = 6000

# MLflow's batch limits per request: at most 1000 metrics and 100 parameters.
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100

# Characters MLflow accepts in parameter, metric and tag names.
_BAD_NAME_CHARS = re.compile(r"[^\w\-./ :]")

# Record fields that identify a row of the report rather than measure it.
_RECORD_IDENTITY = ("model", "nfe", "seed")


class MlflowMissingError(ImportError):
    """``tracking.enabled`` is true but MLflow cannot be imported."""


def require_mlflow() -> ModuleType:
    """Import MLflow, or fail with the command that installs it."""
    try:
        import mlflow
    except ImportError as err:
        raise MlflowMissingError(
            "parameter 'tracking.enabled' is true but MLflow is not installed: "
            f"pip install {MLFLOW_REQUIREMENT}  (or pip install -e '.[tracking]' for the UI too), "
            "or run without tracking"
        ) from err
    return mlflow


# ------------------------------------------------------------------------------------ pure


def _clean_name(name: str) -> str:
    return _BAD_NAME_CHARS.sub("_", name)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= PARAM_VALUE_LIMIT:
        return text
    suffix = f"... [{len(text)} characters, cut]"
    return text[: PARAM_VALUE_LIMIT - len(suffix)] + suffix


def flatten_params(params: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, str]:
    """Nested parameters as ``{"teacher.train.lr": "0.001", ...}``, ready for MLflow.

    Mappings are walked into dotted keys; every other value (numbers, booleans, ``None``,
    lists) is written as JSON, strings as they are. Values longer than
    :data:`PARAM_VALUE_LIMIT` are cut. Top-level keys in ``exclude`` are left out; an empty
    mapping is kept as ``"{}"`` so that its key still shows.
    """
    skipped = set(exclude)
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[_clean_name(prefix)] = _param_value(dict(value) if isinstance(value, Mapping) else value)

    for key, value in params.items():
        if key not in skipped:
            walk(str(key), value)
    return flat


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` for anything else (``null`` metrics, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def evaluation_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation report (``metrics.json``) as flat MLflow metrics.

    One name per model, NFE and measurement: ``teacher_nfe4/fid``, ``student_nfe1/lpips``,
    ``student_nfe1/sec_per_image``; a student's speed-ups are
    ``student_nfe1/speedup_vs_teacher_nfe4``. The corrupted input's scores (the baseline) are
    ``corrupted_input/<metric>``, the classifier's frame of the CA ``classifier/<key>``.
    Metrics that are ``null`` (disabled or not measurable) are left out.
    """
    metrics: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            metrics[_clean_name(name)] = number

    for record in report.get("records", []):
        prefix = f"{record['model']}_nfe{record['nfe']}"
        for key, value in record.items():
            if key in _RECORD_IDENTITY:
                continue
            if key == "speedup_vs_teacher" and isinstance(value, Mapping):
                for teacher_nfe, speedup in value.items():
                    put(f"{prefix}/speedup_vs_teacher_nfe{teacher_nfe}", speedup)
            else:
                put(f"{prefix}/{key}", value)
    for section in ("corrupted_input", "classifier"):
        block = report.get(section)
        if isinstance(block, Mapping):
            for key, value in block.items():
                put(f"{section}/{key}", value)
    return metrics


@dataclass(frozen=True)
class SteppedMetric:
    """One point of a training curve."""

    name: str
    value: float
    step: int


def history_metrics(history: Sequence[Mapping[str, Any]], prefix: str) -> list[SteppedMetric]:
    """A trainer's ``history`` (one dict per logged step, with a ``step`` key) as curve points.

    ``prefix`` names the curve family: ``teacher`` gives ``teacher/loss``, ``teacher/val_loss``;
    ``distill`` gives ``distill/loss/generator``, ``distill/val/gap/teacher_nfe1``. Records
    without a step and non-finite values are left out.
    """
    points: list[SteppedMetric] = []
    for record in history:
        step = _number(record.get("step"))
        if step is None:
            continue
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                points.append(SteppedMetric(_clean_name(f"{prefix}/{key}"), number, int(step)))
    return points


def airflow_tags(environ: Mapping[str, str]) -> dict[str, str]:
    """Tags that group the MLflow runs of one Airflow DAG run (one run per task).

    Airflow exports the task's context as ``AIRFLOW_CTX_*`` environment variables; outside
    Airflow this is empty.
    """
    names = {
        "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
        "AIRFLOW_CTX_DAG_RUN_ID": "airflow.dag_run_id",
        "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
        "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    }
    return {tag: environ[variable] for variable, tag in names.items() if environ.get(variable)}


# ------------------------------------------------------------------------------------ MLflow


def _allow_file_store(uri: str) -> None:
    """Let MLflow 3 use a local file store (it refuses one unless opted in).

    MLflow 3.13+ keeps its file store in maintenance mode and raises unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true. A folder of files is what ``tracking.uri`` asks for
    here, so the opt-in is given, unless the user set the variable themselves.
    """
    if is_local_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowRun:
    """One MLflow run, written through ``MlflowClient`` with its run id.

    Start it with :meth:`start`, log into it, close it with :meth:`finish`.
    """

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> MlflowRun:
        """Open a new run in ``experiment`` (created when missing) at tracking ``uri``."""
        require_mlflow()
        _allow_file_store(uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment)
            except MlflowException:
                # Another process (a parallel Airflow task) created it first.
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags={_clean_name(k): str(v) for k, v in (tags or {}).items()},
        )
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log parameters (already flat strings, see :func:`flatten_params`)."""
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in params.items()]
        for batch in _chunks(entries, _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=list(batch), synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics at one step (the evaluation report: step 0)."""
        self._log_points([SteppedMetric(name, value, step) for name, value in metrics.items()])

    def log_history(self, history: Sequence[Mapping[str, Any]], prefix: str) -> None:
        """Log a trainer's history as stepped metrics (see :func:`history_metrics`)."""
        self._log_points(history_metrics(history, prefix))

    def _log_points(self, points: Sequence[SteppedMetric]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(point.name, point.value, now, point.step) for point in points]
        for batch in _chunks(entries, _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=list(batch), synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of the run."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, _clean_name(key), str(value))

    def log_object(self, obj: Any, artifact_file: str) -> None:
        """Store an in-memory object as the artifact ``artifact_file`` (a path in the run).

        A matplotlib figure or a PIL image becomes a PNG, a mapping JSON, a string text (the
        markdown table). Anything else is a ``TypeError``: better than a silent gap.
        """
        from matplotlib.figure import Figure
        from PIL import Image

        if isinstance(obj, Figure):
            self.client.log_figure(self.run_id, obj, artifact_file)
        elif isinstance(obj, Image.Image):
            self.client.log_image(self.run_id, obj, artifact_file=artifact_file)
        elif isinstance(obj, Mapping):
            self.client.log_dict(self.run_id, dict(obj), artifact_file)
        elif isinstance(obj, str):
            self.client.log_text(self.run_id, obj, artifact_file)
        else:
            raise TypeError(f"cannot store a {type(obj).__name__} as the artifact '{artifact_file}'")

    def finish(self, failed: bool = False) -> None:
        """Close the run as ``FINISHED`` (or ``FAILED``)."""
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
