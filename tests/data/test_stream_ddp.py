"""Distillation over streamed images on 2 Gloo processes matches one process on the same global batch.

Each rank's ``StepBatches`` reads its part of every global batch from the image files (with a
reader worker), so this checks the streamed sharding end to end: the same images reach the
same updates as in one process reading the whole global batch. As in
``tests/engine/test_ddp_training.py`` the runs are in float64 and the tolerances come from the
arithmetic (``tests/numerics.py``): the longest reduction is a convolution's weight gradient over
``global batch * H * W`` terms; AdamW turns a gradient difference of ``N u`` (clipped to norm 1)
into at most ``lr N u / eps`` per update.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from numerics import adam_weight_atol, default_dtype, loss_atol, sum_rtol
from test_stream import data_config, write_imagenet_layout

from ibmd_pipeline.data import build_pair_bundles, corrupted_only
from ibmd_pipeline.data.stream import StreamedPairs
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.launch import launch_local
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

SIZE, WORLD, PER_RANK_BATCH = 16, 2, 4
LR, GRAD_CLIP, STEPS, AUX_STEPS = 1e-3, 1.0, 2, 2
DTYPE = torch.float64
TASK = {"kind": "sr4x_bicubic"}
TERMS = PER_RANK_BATCH * WORLD * SIZE * SIZE
UPDATES = {"generator": STEPS, "aux": STEPS * AUX_STEPS}
LOSSES = ("loss/generator", "loss/aux", "term/teacher", "term/fake")


def _distill_params(batch_size: int) -> dict[str, Any]:
    return {
        "aux_steps": AUX_STEPS, "lr_generator": LR, "lr_aux": LR,
        "train": {"steps": STEPS, "batch_size": batch_size, "log_every": 1, "bf16": False,
                  "checkpoint_every": 0, "grad_clip": GRAD_CLIP},
        "validation": {"every": 0, "batch_size": 4, "draws": 4, "grid_examples": 2, "teacher_nfe": 2,
                       "reference_nfes": [1]},
        "distributed": {"backend": "gloo"},
    }  # fmt: skip


def _distill(bundle: dict[str, Any], teacher: dict[str, Any], config) -> dict[str, Any]:
    """Distil from the streamed bundle in float64 (the reader is built after the dtype is set)."""
    with default_dtype(DTYPE, threads=1):
        images = StreamedPairs(bundle, targets=False)
        return distill_student(images, teacher, config, task_kind=TASK["kind"], device="cpu", progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = write_imagenet_layout(tmp_path_factory.mktemp("images"), 24)
    bundles = build_pair_bundles(data_config(root, True, workers=1), TaskConfig(**TASK), seed=0)
    with default_dtype(DTYPE, threads=1):
        teacher_params = {
            "model": {"network": {"preset": "tiny"}},
            "train": {"steps": 1, "batch_size": 4, "log_every": 1, "bf16": False},
            "validation": {"every": 0, "batch_size": 2},
        }
        teacher, _ = train_teacher(
            parse_teacher_config(teacher_params, seed=0),
            bundles["train"],
            bundles["val"],
            task=TASK,
            device="cpu",
            progress=False,
        )
    corrupted = corrupted_only(bundles["train"])
    ddp_config = parse_distill_config(_distill_params(PER_RANK_BATCH))
    ddp = launch_local(_distill, WORLD, (corrupted, teacher, ddp_config), ddp_config.distributed)
    single = _distill(corrupted, teacher, parse_distill_config(_distill_params(PER_RANK_BATCH * WORLD)))
    return {"ddp": ddp, "single": single, "teacher": teacher}


def test_streamed_distillation_on_two_processes_matches_one(runs) -> None:
    ddp, single = runs["ddp"], runs["single"]
    assert ddp["step"] == single["step"] == STEPS
    weight_atol = {n: adam_weight_atol(k, LR, TERMS, DTYPE, grad_bound=GRAD_CLIP) for n, k in UPDATES.items()}
    for name in UPDATES:
        for key, value in single["models"][name].items():
            assert value.dtype == DTYPE, key
            torch.testing.assert_close(
                ddp["models"][name][key], value, atol=weight_atol[name], rtol=0, msg=key
            )
        first = f"grad_norm/{name}"
        assert math.isclose(
            ddp["history"][0][first], single["history"][0][first], rel_tol=sum_rtol(TERMS, DTYPE), abs_tol=0
        )
    parameters = sum(v.numel() for v in single["models"]["generator"].values() if v.is_floating_point())
    for a, b in zip(ddp["history"], single["history"], strict=True):
        gradient = max(b.get(f"grad_norm/{name}", 0.0) for name in UPDATES)
        for key in LOSSES:
            bound = loss_atol(b[key], gradient, parameters, max(weight_atol.values()), TERMS, DTYPE)
            assert abs(a[key] - b[key]) <= bound, (key, a[key], b[key], bound)
    # The generator moved far beyond the tolerance: the check compares trained weights.
    teacher = runs["teacher"]["ema"]["model"]
    trained = single["models"]["generator"]
    shared = [k for k in trained if k in teacher and trained[k].shape == teacher[k].shape]
    moved = max(float((trained[k] - teacher[k]).abs().max()) for k in shared)
    assert moved > 1e4 * weight_atol["aux"]


def test_parity_tolerance_sits_far_below_one_update() -> None:
    """A batch of other images moves the weights by about ``lr`` per update; the bound is far below."""
    assert adam_weight_atol(STEPS * AUX_STEPS, LR, TERMS, DTYPE, grad_bound=GRAD_CLIP) < 1e-3 * LR
