"""The time budget's plan from injected step times: never a timed test.

The step times below are the ones of issue 15 on an idle 2-core AMD EPYC: 0.22 s per teacher step
and 1.25 s per IBMD update with native bf16, 0.69 s and 3.4 s in float32 (AVX2 only).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ibmd_pipeline.budget import (
    DISTILL_STEPS,
    TEACHER_STEPS,
    BudgetConfig,
    StepTimes,
    explicit_step_keys,
    format_plan,
    format_revision,
    parse_budget_config,
    plan_budget,
    planned_parameters,
    revise_distillation,
    stage_seconds,
    summarize_plan,
)
from ibmd_pipeline.engine.config import ConfigError

#: The default run's nodes that cost time (the others are plots and grids of saved outputs).
DEFAULT_RUN = {
    "make_pairs",
    "train_teacher",
    "distill_student",
    "train_ca_classifier",
    "compute_fid_reference",
    "evaluate_teacher",
    "evaluate_models",
}
NATIVE_BF16 = StepTimes(0.22, 1.25, 0.002, "native bf16 (CPU)", probe=6.0)
FLOAT32 = StepTimes(0.69, 3.4, 0.003, "float32 (CPU without native bf16)", probe=15.0)
BUDGET = BudgetConfig(minutes=30, floor=0.25, probe_steps=2)


def base_params() -> dict[str, Any]:
    """The parts of conf/base that the plan reads."""
    return {
        "task": {"kind": "sr4x_bicubic"},
        "teacher": {
            "train": {"steps": 2000, "warmup_steps": 100, "log_every": 25, "lr_schedule": "cosine"},
            "sampler": {"grid_nfe": [1, 10, 100], "n_examples": 8},
            "validation": {"every": 250, "batch_size": 256},
        },
        "distill": {
            "student_nfe": 1,
            "train": {"steps": 300, "warmup_steps": 0, "log_every": 10},
            "validation": {
                "every": 25,
                "batch_size": 32,
                "draws": 4,
                "teacher_nfe": 100,
                "reference_nfes": [1, 2, 5, 10],
                "grid_examples": 8,
            },
        },
        "evaluate": {
            "num_images": 300,
            "num_seeds": 1,
            "teacher_nfe": [1, 10, 100],
            "batch_size": 64,
            "fid": {"enabled": True, "num_images": 200, "reference_images": 300},
            "closeness": {"enabled": True, "num_images": 50, "draws": 4},
        },
    }


def test_a_run_that_fits_keeps_its_configured_steps():
    plan = plan_budget(BUDGET, NATIVE_BF16, base_params(), DEFAULT_RUN)
    assert plan.planned == plan.configured == {TEACHER_STEPS: 2000, DISTILL_STEPS: 300}
    assert not plan.scaled and plan.expected_seconds <= 30 * 60
    assert planned_parameters(plan, base_params()) == {}


def test_a_slow_machine_gets_fewer_steps_of_both_stages_within_the_budget():
    params = base_params()
    full = plan_budget(BudgetConfig(minutes=None), FLOAT32, params, DEFAULT_RUN)
    assert full.expected_seconds > 40 * 60  # the 40+ minutes in float32
    plan = plan_budget(BUDGET, FLOAT32, params, DEFAULT_RUN)
    teacher, distill = plan.planned[TEACHER_STEPS], plan.planned[DISTILL_STEPS]
    assert 500 <= teacher < 2000 and 75 <= distill < 300
    assert teacher % 25 == 0 and distill % 10 == 0  # whole logging windows
    assert abs(teacher / 2000 - distill / 300) < 0.05  # one factor for both
    assert plan.expected_seconds <= 30 * 60 and not plan.note
    changed = planned_parameters(plan, params)
    assert changed["teacher"]["train"]["steps"] == teacher
    # the warm-up shrinks with the run, the schedule and everything else stay
    assert changed["teacher"]["train"]["warmup_steps"] == round(100 * teacher / 2000)
    assert changed["teacher"]["train"]["lr_schedule"] == "cosine"
    assert changed["teacher"]["validation"] == params["teacher"]["validation"]
    assert changed["distill"]["train"]["steps"] == distill
    assert params == base_params()  # the run's parameters are not modified in place


def test_the_floor_bounds_the_cut_and_says_the_run_stays_over_budget():
    plan = plan_budget(BudgetConfig(minutes=10, floor=0.25), FLOAT32, base_params(), DEFAULT_RUN)
    assert plan.planned == {TEACHER_STEPS: 500, DISTILL_STEPS: 75}
    assert "floor" in plan.note and plan.expected_seconds > 10 * 60


def test_explicit_steps_are_never_changed_and_the_other_stage_takes_the_rest():
    params = base_params()
    only_distill = plan_budget(BUDGET, FLOAT32, params, DEFAULT_RUN, explicit=frozenset({TEACHER_STEPS}))
    both = plan_budget(BUDGET, FLOAT32, params, DEFAULT_RUN)
    assert only_distill.planned[TEACHER_STEPS] == 2000
    assert only_distill.planned[DISTILL_STEPS] < both.planned[DISTILL_STEPS]
    assert "teacher" not in planned_parameters(only_distill, params)
    pinned = plan_budget(
        BUDGET, FLOAT32, params, DEFAULT_RUN, explicit=frozenset({TEACHER_STEPS, DISTILL_STEPS})
    )
    assert pinned.planned == pinned.configured and "set explicitly" in pinned.note
    assert "set explicitly, kept" in format_plan(pinned)


#: The default run's nodes done and still to run when the distillation starts.
BEFORE_DISTILLATION = {"make_pairs", "train_teacher"}
AFTER_DISTILLATION = DEFAULT_RUN - BEFORE_DISTILLATION - {"distill_student"}


def revised_at(plan: Any, elapsed: float) -> Any:
    return revise_distillation(
        plan, base_params(), BEFORE_DISTILLATION, AFTER_DISTILLATION, elapsed, BUDGET.floor
    )


def expected_by_distillation(plan: Any) -> float:
    return sum(stage_seconds(base_params(), BEFORE_DISTILLATION, plan.times, plan.planned).values())


def test_a_run_on_its_plan_keeps_the_planned_distillation():
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    by_now = expected_by_distillation(plan)
    within = 0.9 * plan.margin * plan.target_seconds
    assert revised_at(plan, by_now) is plan
    assert revised_at(plan, by_now + within) is plan and revised_at(plan, by_now - within) is plan


def test_a_run_ahead_of_its_plan_gets_the_distillation_updates_back_within_the_budget():
    # the probe timed the teacher slow (as right after set-up): the teacher took 4 minutes less
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    elapsed = expected_by_distillation(plan) - 240
    revised = revised_at(plan, elapsed)
    planned, more = plan.planned[DISTILL_STEPS], revised.planned[DISTILL_STEPS]
    assert planned < more <= 300 and more % 10 == 0
    assert revised.planned[TEACHER_STEPS] == plan.planned[TEACHER_STEPS]  # the teacher has run
    assert revised.expected_seconds <= revised.target_seconds
    # one window more would not have fitted
    distillation = stage_seconds(base_params(), {"distill_student"}, FLOAT32, {DISTILL_STEPS: more + 10})[
        "distillation"
    ]
    assert elapsed + distillation + revised.stages["evaluation"] > revised.target_seconds
    assert revised.first is plan and revised.elapsed == elapsed
    assert planned_parameters(revised, base_params())["distill"]["train"]["steps"] == more
    text = format_revision(revised)
    assert f"{DISTILL_STEPS}: {more:,} (planned at the start {planned:,}; configured 300)" in text
    assert "run plan revised before the distillation" in text


def test_a_run_far_ahead_gets_the_configured_updates_and_no_more():
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    revised = revised_at(plan, 60.0)
    assert revised.planned[DISTILL_STEPS] == 300 and not planned_parameters(revised, base_params()).get(
        "distill"
    )


def test_a_run_behind_its_plan_distils_fewer_updates_down_to_the_floor():
    plan = plan_budget(BUDGET, NATIVE_BF16, base_params(), DEFAULT_RUN)
    assert not plan.scaled  # it fitted at the start
    # the teacher took so much longer that the configured updates would end 2 minutes late
    late = plan.target_seconds - plan.stages["distillation"] - plan.stages["evaluation"] + 120
    assert late - expected_by_distillation(plan) > plan.margin * plan.target_seconds
    behind = revised_at(plan, late)
    assert 75 <= behind.planned[DISTILL_STEPS] < 300
    assert behind.expected_seconds <= behind.target_seconds and not behind.note
    assert any(line.startswith("distillation:") for line in behind.quality)
    hopeless = revised_at(plan, 29 * 60)
    assert hopeless.planned[DISTILL_STEPS] == 75 and "floor" in hopeless.note


def test_explicit_updates_and_no_budget_are_never_revised():
    pinned = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN, explicit=frozenset({DISTILL_STEPS}))
    assert revised_at(pinned, 60.0) is pinned
    unlimited = plan_budget(BudgetConfig(minutes=None), FLOAT32, base_params(), DEFAULT_RUN)
    assert revised_at(unlimited, 60.0) is unlimited


def test_no_budget_and_a_pipeline_slice_keep_the_configured_steps():
    unlimited = plan_budget(BudgetConfig(minutes=None), FLOAT32, base_params(), DEFAULT_RUN)
    assert not unlimited.scaled and "no budget" in format_plan(unlimited)
    tight = BudgetConfig(minutes=10)
    one_task = plan_budget(tight, FLOAT32, base_params(), {"train_teacher"}, scalable=False)
    assert not one_task.scaled and "slice" in one_task.note


def test_steps_are_explicit_from_the_command_line_or_another_value_than_base():
    base = base_params()
    assert explicit_step_keys(base, base, None) == frozenset()
    runtime = {"teacher": {"train": {"steps": 2000}}}  # --params teacher.train.steps=2000: explicit
    assert explicit_step_keys(base, base, runtime) == {TEACHER_STEPS}
    assert explicit_step_keys(base, base, {"distill.train.steps": 300}) == {DISTILL_STEPS}
    local = copy.deepcopy(base)
    local["distill"]["train"]["steps"] = 600  # conf/local or --env
    assert explicit_step_keys(local, base, {}) == {DISTILL_STEPS}


def test_the_printed_plan_names_the_path_the_times_the_steps_and_the_expected_total():
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    text = format_plan(plan)
    assert text.splitlines()[0] == "run plan on this machine: float32 (CPU without native bf16)"
    assert "teacher step 0.69 s, IBMD update 3.4 s" in text
    teacher, distill = plan.planned[TEACHER_STEPS], plan.planned[DISTILL_STEPS]
    assert f"teacher.train.steps: {teacher:,} planned by the budget (configured 2,000)" in text
    assert f"distill.train.steps: {distill:,} planned by the budget (configured 300)" in text
    assert (
        f"expected total {plan.expected_seconds / 60:.1f} min (budget 30 min, planned within 28.6 min "
        "for a 5% margin; fewer steps)"
    ) in text
    assert "quality cost: teacher: " in text and "quality not measured at this length" in text
    assert "student FID about" in text and "instead of 64.6" in text  # the measured curve
    assert "budget.minutes=null" in text
    fits = format_plan(plan_budget(BUDGET, NATIVE_BF16, base_params(), DEFAULT_RUN))
    assert "native bf16" in fits and "the configured steps" in fits and "quality cost" not in fits


def test_the_quality_cost_is_only_quoted_where_it_was_measured():
    params = base_params()
    params["task"]["kind"] = "jpeg"
    text = format_plan(plan_budget(BUDGET, FLOAT32, params, DEFAULT_RUN))
    assert "student FID" not in text
    assert "updates; quality not measured at this length" in text


def test_stage_seconds_follow_the_nodes_and_the_measured_times():
    params = base_params()
    steps = {TEACHER_STEPS: 2000, DISTILL_STEPS: 300}
    only_teacher = stage_seconds(params, {"train_teacher"}, FLOAT32, steps)
    assert set(only_teacher) == {"probe", "teacher"}
    # the steps, the validation losses (9 of 256 images) and the grid (8 images at 1 + 10 + 100)
    assert only_teacher["teacher"] == pytest.approx(2000 * 0.69 + (9 * 256 + 8 * 111) * 0.003)
    evaluation = stage_seconds(params, {"evaluate_teacher"}, FLOAT32, steps)["evaluation"]
    images = 300 * 111 + 111 * 50 * 3  # the restorations and the closeness draws
    assert evaluation == pytest.approx(images * 0.003 + 200 * 4 * 0.16)


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"minutes": 0}, "budget.minutes", "minutes > 0, or null"),
        ({"minutes": True}, "budget.minutes", "expected a number"),
        ({"minutes": "soon"}, "budget.minutes", "expected a number"),
        ({"floor": 0}, "budget.floor", r"in \(0, 1\]"),
        ({"margin": -0.1}, "budget.margin", r"in \[0, 1\]"),
        ({"floor": 1.5}, "budget.floor", r"in \(0, 1\]"),
        ({"probe_steps": -1}, "budget.probe_steps", ">= 0"),
        ({"minutes": 30, "probe_steps": 0}, "budget.probe_steps", "must be >= 1 while budget.minutes is set"),
        ({"minuets": 30}, "budget.minuets", "allowed"),
    ],
)
def test_the_setting_is_validated_and_the_error_names_the_key(values, key, message):
    with pytest.raises(ConfigError, match=rf"^parameter '{key}'.*{message}"):
        parse_budget_config(values)


def test_the_shipped_defaults():
    assert parse_budget_config(None) == BudgetConfig(minutes=None, floor=0.25, probe_steps=2)
    assert parse_budget_config({"minutes": None, "probe_steps": 0}).probe_steps == 0


def test_the_log_line_sums_the_plan_up():
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    teacher, distill = plan.planned[TEACHER_STEPS], plan.planned[DISTILL_STEPS]
    assert summarize_plan(plan) == (
        f"float32 (CPU without native bf16); teacher.train.steps {teacher:,} of 2,000, "
        f"distill.train.steps {distill} of 300; expected total {plan.expected_seconds / 60:.1f} min "
        "(budget 30 min)"
    )


def test_a_measured_inception_time_scales_the_evaluation_and_the_fixed_costs():
    params, steps = base_params(), {TEACHER_STEPS: 2000, DISTILL_STEPS: 300}
    assumed = stage_seconds(params, DEFAULT_RUN, FLOAT32, steps)
    busy = StepTimes(0.69, 3.4, 0.003, "float32", probe=15.0, inception_image=0.48)  # 3x the assumed 0.16
    measured = stage_seconds(params, DEFAULT_RUN, busy, steps)
    assert measured["degrade"] == pytest.approx(3 * assumed["degrade"])
    inception = (300 + 200 * 4 + 200) * (0.48 - 0.16)  # reference, xT and 3 teacher NFEs, student
    fixed = 2 * (25 + 15)  # classifier, report
    assert measured["evaluation"] - assumed["evaluation"] == pytest.approx(inception + fixed)
    assert measured["teacher"] == assumed["teacher"]
    assert "Inception 0.48 s/image" in format_plan(plan_budget(BUDGET, busy, params, DEFAULT_RUN))


def test_the_plan_keeps_the_margin_below_the_budget():
    plan = plan_budget(BUDGET, FLOAT32, base_params(), DEFAULT_RUN)
    assert plan.scaled and plan.target_seconds == pytest.approx(30 * 60 / 1.05)
    assert plan.expected_seconds <= plan.target_seconds
    without = plan_budget(BudgetConfig(minutes=30, margin=0.0), FLOAT32, base_params(), DEFAULT_RUN)
    assert without.expected_seconds <= 30 * 60 and without.expected_seconds > plan.target_seconds
    assert without.planned[TEACHER_STEPS] > plan.planned[TEACHER_STEPS]
    assert "margin" not in format_plan(without)


def test_the_speed_rounds_cost_each_call_at_its_batch_and_at_least_the_minimum_measurement():
    params, steps = base_params(), {TEACHER_STEPS: 2000, DISTILL_STEPS: 300}
    params["evaluate"]["speed"] = {"batch_size": 16, "repeats": 5, "warmup": 1, "min_seconds": 0.25}
    params["evaluate"]["bootstrap"] = {"resamples": 300}
    times = StepTimes(0.69, 3.4, 0.003, "float32", probe=15.0, forward_single=0.009, report_resample=0.02)
    nodes = {"evaluate_models"}
    seconds = stage_seconds(params, nodes, times, steps)["evaluation"]
    speed = 0.0
    for nfe in (1, 10, 100, 1):  # the teacher at 1, 10, 100 NFE and the one-step student
        for call in (nfe * 0.009, nfe * 16 * 0.003):
            speed += 2 * call + 5 * max(call, 0.25)  # warm-up and sizing, then the timed rounds
    report = 300 * 5 * 0.02  # 4 models and the corrupted input, every resample
    fixed = 15 + 200 * 0.16  # plots and files, the student's Inception features
    assert seconds == pytest.approx(speed + report + fixed)
    # a student trained with N = 4 is scored at 1, 2 and 4 steps: three models more than N = 1's one
    params["distill"]["student_nfe"] = 4
    more = stage_seconds(params, nodes, times, steps)["evaluation"]
    assert more > seconds + 2 * 300 * 0.02


def test_the_start_up_before_the_probe_counts():
    times = StepTimes(0.69, 3.4, 0.003, "float32", probe=15.0, startup=12.0)
    stages = stage_seconds(base_params(), {"train_teacher"}, times, {TEACHER_STEPS: 2000})
    assert list(stages)[:2] == ["start", "probe"] and stages["start"] == 12.0


@pytest.mark.parametrize(
    ("bf16", "float32", "chosen"),
    [
        (0.22, 0.69, "bf16"),  # an AMD EPYC with native bf16: bf16 three times faster
        (0.46, 0.34, "float32"),  # an AVX-512-BF16 Xeon without AMX: float32 faster
        (0.32, 0.34, "float32"),  # a near tie stays float32
        (2.0, 2.5, "bf16"),
    ],
)
def test_auto_keeps_bf16_only_where_it_is_clearly_faster(bf16, float32, chosen):
    from ibmd_pipeline.budget.probe import BF16_MIN_GAIN, choose_precision

    assert BF16_MIN_GAIN == 0.10
    assert choose_precision(bf16, float32) == chosen


def test_only_auto_on_a_native_bf16_cpu_is_decided_by_timing(monkeypatch):
    import torch

    from ibmd_pipeline.budget import probe
    from ibmd_pipeline.teacher import parse_teacher_config

    cpu = torch.device("cpu")
    monkeypatch.setattr(probe, "cpu_has_native_bf16", lambda: True)
    auto = parse_teacher_config({"cpu_bf16": "auto", "train": {"bf16": True}}, seed=0)
    assert probe.measures_precision(auto, cpu)
    for values in ({"cpu_bf16": "never"}, {"cpu_bf16": "always"}, {"train": {"bf16": False}}):
        config = parse_teacher_config({"cpu_bf16": "auto", "train": {"bf16": True}} | values, seed=0)
        assert not probe.measures_precision(config, cpu), values
    assert not probe.measures_precision(auto, torch.device("meta"))
    monkeypatch.setattr(probe, "cpu_has_native_bf16", lambda: False)
    assert not probe.measures_precision(auto, cpu)
