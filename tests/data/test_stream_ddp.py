"""Teacher training and distillation over streamed images on 2 Gloo processes match one process
on the same global batch.

Each rank's ``StepBatches`` reads its part of every global batch from the image files (with a
reader worker), so this checks the streamed sharding end to end: the same images reach the
same updates as in one process reading the whole global batch. The teacher, which otherwise
draws times and noise from a stream per rank, is run with ``train.global_batch_size``: its
draws then belong to the global batch, so both runs see the same ones and only the data-parallel
arithmetic and the streamed sharding remain to compare. As in
``tests/engine/test_ddp_training.py`` the runs are in float64 and the tolerances come from the
arithmetic (``tests/numerics.py``): the longest reduction is a convolution's weight gradient over
``global batch * H * W`` terms; AdamW turns a gradient difference of ``N u`` (clipped to norm 1)
into at most ``lr N u / eps`` per update.

With ``train.global_batch_size`` the streamed readers deliver each rank's rows of the global batch,
fed in micro-batches: one process accumulating two micro-batches of 4 trains the teacher and the
student of one process reading the whole batch of 8, within the same bounds (no spawn).
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
GLOBAL = PER_RANK_BATCH * WORLD
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


def _teacher_params(batch_size: int) -> dict[str, Any]:
    return {
        "model": {"network": {"preset": "tiny"}},
        "train": {"steps": STEPS, "batch_size": batch_size, "global_batch_size": GLOBAL, "lr": LR,
                  "log_every": 1, "bf16": False, "grad_clip": GRAD_CLIP},
        "validation": {"every": 0, "batch_size": 2},
        "distributed": {"backend": "gloo"},
    }  # fmt: skip


def _train_streamed_teacher(bundles: dict[str, Any], config) -> dict[str, Any]:
    """Train the teacher on the streamed bundles in float64 (in this process or as one rank)."""
    with default_dtype(DTYPE, threads=1):
        trained, _ = train_teacher(
            config, bundles["train"], bundles["val"], task=TASK, device="cpu", progress=False
        )
        return trained


def _ranks(teacher_args: tuple, distill_args: tuple) -> dict[str, Any]:
    """One rank of both 2-process runs: the streamed teacher, then the distillation (one spawn)."""
    return {"teacher": _train_streamed_teacher(*teacher_args), "student": _distill(*distill_args)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Streamed teacher training (global batch 8) and distillation from a fixed teacher, each on
    2 Gloo ranks x 4 images (one spawn for both) and in one process reading all 8."""
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
    pairs = {split: bundles[split] for split in ("train", "val")}
    ddp_config = parse_distill_config(_distill_params(PER_RANK_BATCH))
    ddp_teacher_config = parse_teacher_config(_teacher_params(PER_RANK_BATCH), seed=0)
    ddp = launch_local(
        _ranks,
        WORLD,
        ((pairs, ddp_teacher_config), (corrupted, teacher, ddp_config)),
        ddp_config.distributed,
    )
    single = _distill(corrupted, teacher, parse_distill_config(_distill_params(PER_RANK_BATCH * WORLD)))
    single_teacher = _train_streamed_teacher(pairs, parse_teacher_config(_teacher_params(GLOBAL), seed=0))
    return {
        "ddp": ddp["student"], "single": single, "teacher": teacher,
        "ddp_teacher": ddp["teacher"], "single_teacher": single_teacher,
    }  # fmt: skip


def assert_same_training(
    a: dict[str, Any],
    b: dict[str, Any],
    updates: dict[str, int],
    losses: tuple[str, ...],
    start: dict[str, Any],
) -> None:
    """``a`` and ``b`` trained the same steps up to float64 rounding; ``start``: the weights ``b``'s
    first model started from, which it must have left far behind (the check is not vacuous)."""
    assert a["step"] == b["step"]
    weight_atol = {n: adam_weight_atol(k, LR, TERMS, DTYPE, grad_bound=GRAD_CLIP) for n, k in updates.items()}
    for name in updates:
        for key, value in b["models"][name].items():
            assert value.dtype == DTYPE, key
            torch.testing.assert_close(a["models"][name][key], value, atol=weight_atol[name], rtol=0, msg=key)
        first = f"grad_norm/{name}"
        assert math.isclose(
            a["history"][0][first], b["history"][0][first], rel_tol=sum_rtol(TERMS, DTYPE), abs_tol=0
        )
    name = next(iter(updates))
    parameters = sum(v.numel() for v in b["models"][name].values() if v.is_floating_point())
    for a_record, b_record in zip(a["history"], b["history"], strict=True):
        gradient = max(b_record.get(f"grad_norm/{n}", 0.0) for n in updates)
        for key in losses:
            bound = loss_atol(b_record[key], gradient, parameters, max(weight_atol.values()), TERMS, DTYPE)
            assert abs(a_record[key] - b_record[key]) <= bound, (key, a_record[key], b_record[key], bound)
    trained = b["models"][name]
    shared = [k for k in trained if k in start and trained[k].shape == start[k].shape]
    moved = max(float((trained[k] - start[k]).abs().max()) for k in shared)
    assert moved > 1e4 * max(weight_atol.values())


def test_streamed_distillation_on_two_processes_matches_one(runs) -> None:
    assert runs["ddp"]["step"] == runs["single"]["step"] == STEPS
    assert_same_training(runs["ddp"], runs["single"], UPDATES, LOSSES, runs["teacher"]["ema"]["model"])


def test_streamed_teacher_on_two_processes_matches_one(runs) -> None:
    ddp, single = runs["ddp_teacher"], runs["single_teacher"]
    assert ddp["step"] == single["step"] == STEPS
    assert_same_training(ddp, single, {"model": STEPS}, ("loss",), single["ema"]["model"])
    atol = adam_weight_atol(STEPS, LR, TERMS, DTYPE, grad_bound=GRAD_CLIP)
    for key, value in single["ema"]["model"].items():
        torch.testing.assert_close(ddp["ema"]["model"][key], value, atol=atol, rtol=0, msg=key)


def test_parity_tolerance_sits_far_below_one_update() -> None:
    """A batch of other images moves the weights by about ``lr`` per update; the bound is far below."""
    assert adam_weight_atol(STEPS * AUX_STEPS, LR, TERMS, DTYPE, grad_bound=GRAD_CLIP) < 1e-3 * LR


# --------------------------------------------------------------------------- gradient accumulation


def _teacher(bundles: dict[str, Any], batch_size: int) -> dict[str, Any]:
    return _train_streamed_teacher(bundles, parse_teacher_config(_teacher_params(batch_size), seed=0))


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> dict[str, Any]:
    """Streamed teacher and distillation runs with ``train.global_batch_size`` 8: one process reading
    micro-batches of 4 (two per update) and one reading the whole batch of 8 (no spawn)."""
    root = write_imagenet_layout(tmp_path_factory.mktemp("images"), 24)
    bundles = build_pair_bundles(data_config(root, True, workers=1), TaskConfig(**TASK), seed=0)
    runs = {f"teacher_{b}": _teacher(bundles, b) for b in (PER_RANK_BATCH, GLOBAL)}
    corrupted = corrupted_only(bundles["train"])
    for batch_size in (PER_RANK_BATCH, GLOBAL):
        params = _distill_params(batch_size)
        params["train"]["global_batch_size"] = GLOBAL
        runs[f"distill_{batch_size}"] = _distill(corrupted, runs["teacher_8"], parse_distill_config(params))
    return runs


def test_streamed_micro_batches_train_the_teacher_of_the_whole_batch(accumulated) -> None:
    full, micro = accumulated[f"teacher_{GLOBAL}"], accumulated[f"teacher_{PER_RANK_BATCH}"]
    assert_same_training(micro, full, {"model": STEPS}, ("loss",), full["ema"]["model"])


def test_streamed_micro_batches_distil_the_student_of_the_whole_batch(accumulated) -> None:
    start = accumulated[f"teacher_{GLOBAL}"]["ema"]["model"]
    full, micro = accumulated[f"distill_{GLOBAL}"], accumulated[f"distill_{PER_RANK_BATCH}"]
    assert_same_training(micro, full, UPDATES, LOSSES, start)
