"""Nodes of the ``teacher`` pipeline: parameters in, checkpoint, loss plot and sample grid out.

Every node parses and validates all of its parameters before any work, so a bad value fails in
seconds with a message naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.data import check_seed
from ibmd_pipeline.data.stream import in_memory_head, is_streamed
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.engine.devices import EngineConfig, configure_threads, select_device
from ibmd_pipeline.pipelines.common import make_image_grid
from ibmd_pipeline.teacher import (
    TeacherConfig,
    TeacherPlan,
    check_teacher_checkpoint,
    parse_teacher_config,
    plan_teacher,
    plot_loss_curves,
    sample_grid_columns,
    task_from_params,
    teacher_from_checkpoint,
    train_teacher,
)

#: Enlarge grid tiles to at least this many pixels so that 32x32 images stay legible.
GRID_MIN_TILE = 128

Bundle = dict[str, Any]


def _image_shape(bundle: Mapping[str, Any]) -> tuple[int, int]:
    """(image_size, channels) of a pair bundle."""
    if is_streamed(bundle):
        return int(bundle["image_size"]), int(bundle["channels"])
    clean = bundle["clean"] if "clean" in bundle else bundle["corrupted"]
    return int(clean.shape[-1]), int(clean.shape[1])


def _plan(config: TeacherConfig, task: TaskConfig, bundle: Mapping[str, Any]) -> TeacherPlan:
    image_size, channels = _image_shape(bundle)
    return plan_teacher(config, task, image_size=image_size, channels=channels)


def train_teacher_node(
    pairs_train: Bundle,
    pairs_val: Bundle,
    teacher: dict[str, Any],
    task: dict[str, Any],
    engine: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Train the bridge teacher; returns its checkpoint (``teacher.model`` format).

    Runs in this process, or in ``teacher.distributed.nproc_per_node`` local DDP workers
    (``train_teacher`` decides).
    """
    config = parse_teacher_config(teacher, seed=check_seed(seed))
    task_config = task_from_params(task)
    engine_config = parse_config(EngineConfig, engine, "engine")
    _plan(config, task_config, pairs_train)  # network/sampler settings that depend on the data
    configure_threads(engine_config.num_threads)
    checkpoint, _ = train_teacher(
        config, pairs_train, pairs_val, task=task_config, device=engine_config.device
    )
    return checkpoint


def plot_teacher_loss(teacher_model: dict[str, Any]) -> Figure:
    """Training (smoothed) and validation loss of the teacher against the step."""
    task = teacher_model.get("config", {}).get("task", {}).get("kind", "?")
    return plot_loss_curves(teacher_model.get("history", []), title=f"teacher ({task})")


def make_teacher_grid(
    teacher_model: dict[str, Any], pairs_val: Bundle, teacher: dict[str, Any], engine: dict[str, Any]
) -> Image.Image:
    """Rows of validation examples: corrupted | teacher at each ``sampler.grid_nfe`` | clean.

    Uses the EMA weights. The checkpoint must be the teacher the current parameters describe
    (else :class:`~ibmd_pipeline.teacher.CheckpointMismatchError`).
    """
    config = parse_teacher_config(teacher)
    engine_config = parse_config(EngineConfig, engine, "engine")
    task = task_from_params(pairs_val.get("task") or teacher_model["config"]["task"], "pairs_val.task")
    plan = _plan(config, task, pairs_val)
    check_teacher_checkpoint(teacher_model, plan)
    configure_threads(engine_config.num_threads)
    device = select_device(engine_config.device)
    loaded = teacher_from_checkpoint(
        teacher_model, device=device, task_kind=task.kind, image_size=plan.image_size, channels=plan.channels
    )
    # The training seed also seeds the sampler, so a grid is reproducible from its checkpoint.
    seed = int(teacher_model["config"].get("teacher", {}).get("train", {}).get("seed", 0))
    columns = sample_grid_columns(
        loaded.predictor,
        loaded.schedule,
        in_memory_head(pairs_val, config.sampler.n_examples),
        nfes=config.sampler.grid_nfe,
        mode=config.sampler.mode,
        n_examples=config.sampler.n_examples,
        seed=seed,
        device=device,
    )
    titles = ["corrupted", *(f"teacher NFE {nfe}" for nfe in config.sampler.grid_nfe), "clean"]
    return make_image_grid(columns, scale=max(1, GRID_MIN_TILE // plan.image_size), titles=titles)
