"""Node of the ``import_teacher`` pipeline: parameters and an official file in, a teacher checkpoint out."""

from __future__ import annotations

import logging
from typing import Any

from ibmd_pipeline.data import DataConfig
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.teacher import task_from_params
from ibmd_pipeline.teacher.importers import import_teacher, parse_import_config

logger = logging.getLogger(__name__)

#: The data conventions each family was trained with (``data.resize``).
TRAINED_RESIZE = {"i2sb": "i2sb", "ddbm": "ddbm"}


def import_teacher_node(
    teacher_import: dict[str, Any], task: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """Import ``teacher_import.checkpoint`` for the task and image shape of ``params:data``.

    Every parameter is validated and the file checked completely before anything is returned,
    so a bad file leaves the catalog untouched.
    """
    config = parse_import_config(teacher_import)
    task_config = task_from_params(task)
    data_config = parse_config(DataConfig, data, "data")
    expected = TRAINED_RESIZE[config.format]
    if data_config.resize != expected:
        logger.warning(
            "data.resize is '%s', but %s teachers were trained on images resized the '%s' way; "
            "set data.resize: %s so the student sees the teacher's inputs",
            data_config.resize, config.format.upper(), expected, expected,
        )
    checkpoint = import_teacher(
        config, task_config, image_size=data_config.image_size, channels=data_config.channels
    )
    source = checkpoint["config"]["teacher"]["import"]
    logger.info(
        "imported the %s teacher %s (sha256 %s..., %s): %s network, bridge %s",
        config.format.upper(), source["checkpoint"], source["sha256"][:12], source["stored_dtype"],
        checkpoint["config"]["unet"], checkpoint["config"]["bridge"],
    )
    return checkpoint
