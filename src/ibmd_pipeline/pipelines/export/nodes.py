"""Nodes of the ``export`` pipelines: a student checkpoint in, a verified exported model out."""

from __future__ import annotations

import logging
from typing import Any

from ibmd_pipeline.deploy.export import (
    ExportConfig,
    ExportedOnnx,
    ExportedStudent,
    export_onnx,
    export_torchscript,
)
from ibmd_pipeline.engine.config import parse_config

logger = logging.getLogger(__name__)


def _describe(what: str, exported: ExportedStudent | ExportedOnnx) -> None:
    meta = exported.metadata
    logger.info(
        "exported the student (%s weights, task %s, %dx%dx%d, NFE %d, inputs %s) to %s",
        meta.weights,
        meta.task_kind,
        meta.channels,
        meta.image_size,
        meta.image_size,
        meta.nfe,
        ", ".join(meta.inputs()),
        what,
    )


def export_student(student_model: dict[str, Any], export: dict[str, Any]) -> ExportedStudent:
    """TorchScript export of the student's generator, checked against the eager model.

    ``params:export`` is validated first; a checkpoint that is not a student's fails with
    ``CheckpointMismatchError``.
    """
    config = parse_config(ExportConfig, export, "export")
    exported = export_torchscript(student_model, config)
    _describe("TorchScript", exported)
    return exported


def export_student_onnx(student_model: dict[str, Any], export: dict[str, Any]) -> ExportedOnnx:
    """ONNX export of the student's generator (needs ``onnx`` and ``onnxscript`` installed)."""
    config = parse_config(ExportConfig, export, "export")
    exported = export_onnx(student_model, config)
    _describe("ONNX", exported)
    return exported
