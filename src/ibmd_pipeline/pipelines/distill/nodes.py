"""Nodes of the ``distill`` pipeline: parameters in, a student checkpoint, curves and a preview out.

Only corrupted images enter (``corrupted_train``: xT and, for inpainting, the mask). The
preview grid shows the images that distillation held out for validation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.data.stream import StreamedPairs, is_streamed
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.trainer import distill_student, split_held_out
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import EngineConfig, configure_threads, select_device
from ibmd_pipeline.pipelines.common import make_image_grid
from ibmd_pipeline.teacher.model import teacher_from_checkpoint

logger = logging.getLogger(__name__)

Bundle = dict[str, Any]
#: Enlarge grid tiles to at least this many pixels so that 32x32 images stay legible.
GRID_MIN_TILE = 128


def _engine_device(engine: dict[str, Any]) -> str:
    """Check ``params:engine``, set the CPU threads, and return the device name to train on."""
    config = parse_config(EngineConfig, engine, "engine")  # an unusable device fails here
    configure_threads(config.num_threads, key="engine.num_threads")
    return config.device


def _corrupted_data(
    corrupted_train: Bundle, task_kind: str
) -> tuple[torch.Tensor | StreamedPairs, torch.Tensor | None]:
    """The corrupted images and mask of a corrupted-only bundle, refusing anything with targets.

    A streamed bundle gives a reader of corrupted images only (masks come with its items).
    """
    forbidden = sorted(key for key in ("clean", "labels") if key in corrupted_train)
    if forbidden:
        raise ValueError(
            f"distillation takes corrupted images only, but its input carries {forbidden}: pass "
            "corrupted_train (the degrade pipeline's corrupted-only bundle), not a pairs_* bundle"
        )
    bundle_task = (corrupted_train.get("task") or {}).get("kind")
    if bundle_task is not None and bundle_task != task_kind:
        raise ConfigError(
            "task.kind",
            f"is '{task_kind}', but corrupted_train was made for '{bundle_task}'; "
            "re-run the degrade pipeline",
        )
    if is_streamed(corrupted_train):
        return StreamedPairs(corrupted_train, targets=False), None
    return corrupted_train["corrupted"].float(), corrupted_train.get("mask")


def distill_node(
    corrupted_train: Bundle,
    teacher_model: dict[str, Any],
    distill: dict[str, Any],
    task: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, Any]:
    """Distil ``teacher_model`` with IBMD on the corrupted training images; returns the student.

    Parameters are validated and the teacher is checked against the data (task, image size,
    channels) before any training starts.
    """
    config = parse_distill_config(distill, "distill")
    task_config = parse_config(TaskConfig, task, "task")
    device = _engine_device(engine)
    corrupted, mask = _corrupted_data(corrupted_train, task_config.kind)
    return distill_student(
        corrupted, teacher_model, config, mask=mask, task_kind=task_config.kind, device=device
    )


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(record["step"], record[key]) for record in history if key in record and "step" in record]
    return [p[0] for p in points], [p[1] for p in points]


def plot_distill_curves(student_model: dict[str, Any]) -> Figure:
    """Both losses and the validation signal against generator updates.

    Panels: generator loss (with its teacher and fake terms), auxiliary loss, the gap to the
    many-step teacher (energy distance on held-out corrupted images: the student at each
    validated step count, the teacher at NFE 1 and at the student's budget, and the teacher
    against itself, about 0), and the per-pixel std over draws (student vs teacher).
    """
    history = list(student_model.get("history", []))
    validation = student_model["config"]["distill"]["validation"]
    k = validation["teacher_nfe"]
    # A bare Figure (no pyplot): no global backend state, nothing left open after saving.
    figure = Figure(figsize=(11, 7.5))
    axes = figure.subplots(2, 2)
    (ax_gen, ax_aux), (ax_gap, ax_std) = axes

    ax_gen.plot(*_series(history, "loss/generator"), label="generator loss (teacher - fake)")
    ax_gen.set_title("generator update")
    ax_gen.axhline(0.0, color="gray", lw=0.8)
    ax_terms = ax_gen.twinx()
    ax_terms.plot(*_series(history, "term/teacher"), color="tab:orange", alpha=0.6, label="teacher term")
    ax_terms.plot(*_series(history, "term/fake"), color="tab:green", alpha=0.6, label="fake term")
    ax_gen.legend(loc="upper left", fontsize=8)
    ax_terms.legend(loc="upper right", fontsize=8)

    ax_aux.plot(*_series(history, "loss/aux"), color="tab:red", label="auxiliary (fake) bridge loss")
    ax_aux.set_title("auxiliary updates (mean of L per step)")
    ax_aux.legend(fontsize=8)

    keys = sorted({key for record in history for key in record if key.startswith("val/gap/")})
    for key in (key for key in keys if key.startswith("val/gap/student")):
        steps = key.rpartition("nfe")[2]
        label = f"student NFE {steps} ({'raw weights' if '_raw_' in key else 'EMA'})"
        ax_gap.plot(*_series(history, key), marker=".", label=label)
    prefix = "val/gap/teacher_nfe"
    teacher_nfes = sorted(int(key.removeprefix(prefix)) for key in keys if key.startswith(prefix))
    shades = ["black", "dimgray", "darkgray", "silver"]
    for index, nfe in enumerate(teacher_nfes):
        _, values = _series(history, f"val/gap/teacher_nfe{nfe}")
        ax_gap.axhline(
            values[-1], color=shades[min(index, len(shades) - 1)], ls="--", lw=1, label=f"teacher NFE {nfe}"
        )
    _, values = _series(history, "val/gap/teacher_self")
    if values:
        ax_gap.axhline(values[-1], color="gray", ls=":", lw=1, label=f"teacher NFE {k} vs itself")
    ax_gap.set_title(f"energy distance to teacher NFE {k} (held-out corrupted images)")
    ax_gap.set_xlabel("generator updates")
    ax_gap.legend(fontsize=8)

    ax_std.plot(*_series(history, "val/std/student"), marker=".", label="student")
    steps, values = _series(history, "val/std/teacher")
    if values:
        ax_std.axhline(values[-1], color="black", ls="--", lw=1, label=f"teacher NFE {k}")
    ax_std.set_title("diversity: per-pixel std over draws of one image")
    ax_std.set_xlabel("generator updates")
    ax_std.legend(fontsize=8)

    for ax in (ax_gen, ax_aux):
        ax.set_xlabel("generator updates")
    nfe = student_model["config"]["generator"]["nfe"]
    updates = student_model.get("step", 0)
    figure.suptitle(f"IBMD distillation (student NFE {nfe}, {updates} generator updates)")
    figure.tight_layout()
    return figure


def make_distill_grid(
    student_model: dict[str, Any],
    teacher_model: dict[str, Any],
    corrupted_train: Bundle,
    engine: dict[str, Any],
) -> Image.Image:
    """Preview on held-out corrupted images: corrupted | teacher NFE 1 | student | teacher NFE K.

    The held-out images and K are those the student was validated with (its checkpoint's
    ``distill.validation``); no clean image is shown, since distillation has none.
    """
    task_kind = student_model["config"]["task"]["kind"]
    corrupted, mask = _corrupted_data(corrupted_train, task_kind)
    device = select_device(_engine_device(engine))
    validation = student_model["config"]["distill"]["validation"]
    _, _, val_xT, val_mask = split_held_out(corrupted, mask, int(validation["batch_size"]))
    size, channels = int(val_xT.shape[-1]), int(val_xT.shape[1])
    student = student_from_checkpoint(
        student_model, device=device, task_kind=task_kind, image_size=size, channels=channels
    )
    teacher = teacher_from_checkpoint(
        teacher_model,
        use_ema=student_model["config"]["distill"].get("use_teacher_ema", True),
        device=device,
        task_kind=task_kind,
        image_size=size,
        channels=channels,
    )
    trained_with = student_model["config"].get("teacher_version")
    if trained_with is not None and teacher.version is not None and trained_with != teacher.version:
        logger.warning(
            "the student was distilled from teacher version %s, the grid compares it with version %s",
            trained_with,
            teacher.version,
        )
    rows = int(validation["grid_examples"])
    xT = val_xT[:rows].to(device)
    hole = None if val_mask is None else val_mask[:rows].to(device)

    def seeded() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(validation["seed"]))

    with torch.no_grad():
        teacher_one = sample(teacher.predictor, xT, teacher.schedule, 1, mask=hole, generator=seeded())
        many = int(validation["teacher_nfe"])
        teacher_many = sample(teacher.predictor, xT, teacher.schedule, many, mask=hole, generator=seeded())
    restored = student.sample(xT, mask=hole, generator=seeded())
    scale = max(1, GRID_MIN_TILE // size)
    titles = ["corrupted", "teacher NFE 1", f"student NFE {student.nfe}", f"teacher NFE {many}"]
    return make_image_grid([xT, teacher_one, restored, teacher_many], nrow=rows, scale=scale, titles=titles)
