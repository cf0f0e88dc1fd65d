"""Student snapshots during one distillation (``distill_student(snapshot_steps=..., on_snapshot=...)``):
quality against training length from a single run, as ``benchmarks/run_benchmarks.py`` reports it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.trainer import distill_student


def config(steps: int, **overrides: Any):
    mapping = {
        "train": {"steps": steps, "batch_size": 3, "log_every": 1},
        "aux_steps": 2,
        "lr_generator": 1e-3,  # constant schedule, no warm-up: a shorter run is a prefix of a longer one
        "validation": {
            "every": 2, "batch_size": 3, "draws": 4, "teacher_nfe": 4, "reference_nfes": [1],
            "grid_examples": 2,
        },
        **overrides,
    }
    return parse_distill_config(mapping)


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    for group in ("models", "ema"):
        assert a[group].keys() == b[group].keys()
        for name, weights in a[group].items():
            for key, value in weights.items():
                assert torch.equal(value, b[group][name][key]), f"{group}.{name}.{key}"


def test_snapshots_are_the_students_of_shorter_runs_and_the_last_is_the_result(
    teacher_checkpoint, corrupted_images
):
    xT, _ = corrupted_images(count=16)
    teacher = teacher_checkpoint()
    taken: dict[int, dict[str, Any]] = {}

    def keep(updates: int, checkpoint: dict[str, Any]) -> None:
        assert updates not in taken
        taken[updates] = checkpoint

    final = distill_student(
        xT, teacher, config(4), device="cpu", progress=False, snapshot_steps=[2, 4], on_snapshot=keep
    )
    assert sorted(taken) == [2, 4]
    assert [taken[n]["step"] for n in (2, 4)] == [2, 4] and final["step"] == 4
    assert_same_weights(taken[4], final)
    shorter = distill_student(xT, teacher, config(2), device="cpu", progress=False)
    assert_same_weights(taken[2], shorter)
    # copies, not views of the training state: the first snapshot did not move on with training
    ema_final = final["ema"]["generator"]
    assert any(not torch.equal(v, ema_final[k]) for k, v in taken[2]["ema"]["generator"].items())
    student = student_from_checkpoint(taken[2], task_kind="sr4x_bicubic", image_size=16, channels=1)
    restored = student.sample(xT[:2], generator=torch.Generator().manual_seed(0))
    assert restored.shape == (2, 1, 16, 16) and torch.isfinite(restored).all()


@pytest.mark.parametrize(
    ("steps", "callback", "message"),
    [
        ([0, 2], True, r"\[0\] are not generator update counts in \[1, train.steps=3\]"),
        ([4], True, r"\[4\] are not generator update counts"),
        ([2], False, "go together"),
        ([], True, "go together"),
    ],
)
def test_snapshot_arguments_are_checked_before_training(
    teacher_checkpoint, corrupted_images, monkeypatch, steps, callback, message
):
    monkeypatch.setattr("ibmd_pipeline.distill.trainer._train", pytest.fail)
    xT, _ = corrupted_images(count=16)
    with pytest.raises(ValueError, match=message):
        distill_student(
            xT, teacher_checkpoint(), config(3), device="cpu", progress=False,
            snapshot_steps=steps, on_snapshot=(lambda n, c: None) if callback else None,
        )


def test_snapshots_need_a_single_process(teacher_checkpoint, corrupted_images, monkeypatch):
    monkeypatch.setattr("ibmd_pipeline.distill.trainer.run_data_parallel", pytest.fail)
    xT, _ = corrupted_images(count=16)
    with pytest.raises(ValueError, match="single-process"):
        distill_student(
            xT, teacher_checkpoint(), config(3, distributed={"nproc_per_node": 2}), device="cpu",
            snapshot_steps=[1], on_snapshot=lambda n, c: None,
        )
