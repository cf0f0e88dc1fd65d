"""What the project adds to a kedro-mlflow run: training curves, evaluation metrics, report
artefacts and Airflow tags.

kedro-mlflow opens and closes the MLflow run of each Kedro run and logs its parameters; the
project's outputs need more than its catalog datasets offer (the curves live inside the
checkpoints, the metrics inside ``metrics.json``). Two halves:

* pure functions that turn the project's objects into what MLflow stores: the evaluation report
  into metric names such as ``student_nfe1/fid`` (:func:`evaluation_metrics`), a trainer's
  ``history`` into stepped metrics (:func:`history_metrics`), Airflow's task context into tags
  (:func:`airflow_tags`);
* :class:`MlflowRun`, which writes them into one run through ``MlflowClient`` with the run's id
  (not the process-wide "active run"), so that a run opened by kedro-mlflow receives them from
  any thread.

MLflow is imported only when something is logged: with tracking off, importing this module costs
nothing and needs no MLflow installed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TRACKING_REQUIREMENTS",
    "MlflowRun",
    "SteppedMetric",
    "TrackingMissingError",
    "airflow_tags",
    "evaluation_metrics",
    "history_metrics",
    "offline_mlflow_environment",
]

#: What ``tracking.enabled`` needs installed: the MLflow client and the Kedro plugin, which is
#: installed without its declared dependencies (they would replace the client by the full
#: ``mlflow`` and its server; ``pip install -e ".[tracking]"`` brings those for ``kedro mlflow ui``).
TRACKING_REQUIREMENTS = "pip install mlflow-skinny==3.17.2 && pip install --no-deps kedro-mlflow==2.0.3"

# MLflow's batch limit per request: at most 1000 metrics.
_METRICS_PER_BATCH = 1000

# Characters MLflow accepts in parameter, metric and tag names.
_BAD_NAME_CHARS = re.compile(r"[^\w\-./ :]")

# Record fields that identify a row of the report rather than measure it.
_RECORD_IDENTITY = ("model", "nfe", "seed")


class TrackingMissingError(ImportError):
    """``tracking.enabled`` is true but kedro-mlflow or MLflow cannot be imported."""


def offline_mlflow_environment(environ: MutableMapping[str, str]) -> None:
    """Defaults that keep a tracked run off the network and on a local folder store.

    MLflow 3 reports usage over the network unless ``MLFLOW_DISABLE_TELEMETRY`` is set, and
    since 3.13 it refuses a file store (what ``conf/base/mlflow.yml`` names) unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set. Values the user set are kept.
    """
    environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


# ------------------------------------------------------------------------------------ pure


def _clean_name(name: str) -> str:
    return _BAD_NAME_CHARS.sub("_", name)


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
    ``corrupted_input/<metric>``, the classifier's frame of the CA ``classifier/<key>``. The steps
    each model trained (after the run's time budget, which may plan fewer than the logged
    parameters say) are ``teacher/trained_steps`` and ``student/trained_steps``.
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
    models = report.get("models")
    # what ran, after any time budget (the logged parameters hold the configured steps)
    if isinstance(models, Mapping):
        for model in ("teacher", "student"):
            facts = models.get(model)
            if isinstance(facts, Mapping):
                put(f"{model}/trained_steps", facts.get("trained_steps"))
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


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowRun:
    """Writes into one existing MLflow run (kedro-mlflow's) through ``client`` and its run id."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

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
