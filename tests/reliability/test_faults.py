"""Numerical faults in training and checkpoints that do not fit the data.

* A NaN loss stops teacher training with ``NonFiniteLossError`` naming the step and the loss;
  the last good working checkpoint is kept, loads, and a re-run continues from it. With
  ``train.skip_nonfinite`` the poisoned step is skipped and counted instead.
* A teacher checkpoint for another task, image size, channel count or network is refused
  with ``CheckpointMismatchError`` by distillation and evaluation before any work starts.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import ibmd_pipeline.distill.trainer as distill_trainer
import ibmd_pipeline.teacher.trainer as teacher_trainer
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.training import NonFiniteLossError
from ibmd_pipeline.evaluation.config import parse_evaluate_config
from ibmd_pipeline.evaluation.runner import run_evaluation
from ibmd_pipeline.teacher.config import parse_teacher_config
from ibmd_pipeline.teacher.model import CheckpointMismatchError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy.conftest import make_student_checkpoint  # noqa: E402
from distill.conftest import make_corrupted, make_teacher_checkpoint  # noqa: E402
from teacher.conftest import make_bundle, tiny_params  # noqa: E402

STEPS, CHECKPOINT_EVERY, POISONED_STEP = 8, 2, 5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _poison_loss(monkeypatch, at_step: int) -> None:
    """Make the training loss of loop step ``at_step`` NaN (validation losses stay untouched)."""
    original = teacher_trainer.bridge_matching_loss
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        loss = original(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss
        step = calls["train"]
        calls["train"] += 1
        return loss * float("nan") if step == at_step else loss

    monkeypatch.setattr(teacher_trainer, "bridge_matching_loss", poisoned)


def _train(workdir: Path, **train):
    config = parse_teacher_config(
        tiny_params(
            train={"steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1, **train},
            validation={"every": 0},
        )
        | {"workdir": str(workdir)}
    )
    return teacher_trainer.train_teacher(
        config,
        make_bundle("sr4x_bicubic", 16, seed=1),
        make_bundle("sr4x_bicubic", 6, seed=2),
        task={"kind": "sr4x_bicubic"},
        device="cpu",
        progress=False,
    )


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, POISONED_STEP)
    with pytest.raises(NonFiniteLossError) as caught:
        _train(tmp_path)
    err = caught.value
    assert err.step == POISONED_STEP and err.name == "loss" and math.isnan(err.value)
    message = str(err)
    assert f"step {POISONED_STEP}" in message and "loss" in message and "last.pt" in message

    (run_folder,) = tmp_path.glob("run-*")  # one working folder per configuration
    working = load_checkpoint(run_folder / "last.pt")
    # 4: the last one before the fault
    assert working["step"] == POISONED_STEP - POISONED_STEP % CHECKPOINT_EVERY
    for weights in list(working["models"].values()) + [e["shadow"] for e in working["ema"].values()]:
        assert all(torch.isfinite(value).all() for value in weights.values())

    monkeypatch.undo()  # the fault was transient: a re-run continues from the kept checkpoint
    checkpoint, history = _train(tmp_path)
    assert checkpoint["step"] == STEPS
    assert [int(record["step"]) for record in history] == list(range(1, STEPS + 1))


def test_skip_nonfinite_skips_and_counts_the_poisoned_step(tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, POISONED_STEP)
    checkpoint, history = _train(tmp_path, skip_nonfinite=True, max_skipped=2)
    assert checkpoint["step"] == STEPS
    skipped = [record["skipped"] for record in history]
    assert skipped == [0.0] * POISONED_STEP + [1.0] * (STEPS - POISONED_STEP)
    assert "loss" not in history[POISONED_STEP]  # the skipped step logged no loss
    assert all(math.isfinite(record["loss"]) for i, record in enumerate(history) if i != POISONED_STEP)
    for weights in checkpoint["models"].values():
        assert all(torch.isfinite(value).all() for value in weights.values())


def test_skip_nonfinite_stops_beyond_max_skipped(tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, POISONED_STEP)
    with pytest.raises(NonFiniteLossError, match="max_skipped 0"):
        _train(tmp_path, skip_nonfinite=True, max_skipped=0)


# --------------------------------------------------------------------------- mismatches


def _other_network(checkpoint: dict) -> dict:
    """The same config, but weights of a wider network (as if the file came from another run)."""
    wider = make_teacher_checkpoint("sr4x_bicubic")
    for group in ("models", "ema"):
        wider[group]["model"] = {
            key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) if value.ndim else value
            for key, value in wider[group]["model"].items()
        }
    return wider


MISMATCHES = {
    "other task": lambda: make_teacher_checkpoint("jpeg10"),
    "other image size": lambda: make_teacher_checkpoint("sr4x_bicubic", image_size=32),
    "other channels": lambda: make_teacher_checkpoint("sr4x_bicubic", channels=3),
    "other network": lambda: _other_network(make_teacher_checkpoint("sr4x_bicubic")),
    "not a teacher": lambda: make_teacher_checkpoint("sr4x_bicubic") | {"kind": "student"},
}


@pytest.mark.parametrize("make", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_distill_refuses_mismatched_teacher_before_training(make, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started with a mismatched teacher")

    monkeypatch.setattr(distill_trainer, "run_training", must_not_train)
    corrupted, _ = make_corrupted("sr4x_bicubic", 12)
    config = parse_distill_config(
        {"train": {"steps": 2, "batch_size": 4}, "validation": {"every": 0, "batch_size": 4,
                                                                "grid_examples": 2}}
    )
    with pytest.raises(CheckpointMismatchError):
        distill_student(corrupted, make(), config, task_kind="sr4x_bicubic", device="cpu", progress=False)


@pytest.mark.parametrize("make", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_evaluate_refuses_mismatched_teacher_before_sampling(make):
    pairs_test = make_bundle("sr4x_bicubic", 4, seed=3)
    with pytest.raises(CheckpointMismatchError):
        run_evaluation(
            pairs_test,
            make(),
            make_student_checkpoint("sr4x_bicubic"),
            parse_evaluate_config({}),
            fid_reference=None,
            classifier=None,
            device="cpu",
            progress=False,
        )


@pytest.mark.parametrize("use_ema", [True, False])
def test_student_with_weights_of_another_network_is_a_checkpoint_mismatch(use_ema: bool):
    from ibmd_pipeline.distill.student import student_from_checkpoint

    student = make_student_checkpoint("sr4x_bicubic")
    group = "ema" if use_ema else "models"
    student[group]["generator"] = {
        key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) if value.ndim else value
        for key, value in student[group]["generator"].items()
    }
    with pytest.raises(CheckpointMismatchError, match="weights do not fit"):
        student_from_checkpoint(student, use_ema=use_ema, device="cpu")
