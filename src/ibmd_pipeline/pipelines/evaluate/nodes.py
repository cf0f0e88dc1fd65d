"""Nodes of the ``evaluate`` pipelines: parameters in; references, metrics, table, plot and grid out.

``evaluate_reference`` computes what does not depend on the models (the CA classifier and the
Inception reference) once; ``evaluate_teacher`` measures the teacher, which does not change
between students; ``evaluate_models`` loads the latest cached ones, checks that they belong to
the test data, the teacher and the settings, and scores the student against them.
"""

from __future__ import annotations

import logging
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.data.stream import in_memory_head
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import configure_threads, select_device
from ibmd_pipeline.evaluation import (
    compute_fid_reference,
    evaluate_teacher,
    grid_columns,
    metrics_table,
    parse_evaluate_config,
    plot_report,
    run_evaluation,
    train_reference_classifier,
)
from ibmd_pipeline.pipelines.common import make_image_grid

logger = logging.getLogger(__name__)

Bundle = dict[str, Any]
#: Enlarge grid tiles to at least this many pixels so that 32x32 images stay legible.
GRID_MIN_TILE = 128
_ENGINE_KEYS = ("device", "num_threads")


def _engine_device(engine: dict[str, Any] | None) -> str:
    """Check ``params:engine``, set the CPU threads, and return the device to evaluate on."""
    unknown = sorted(set(engine or {}) - set(_ENGINE_KEYS))
    if unknown:
        raise ConfigError(f"engine.{unknown[0]}", f"unknown setting; allowed keys: {', '.join(_ENGINE_KEYS)}")
    device = select_device((engine or {}).get("device", "auto"), key="engine.device")
    configure_threads((engine or {}).get("num_threads", 0), key="engine.num_threads")
    return str(device)


def _check_task(pairs_test: Bundle, task: dict[str, Any]) -> None:
    """The configured task must be the one the test pairs were made for."""
    configured = parse_config(TaskConfig, task, "task").kind
    made_for = (pairs_test.get("task") or {}).get("kind")
    if made_for is not None and made_for != configured:
        raise ConfigError(
            "task.kind",
            f"is '{configured}', but pairs_test was made for '{made_for}'; re-run the degrade pipeline",
        )


def _in_memory(pairs_test: Bundle, pairs_train: Bundle | None, config: Any) -> tuple[Bundle, Bundle | None]:
    """Streamed splits read into memory, only as many images as the evaluation uses: the test
    images it scores, and the training images of the references (``fid.reference_images``, at
    least ``num_images``; they also train the CA classifier). In-memory bundles pass unchanged."""
    train_images = max(config.num_images, config.fid.reference_images or 0)
    train = None if pairs_train is None else in_memory_head(pairs_train, train_images)
    return in_memory_head(pairs_test, config.num_images), train


def _dataset_name(data: dict[str, Any] | None) -> str:
    data = data or {}
    source = data.get("source", "embedded")
    return f"{source} ({data['path']})" if data.get("path") else str(source)


def train_classifier_node(
    pairs_train: Bundle, pairs_test: Bundle, evaluate: dict[str, Any], engine: dict[str, Any]
) -> dict[str, Any]:
    """Train the CA classifier on the clean training split (its clean-test accuracy inside)."""
    config = parse_evaluate_config(evaluate)
    _engine_device(engine)  # the classifier trains on the CPU; this sets the thread count
    pairs_test, pairs_train = _in_memory(pairs_test, pairs_train, config)
    return train_reference_classifier(pairs_train, pairs_test, config, progress=True)


def fid_reference_node(
    pairs_test: Bundle, pairs_train: Bundle, evaluate: dict[str, Any], engine: dict[str, Any]
) -> Bundle:
    """Inception features of the reference's clean images (by default training images that no
    model restores), with the fingerprints of those images and of the test split."""
    config = parse_evaluate_config(evaluate)
    pairs_test, pairs_train = _in_memory(pairs_test, pairs_train, config)
    return compute_fid_reference(pairs_test, config, device=_engine_device(engine), pairs_train=pairs_train)


def evaluate_teacher_node(
    pairs_test: Bundle,
    teacher_model: dict[str, Any],
    classifier_model: dict[str, Any],
    fid_reference_stats: Bundle,
    evaluate: dict[str, Any],
    task: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, Any]:
    """The teacher (and the corrupted input) restored and measured at every NFE and seed, for
    ``evaluate_models`` to reuse with every student of this teacher."""
    config = parse_evaluate_config(evaluate)
    _check_task(pairs_test, task)
    pairs_test, _ = _in_memory(pairs_test, None, config)
    return evaluate_teacher(
        pairs_test,
        teacher_model,
        config,
        fid_reference=fid_reference_stats,
        classifier=classifier_model,
        device=_engine_device(engine),
    )


def evaluate_models_node(
    pairs_test: Bundle,
    teacher_model: dict[str, Any],
    student_model: dict[str, Any],
    classifier_model: dict[str, Any],
    fid_reference_stats: Bundle,
    teacher_evaluation: dict[str, Any],
    evaluate: dict[str, Any],
    data: dict[str, Any],
    task: dict[str, Any],
    engine: dict[str, Any],
) -> tuple[dict[str, Any], Image.Image]:
    """Score the student against the cached teacher evaluation on the same test images and
    seeds, and time every model together; returns the metrics report and the titled sample grid
    (corrupted | teacher at each NFE | student at each NFE | clean).

    Settings, checkpoints (task, image size, channels), the cached references and the cached
    teacher evaluation are all checked before any sampling starts.
    """
    config = parse_evaluate_config(evaluate)
    _check_task(pairs_test, task)
    pairs_test, _ = _in_memory(pairs_test, None, config)
    device = _engine_device(engine)
    result = run_evaluation(
        pairs_test,
        teacher_model,
        student_model,
        config,
        fid_reference=fid_reference_stats,
        classifier=classifier_model,
        device=device,
        dataset=_dataset_name(data),
        teacher_evaluation=teacher_evaluation,
    )
    columns = grid_columns(result.report, result.samples)
    logger.info("evaluate_grid columns: %s", " | ".join(title for title, _ in columns))
    scale = max(1, GRID_MIN_TILE // int(pairs_test["clean"].shape[-1]))
    grid = make_image_grid(
        [images for _, images in columns], scale=scale, titles=[title for title, _ in columns]
    )
    return result.report, grid


def make_metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as markdown tables with intervals and verdicts."""
    return metrics_table(metrics)


def plot_metrics(metrics: dict[str, Any]) -> Figure:
    """FID, KID, classifier FD and CA against NFE, KID against PSNR and against seconds per image."""
    return plot_report(metrics)
