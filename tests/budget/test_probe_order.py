"""The probe times the teacher step at its start and again at its end and keeps the faster: a
fresh process's first steps can be slow for a while (right after set-up's disk writes the first
teacher timing of a default run came out 25-50% above the run's steps). Scripted timings, never a
timed test."""

from __future__ import annotations

from typing import Any

import pytest

import ibmd_pipeline.budget.probe as probe

PARAMS = {
    "engine": {"device": "cpu", "num_threads": 1},
    "task": {"kind": "sr4x_bicubic"},
    "data": {"image_size": 16, "channels": 1},
    "teacher": {"model": {"network": {"preset": "tiny"}}, "train": {"batch_size": 4, "bf16": True}},
    "distill": {"train": {"batch_size": 4, "bf16": True}, "validation": {"batch_size": 4}},
    "evaluate": {"batch_size": 4},
}


class Timed:
    """A stand-in step that names what it times."""

    def __init__(self, kind: str, precision: str) -> None:
        self.kind, self.precision = kind, precision

    def __call__(self) -> None:  # pragma: no cover - the scripted timer never calls it
        raise AssertionError("not called")


@pytest.fixture
def scripted(monkeypatch) -> dict[tuple[str, str], list[float]]:
    """Seconds each (kind, precision) step will be timed at, in call order."""
    script: dict[tuple[str, str], list[float]] = {}
    monkeypatch.setattr(
        probe, "teacher_step_call", lambda checkpoint, config, *a: Timed("teacher", config.cpu_bf16)
    )
    monkeypatch.setattr(
        probe, "ibmd_update_call", lambda checkpoint, config, *a: Timed("distill", config.cpu_bf16)
    )

    def median_seconds(step: Any, repeats: int, device: Any) -> float:
        if isinstance(step, Timed):
            return script[(step.kind, step.precision)].pop(0)
        return 0.01  # network evaluations

    monkeypatch.setattr(probe, "_median_seconds", median_seconds)
    return script


def test_the_teacher_is_timed_at_both_ends_of_the_probe_and_the_faster_kept(scripted, monkeypatch):
    monkeypatch.setattr(probe, "measures_precision", lambda config, device: False)
    scripted[("teacher", "auto")] = [0.6, 0.4]
    scripted[("distill", "auto")] = [2.0]
    times = probe.measure_step_times(PARAMS, teacher=True, distill=True, repeats=2)
    assert times.teacher_step == 0.4 and times.ibmd_update == 2.0
    assert scripted == {("teacher", "auto"): [], ("distill", "auto"): []}  # each timed as said
    scripted[("teacher", "auto")] = [0.3, 0.5]
    assert probe.measure_step_times(PARAMS, teacher=True, distill=False).teacher_step == 0.3


def test_with_both_precisions_timed_the_choice_uses_each_precision_s_faster_timing(scripted, monkeypatch):
    monkeypatch.setattr(probe, "measures_precision", lambda config, device: True)
    # first round: bf16 0.6 against float32 0.5 (float32 would win); second: 0.3 against 0.45
    scripted[("teacher", "auto")] = [0.6, 0.3]
    scripted[("teacher", "never")] = [0.5, 0.45]
    scripted[("distill", "auto")] = [2.0]
    scripted[("distill", "never")] = [1.0]
    times = probe.measure_step_times(PARAMS, teacher=True, distill=True, repeats=2)
    assert times.precision == {"teacher": "bf16", "distill": "float32"}
    assert list(times.precision_seconds) == ["teacher", "distill"]  # the order the plan prints
    assert times.precision_seconds == {"teacher": (0.3, 0.45), "distill": (2.0, 1.0)}
    assert times.teacher_step == 0.3 and times.ibmd_update == 1.0
