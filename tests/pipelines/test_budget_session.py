"""The time budget in real sessions on env ``test``: the plan is made before the first node, the
nodes read the planned steps, explicit steps stay, and the probe leaves the run's numbers alone.

Step times are injected into the session's budget hook wherever a test needs the budget to bind,
so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from typing import Any

import numpy as np
import pytest
import torch

import ibmd_pipeline.hooks as hooks_module
import ibmd_pipeline.settings as project_settings
from ibmd_pipeline.budget import DISTILL_STEPS, TEACHER_STEPS, StepTimes, format_plan, measure_step_times
from ibmd_pipeline.hooks import RunBudgetHooks
from ibmd_pipeline.teacher.config import cpu_has_native_bf16

SLOW = StepTimes(
    teacher_step=10.0, ibmd_update=30.0, forward_image=1e-3, path="float32 (CPU without native bf16)"
)


#: conf/test's step counts, standing in for conf/base's (any other value is an explicit choice).
TEST_ENV_STEPS = {"teacher": {"train": {"steps": 24}}, "distill": {"train": {"steps": 4}}}


@pytest.fixture
def budget_hook(monkeypatch) -> RunBudgetHooks:
    """The session's budget hook, its probe replaced by the :data:`SLOW` step times and the test
    env's steps taken as the configured defaults."""
    hook = next(h for h in project_settings.HOOKS if isinstance(h, RunBudgetHooks))
    monkeypatch.setattr(hooks_module, "base_parameters", lambda context: TEST_ENV_STEPS)
    calls: list[dict[str, Any]] = []

    def slow(params: Any, **kwargs: Any) -> StepTimes:
        calls.append(kwargs)
        return SLOW

    monkeypatch.setattr(hook, "_measure", slow)
    hook.calls = calls  # type: ignore[attr-defined]
    return hook


def teacher_weights(run: Any) -> dict[str, torch.Tensor]:
    return torch.load(run.versioned_file("06_models/teacher.pt"), weights_only=True)


def test_a_binding_budget_trains_fewer_steps_and_the_checkpoint_says_how_many(
    degrade_run, run_kedro, budget_hook
):
    # 24 steps of 10 s do not fit 2 minutes: half of them, whole logging windows of 4
    params = {"budget": {"minutes": 2, "probe_steps": 1}, "teacher": {"workdir": None}}
    run = run_kedro(["teacher"], params=params)
    plan = budget_hook.plan
    assert budget_hook.calls == [
        {
            "teacher": True,
            "distill": False,
            "teacher_checkpoint": None,
            "repeats": 1,
            "inception": False,
            "report": False,
        }
    ]
    assert plan.configured == {TEACHER_STEPS: 24} and plan.planned == {TEACHER_STEPS: 8}
    checkpoint = teacher_weights(run)
    assert checkpoint["step"] == 8
    train = checkpoint["config"]["teacher"]["train"]
    assert train["steps"] == 8 and train["warmup_steps"] == 1  # 4 of 24 -> 1 of 8
    text = format_plan(plan)
    assert (
        "float32 (CPU without native bf16)" in text
        and "expected total 1.3 min (budget 2 min, planned within 1.9 min for a 5% margin; fewer steps)"
        in text
    )


def test_steps_given_on_the_command_line_are_kept(degrade_run, run_kedro, budget_hook):
    params = {
        "budget": {"minutes": 2, "probe_steps": 1},
        "teacher": {"workdir": None, "train": {"steps": 12}},
    }
    run = run_kedro(["teacher"], params=params)
    assert budget_hook.plan.planned == {TEACHER_STEPS: 12} and TEACHER_STEPS in budget_hook.plan.explicit
    assert teacher_weights(run)["step"] == 12


def test_a_precision_the_probe_decided_is_what_the_teacher_trains_in(degrade_run, run_kedro, monkeypatch):
    # the probe found float32 faster than bf16 for the teacher (cpu_bf16: auto on a native-bf16 CPU)
    hook = next(h for h in project_settings.HOOKS if isinstance(h, RunBudgetHooks))
    measured = dataclasses.replace(
        SLOW, teacher_step=0.01, precision={"teacher": "float32"}, precision_seconds={"teacher": (0.02, 0.01)}
    )
    monkeypatch.setattr(hook, "_measure", lambda params, **kwargs: measured)
    params = {
        "budget": {"minutes": None, "probe_steps": 1},
        "teacher": {"workdir": None, "cpu_bf16": "auto", "train": {"bf16": True}},
    }
    run = run_kedro(["teacher"], params=params)
    checkpoint = teacher_weights(run)
    assert checkpoint["config"]["teacher"]["cpu_bf16"] == "never" and checkpoint["autocast_bf16"] is False
    assert "teacher step 0.02 s in bf16, 0.01 s in float32; runs in float32" in format_plan(hook.plan)


def test_steps_the_env_sets_apart_from_conf_base_are_kept(degrade_run, run_kedro, monkeypatch):
    hook = next(h for h in project_settings.HOOKS if isinstance(h, RunBudgetHooks))
    monkeypatch.setattr(hook, "_measure", lambda params, **kwargs: SLOW)
    run = run_kedro(
        ["teacher"], params={"budget": {"minutes": 2, "probe_steps": 1}, "teacher": {"workdir": None}}
    )
    assert TEACHER_STEPS in hook.plan.explicit and not hook.plan.scaled  # conf/test: 24, conf/base: 2000
    assert "set explicitly, kept" in format_plan(hook.plan) and teacher_weights(run)["step"] == 24


def test_a_distillation_alone_is_planned_on_the_teacher_in_the_catalog(degrade_run, run_kedro, budget_hook):
    run_kedro(["teacher"], params={"teacher": {"workdir": None}})
    run = run_kedro(
        ["distill"], params={"budget": {"minutes": 1, "probe_steps": 1}, "distill": {"workdir": None}}
    )
    (call,) = budget_hook.calls
    assert (
        call["teacher"] is False
        and call["distill"] is True
        and call["teacher_checkpoint"]["kind"] == "teacher"
    )
    assert budget_hook.plan.configured == {DISTILL_STEPS: 4} and budget_hook.plan.planned == {
        DISTILL_STEPS: 1
    }
    student = torch.load(run.versioned_file("06_models/student.pt"), weights_only=True)
    assert student["step"] == 1


def test_the_distillation_is_planned_again_from_the_time_the_run_has_taken(
    degrade_run, run_kedro, budget_hook, monkeypatch, capsys
):
    # The plan expects 10 s teacher steps and 30 s updates; on a clock that stands still the run
    # reaches the distillation far ahead of that plan, so it gets its updates back, as many as fit.
    monkeypatch.setattr(budget_hook, "_clock", lambda: 0.0)
    params = {
        "budget": {"minutes": 2, "probe_steps": 1},
        "teacher": {"workdir": None},
        "distill": {"workdir": None},
    }
    run = run_kedro(["teacher", "distill"], params=params)
    plan = budget_hook.plan
    first = plan.first
    assert first is not None and first.planned[TEACHER_STEPS] == plan.planned[TEACHER_STEPS] < 24
    assert first.planned[DISTILL_STEPS] < plan.planned[DISTILL_STEPS] <= 4
    assert plan.expected_seconds <= plan.target_seconds < first.expected_seconds + 30.0
    student = torch.load(run.versioned_file("06_models/student.pt"), weights_only=True)
    assert student["step"] == plan.planned[DISTILL_STEPS]
    assert teacher_weights(run)["step"] == plan.planned[TEACHER_STEPS]
    out = capsys.readouterr().out
    assert "run plan revised before the distillation: the run has taken 0.0 min" in out
    assert f"{DISTILL_STEPS}: {plan.planned[DISTILL_STEPS]} (planned at the start" in out


def test_the_probe_leaves_the_training_s_numbers_as_they_were(degrade_run, run_kedro):
    """A budget that does not bind, measured for real: the same teacher as without any probe."""
    hook = next(h for h in project_settings.HOOKS if isinstance(h, RunBudgetHooks))
    without = teacher_weights(run_kedro(["teacher"], params={"teacher": {"workdir": None}}))
    assert hook.plan is None  # conf/test: no probe
    params = {"budget": {"minutes": 1000, "probe_steps": 1}, "teacher": {"workdir": None}}
    with_probe = teacher_weights(run_kedro(["teacher"], params=params))
    assert hook.plan is not None and not hook.plan.scaled and hook.plan.times.probe > 0
    assert with_probe["step"] == without["step"] == 24
    for kind in ("models", "ema"):
        for name, tensor in without[kind]["model"].items():
            assert torch.equal(tensor, with_probe[kind]["model"][name]), f"{kind}.{name}"
    assert with_probe["history"] == [
        {**record, "sec_per_step": with_probe["history"][i]["sec_per_step"]}
        for i, record in enumerate(without["history"])
    ]


def test_the_probe_restores_every_global_random_stream():
    params = {
        "engine": {"device": "cpu", "num_threads": 1},
        "task": {"kind": "inpaint_center"},
        "data": {"image_size": 16, "channels": 1},
        "teacher": {"model": {"network": {"preset": "tiny"}}, "train": {"batch_size": 4, "bf16": True}},
        "distill": {"train": {"batch_size": 4, "bf16": True}, "validation": {"batch_size": 4}},
        "evaluate": {
            "batch_size": 4,
            "num_images": 24,
            "fid": {"dims": 64, "num_images": 16, "reference_images": 20},
            "bootstrap": {"resamples": 20},
        },
    }

    def draws() -> tuple[Any, ...]:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    for seed_all in (torch.manual_seed, np.random.seed, random.seed):
        seed_all(7)
    expected = draws()
    for seed_all in (torch.manual_seed, np.random.seed, random.seed):
        seed_all(7)
    times = measure_step_times(params, teacher=True, distill=True, repeats=1, inception=True, report=True)
    assert draws() == expected
    assert times.teacher_step > 0 and times.ibmd_update > 0 and times.forward_image > 0
    assert times.inception_image > 0 and times.forward_single > 0 and times.report_resample > 0
    if sys.platform.startswith("linux"):  # the process has run at least as long as the probe
        assert times.startup >= times.probe
    # cpu_bf16: auto with train.bf16 is decided by timing both precisions on a native-bf16 CPU
    if cpu_has_native_bf16():
        assert set(times.precision) == set(times.precision_seconds) == {"teacher", "distill"}
        chosen = {"teacher": times.teacher_step, "distill": times.ibmd_update}
        for stage, (bf16, float32) in times.precision_seconds.items():
            assert chosen[stage] == (bf16 if times.precision[stage] == "bf16" else float32)
    else:
        assert times.precision == {} and times.precision_seconds == {}
