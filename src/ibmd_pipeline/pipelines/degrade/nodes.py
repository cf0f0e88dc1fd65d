"""Nodes of the ``degrade`` pipeline: parameters in, pair bundles and a preview grid out."""

from __future__ import annotations

from typing import Any

from PIL import Image

from ibmd_pipeline.data import DataConfig, build_pair_bundles, check_seed, corrupted_only
from ibmd_pipeline.data.stream import in_memory_head
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.pipelines.common import make_image_grid, mask_to_image

GRID_EXAMPLES = 8
#: Enlarge grid tiles to at least this many pixels so that 32x32 images stay legible.
GRID_MIN_TILE = 128

Bundle = dict[str, Any]


def make_pairs(data: dict[str, Any], task: dict[str, Any], seed: int) -> tuple[Bundle, Bundle, Bundle]:
    """Load the configured images, split them and degrade each split into clean/corrupted pairs.

    All parameters are validated before any image is read, so a bad value fails in seconds and
    the pipeline writes nothing.
    """
    data_config = parse_config(DataConfig, data, "data")
    task_config = parse_config(TaskConfig, task, "task")
    bundles = build_pair_bundles(data_config, task_config, check_seed(seed))
    return bundles["train"], bundles["val"], bundles["test"]


def make_corrupted_train(pairs_train: Bundle) -> Bundle:
    """The training split with its clean images and labels removed (all that IBMD may see)."""
    return corrupted_only(pairs_train)


def make_degrade_grid(pairs: Bundle) -> Image.Image:
    """A preview: clean | corrupted (| mask) for the first few examples of ``pairs``."""
    pairs = in_memory_head(pairs, GRID_EXAMPLES)
    columns, titles = [pairs["clean"], pairs["corrupted"]], ["clean", "corrupted"]
    if "mask" in pairs:
        columns.append(mask_to_image(pairs["mask"]))
        titles.append("mask (white: missing)")
    scale = max(1, GRID_MIN_TILE // int(pairs["clean"].shape[-1]))
    return make_image_grid(columns, nrow=GRID_EXAMPLES, scale=scale, titles=titles)
