"""The run's time budget: from measured step times to the expected run time and, when that
exceeds the budget, fewer teacher steps and distillation updates.

Everything here is arithmetic on measured seconds and parameter mappings (no torch, no Kedro),
so the plan is tested with injected step times. The measurement itself is
:func:`ibmd_pipeline.budget.probe.measure_step_times`.

The model of a run's time is deliberately simple:

    expected = start-up + probe + teacher steps x teacher step + updates x IBMD update
               + network evaluations of one image x (forward of one image)   # sampling, validation
               + Inception images x (Inception forward of one image)
               + speed rounds (each call at its measured batch-1 / batch cost, at least
                 ``speed.min_seconds``)
               + report resamples x models x (whole-set metrics of one resample) + fixed stage costs

A run plans to finish within ``budget.minutes / (1 + budget.margin)``: the margin covers what the
probe does not see (batch assembly, logging, checkpoint writes). In the default run on a 2-core
Xeon the teacher took 4.8% and the distillation 3.2% longer than their probed steps predicted
(README, "The default run on your CPU"), hence the default margin of 5%.

When it exceeds that, both step counts are scaled by one factor (never below ``budget.floor`` of
the configured ones) so that the training fits what the other stages leave; a step count the
user set explicitly is kept, and the other one takes the rest.

When the distillation starts, the plan is revised from the time the run has actually taken
(:func:`revise_distillation`): the probe's few steps can be off (a fresh process right after
set-up's disk writes timed its first steps 25-50% slow), so the distillation's updates are
planned again from what is left of the budget, up to the configured ones and never below the
floor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ibmd_pipeline.engine.config import parse_config, require

__all__ = [
    "DISTILL_STEPS",
    "TEACHER_STEPS",
    "BudgetConfig",
    "BudgetPlan",
    "StepTimes",
    "explicit_step_keys",
    "format_plan",
    "format_revision",
    "parse_budget_config",
    "plan_budget",
    "planned_parameters",
    "revise_distillation",
    "stage_seconds",
    "summarize_plan",
]

TEACHER_STEPS = "teacher.train.steps"
DISTILL_STEPS = "distill.train.steps"

#: Seconds of one 299x299 Inception forward per image on 2 idle cores
#: (conf/base/parameters_evaluate.yml), used when the probe did not time it.
INCEPTION_SECONDS = 0.16
#: Stage costs that do not depend on the networks' step time, measured in the default run on 2
#: idle cores (README): the degrade pipeline, the CA classifier's training, the report's plots
#: and files. They are scaled by the measured Inception time over :data:`INCEPTION_SECONDS`: a
#: slower (or busier) machine is slower at these too.
DEGRADE_SECONDS = 30.0
CLASSIFIER_SECONDS = 25.0
REPORT_SECONDS = 15.0
#: Seconds of the report's intervals per bootstrap resample and model, when the probe did not
#: time them (whole-set metrics of the default run's shapes on 2 idle cores, one BLAS thread).
REPORT_RESAMPLE_SECONDS = 0.01
#: When the probe did not time a batch-1 network evaluation: a sampling call at batch 1 costs
#: about this many images of a batched call (measured: 9 ms against 3.1 ms per image at batch 16,
#: the ``cpu`` preset on 2 cores).
BATCH_ONE_IMAGES = 3
#: The students' step counts the evaluation scores when ``evaluate.student_nfe`` is null: those
#: up to the trained N (evaluation.measure.STUDENT_NFE_CHOICES).
STUDENT_NFE_CHOICES = (1, 2, 4)

#: The student's FID (NFE 1, 200 test images) after n generator updates of one distillation,
#: sr4x_bicubic on the embedded data at the default settings (batch 32, L = 5, lr 3e-4):
#: benchmarks/results/earlier_protocol/sr4x_bicubic.json, ``fid_vs_distill_steps`` (README, "Benchmarks",
#: the earlier protocol: 200 images, one seed).
MEASURED_DISTILL_FID = {50: 69.4, 100: 66.5, 200: 65.4, 300: 64.6, 450: 65.8, 600: 64.0, 800: 65.3}


@dataclass(frozen=True)
class BudgetConfig:
    """``params:budget``: the time the default run may take on this machine.

    minutes: the run's time budget; null = none (the configured steps run as they are, the
        expected time is still printed).
    margin: the run plans to take at most ``minutes / (1 + margin)``, for what the probe does not
        time (module docstring); >= 0.
    floor: the fewest steps the budget may plan, as a share of the configured ones, in (0, 1].
    probe_steps: timed teacher steps and IBMD updates (each after one untimed warm-up, on random
        weights, not part of training) that the estimate is built from; 0 = no probe, no
        estimate and no budget.
    """

    minutes: float | None = None
    margin: float = 0.05
    floor: float = 0.25
    probe_steps: int = 2

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        if self.minutes is not None:
            require(
                self.minutes > 0,
                f"{prefix}minutes",
                f"must be a number of minutes > 0, or null (no budget), got {self.minutes!r}",
            )
        require(
            0.0 <= self.margin <= 1.0, f"{prefix}margin", f"must be in [0, 1] (a share), got {self.margin}"
        )
        require(0.0 < self.floor <= 1.0, f"{prefix}floor", f"must be in (0, 1], got {self.floor}")
        require(self.probe_steps >= 0, f"{prefix}probe_steps", f"must be >= 0, got {self.probe_steps}")
        require(
            self.minutes is None or self.probe_steps >= 1,
            f"{prefix}probe_steps",
            f"must be >= 1 while {prefix}minutes is set (the budget needs measured step times), "
            f"got {self.probe_steps}",
        )


def parse_budget_config(values: Mapping[str, Any] | None, key: str = "budget") -> BudgetConfig:
    """``params:budget`` as a validated :class:`BudgetConfig` (``ConfigError`` names the key)."""
    return parse_config(BudgetConfig, values, key)


@dataclass(frozen=True)
class StepTimes:
    """Seconds measured on this machine (medians of the probe's timed steps).

    teacher_step: one teacher training step; None when the run trains no teacher.
    ibmd_update: one IBMD update (L auxiliary updates and one generator update); None when the
        run does not distil.
    forward_image: one network evaluation of one image without gradients (sampling, validation),
        in a batch of ``evaluate.batch_size``.
    inception_image: one Inception forward of one image (FID features); None = not measured
        (:data:`INCEPTION_SECONDS` is assumed).
    path: the training precision, e.g. ``native bf16`` or ``float32 (no native bf16 on this CPU)``.
    probe: what the probe itself took.
    forward_single: one network evaluation of a batch of one image (the speed rounds' latency
        calls); None = not measured (:data:`BATCH_ONE_IMAGES` x ``forward_image``).
    report_resample: the report's whole-set metrics of one model on one bootstrap resample; None =
        not measured (:data:`REPORT_RESAMPLE_SECONDS`).
    startup: seconds from the process start to the probe (imports, Kedro's session and catalog).
    precision: ``{"teacher" | "distill": "bf16" | "float32"}`` for each stage whose ``cpu_bf16:
        auto`` was decided by timing both paths on a CPU with native bf16 (the step times above
        are the chosen path's); empty when nothing was decided that way.
    precision_seconds: ``{stage: (bf16 seconds, float32 seconds)}`` of those timings.
    """

    teacher_step: float | None
    ibmd_update: float | None
    forward_image: float
    path: str
    probe: float = 0.0
    inception_image: float | None = None
    forward_single: float | None = None
    report_resample: float | None = None
    startup: float = 0.0
    precision: Mapping[str, str] = field(default_factory=dict)
    precision_seconds: Mapping[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetPlan:
    """The run as planned: step counts (configured and planned), expected seconds per stage."""

    budget_minutes: float | None
    times: StepTimes
    configured: dict[str, int]
    planned: dict[str, int]
    explicit: frozenset[str]
    stages: dict[str, float]
    quality: list[str] = field(default_factory=list)
    note: str = ""
    margin: float = 0.0
    #: Set on a plan revised during the run (:func:`revise_distillation`): the seconds the run had
    #: taken when it was revised, what the plan it replaced expected by then, and that plan.
    elapsed: float | None = None
    expected_by_now: float | None = None
    first: BudgetPlan | None = None

    @property
    def target_seconds(self) -> float | None:
        """What the run plans to take at most: the budget less its margin (None: no budget)."""
        return None if self.budget_minutes is None else self.budget_minutes * 60.0 / (1.0 + self.margin)

    @property
    def expected_seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def scaled(self) -> bool:
        return self.planned != self.configured

    def as_record(self) -> dict[str, Any]:
        """Plain values for logs and reports."""
        return {
            "budget_minutes": self.budget_minutes,
            "path": self.times.path,
            "teacher_step_s": self.times.teacher_step,
            "ibmd_update_s": self.times.ibmd_update,
            "configured": dict(self.configured),
            "planned": dict(self.planned),
            "expected_minutes": self.expected_seconds / 60.0,
        }


# ---------------------------------------------------------------------------------------------
# What the run will do


def _lookup(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]["c"]`` for ``"a.b.c"`` (or the flat key ``"a.b.c"``), else None."""
    if isinstance(mapping, Mapping) and dotted in mapping:
        return mapping[dotted]
    value = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def explicit_step_keys(
    params: Mapping[str, Any], base_params: Mapping[str, Any], runtime_params: Mapping[str, Any] | None
) -> frozenset[str]:
    """The step counts the user chose: given with ``--params`` (even at the default value), or set
    by the run's configuration environment (``conf/local``, ``--env``) to another value than
    ``conf/base``'s. The budget never changes these."""
    explicit = set()
    for key in (TEACHER_STEPS, DISTILL_STEPS):
        if _lookup(runtime_params or {}, key) is not None or _lookup(params, key) != _lookup(
            base_params, key
        ):
            explicit.add(key)
    return frozenset(explicit)


def _validations(steps: int, every: int) -> int:
    return (steps // every if every > 0 else 0) + 1


def stage_seconds(
    params: Mapping[str, Any], nodes: set[str], times: StepTimes, steps: Mapping[str, int]
) -> dict[str, float]:
    """Expected seconds of each stage of a run of ``nodes`` (node names) with ``steps``.

    Teacher: its steps, its validation losses and sample grid. Distillation: its updates, the
    teacher's reference draws and the student's draws of its validation, its grid. Evaluation:
    the teacher's restorations at every NFE (and the closeness draws), the Inception features,
    the classifier and the report. Uses the parameters as the nodes read them.
    """
    forward = times.forward_image
    inception_image = times.inception_image or INCEPTION_SECONDS
    machine = inception_image / INCEPTION_SECONDS  # how much slower than where the constants were measured
    stages: dict[str, float] = {}
    if times.startup:
        stages["start"] = times.startup
    if times.probe:
        stages["probe"] = times.probe
    if "make_pairs" in nodes:
        stages["degrade"] = DEGRADE_SECONDS * machine
    teacher = params.get("teacher") or {}
    if "train_teacher" in nodes and times.teacher_step is not None:
        validation = teacher.get("validation") or {}
        sampler = teacher.get("sampler") or {}
        evaluations = _validations(steps[TEACHER_STEPS], int(validation.get("every", 0))) * int(
            validation.get("batch_size", 256)
        ) + int(sampler.get("n_examples", 8)) * sum(sampler.get("grid_nfe", [1, 10, 100]))
        stages["teacher"] = steps[TEACHER_STEPS] * times.teacher_step + evaluations * forward
    distill = params.get("distill") or {}
    if "distill_student" in nodes and times.ibmd_update is not None:
        validation = distill.get("validation") or {}
        evaluations = 0
        every = int(validation.get("every", 25))
        if every > 0:
            draws = int(validation.get("draws", 4)) * int(validation.get("batch_size", 32))
            references = int(validation.get("teacher_nfe", 100)) + sum(validation.get("reference_nfes", []))
            student = _validations(steps[DISTILL_STEPS], every) * int(distill.get("student_nfe", 1))
            evaluations = draws * (references + student)
        evaluations += int(validation.get("grid_examples", 8)) * (1 + int(validation.get("teacher_nfe", 100)))
        stages["distillation"] = steps[DISTILL_STEPS] * times.ibmd_update + evaluations * forward
    evaluate = params.get("evaluate") or {}
    seconds = 0.0
    fid = evaluate.get("fid") or {}
    inception = fid.get("enabled", True)
    if "train_ca_classifier" in nodes:
        seconds += CLASSIFIER_SECONDS * machine
    if "compute_fid_reference" in nodes and inception:
        seconds += int(fid.get("reference_images") or 0) * inception_image
    images = int(evaluate.get("num_images", 300)) * int(evaluate.get("num_seeds", 1))
    fid_images = min(int(fid.get("num_images") or images), images)
    if "evaluate_teacher" in nodes:
        nfes = list(evaluate.get("teacher_nfe", [1, 10, 100]))
        modes = 1 + len(evaluate.get("teacher_modes", []))
        limits = evaluate.get("teacher_max_images") or {}
        restorations = modes * sum(nfe * min(images, int(limits.get(nfe, images))) for nfe in nfes)
        closeness = evaluate.get("closeness") or {}
        if closeness.get("enabled", True):
            extra_draws = max(int(closeness.get("draws", 4)) - int(evaluate.get("num_seeds", 1)), 0)
            restorations += modes * sum(nfes) * int(closeness.get("num_images", 50)) * extra_draws
        seconds += restorations * forward
        if inception:
            seconds += fid_images * (1 + modes * len(nfes)) * inception_image
    if "evaluate_models" in nodes:
        seconds += REPORT_SECONDS * machine + (fid_images * inception_image if inception else 0.0)
        nfes = list(evaluate.get("teacher_nfe", [1, 10, 100]))
        modes = 1 + len(evaluate.get("teacher_modes", []))
        trained_nfe = int(distill.get("student_nfe", 1))
        students = list(evaluate.get("student_nfe") or [n for n in STUDENT_NFE_CHOICES if n <= trained_nfe])
        models = [*nfes * modes, *students]
        seconds += _speed_seconds(evaluate.get("speed") or {}, models, times)
        # intervals: every model and the corrupted input, on every resample
        resamples = int((evaluate.get("bootstrap") or {}).get("resamples", 300))
        per_resample = times.report_resample if times.report_resample is not None else REPORT_RESAMPLE_SECONDS
        seconds += resamples * (len(models) + 1) * per_resample
    if seconds:
        stages["evaluation"] = seconds
    return stages


def _speed_seconds(speed: Mapping[str, Any], models: list[int], times: StepTimes) -> float:
    """The speed rounds (:func:`~ibmd_pipeline.metrics.speed.time_round_robin`): every model (its
    NFE) at batch 1 and at ``speed.batch_size``, run ``warmup`` times, once to size its loops,
    then ``repeats`` timed measurements of at least ``min_seconds`` each."""
    batch = int(speed.get("batch_size", 16))
    untimed = int(speed.get("warmup", 1)) + 1
    repeats, least = int(speed.get("repeats", 5)), float(speed.get("min_seconds", 0.25))
    single = (
        times.forward_single if times.forward_single is not None else BATCH_ONE_IMAGES * times.forward_image
    )
    seconds = 0.0
    for nfe in models:
        for call in (nfe * single, nfe * batch * times.forward_image):
            seconds += untimed * call + repeats * max(call, least)
    return seconds


# ---------------------------------------------------------------------------------------------
# The plan


def _round_steps(steps: int, factor: float, floor: float, log_every: int) -> int:
    """``steps x factor`` rounded down to whole logging windows, at least ``floor`` of ``steps``."""
    least = _fewest_steps(steps, floor)
    wanted = int(steps * factor)
    if wanted >= log_every:
        wanted -= wanted % log_every
    return min(steps, max(least, wanted))


def _interpolate(curve: Mapping[int, float], x: float) -> float | None:
    points = sorted(curve.items())
    if not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _quality_cost(
    params: Mapping[str, Any], configured: Mapping[str, int], planned: Mapping[str, int]
) -> list[str]:
    """One line per scaled stage: the quality cost where the project measured it, else said so."""
    lines = []
    if planned.get(TEACHER_STEPS, 0) < configured.get(TEACHER_STEPS, 0):
        lines.append(
            f"teacher: {planned[TEACHER_STEPS]:,} of {configured[TEACHER_STEPS]:,} steps; "
            "quality not measured at this length"
        )
    if planned.get(DISTILL_STEPS, 0) < configured.get(DISTILL_STEPS, 0):
        kind = (params.get("task") or {}).get("kind")
        distill = params.get("distill") or {}
        measured = kind == "sr4x_bicubic" and int(distill.get("student_nfe", 1)) == 1
        fewer, full = planned[DISTILL_STEPS], configured[DISTILL_STEPS]
        at_planned = _interpolate(MEASURED_DISTILL_FID, fewer) if measured else None
        at_full = _interpolate(MEASURED_DISTILL_FID, full) if measured else None
        if at_planned is not None and at_full is not None:
            lines.append(
                f"distillation: {fewer:,} of {full:,} updates; student FID about {at_planned:.1f} "
                f"instead of {at_full:.1f} (sr4x_bicubic, FID against distillation length, "
                "README 'Benchmarks'; 200-image FIDs move by about 1 between seeds)"
            )
        else:
            lines.append(f"distillation: {fewer:,} of {full:,} updates; quality not measured at this length")
    return lines


def plan_budget(
    config: BudgetConfig,
    times: StepTimes,
    params: Mapping[str, Any],
    nodes: set[str],
    explicit: frozenset[str] = frozenset(),
    scalable: bool = True,
) -> BudgetPlan:
    """The plan of a run of ``nodes`` with ``params`` on a machine with ``times``.

    Without a budget, or when the expected time fits it, the configured steps stay. Otherwise
    every step count that is not in ``explicit`` is scaled by one factor chosen so that the run
    fits (not below ``config.floor`` of it, rounded down to whole ``train.log_every`` windows).
    ``scalable=False`` (a slice of a pipeline, e.g. one Airflow task) plans the configured steps
    and says why.
    """
    configured = {}
    if "train_teacher" in nodes and times.teacher_step is not None:
        configured[TEACHER_STEPS] = int(_lookup(params, TEACHER_STEPS))
    if "distill_student" in nodes and times.ibmd_update is not None:
        configured[DISTILL_STEPS] = int(_lookup(params, DISTILL_STEPS))
    full = stage_seconds(params, nodes, times, configured)
    plan = BudgetPlan(
        config.minutes, times, configured, dict(configured), explicit, full, margin=config.margin
    )
    target = plan.target_seconds
    if target is None or plan.expected_seconds <= target:
        return plan
    free = [key for key in configured if key not in explicit]
    if not scalable or not free:
        why = "a slice of a pipeline (--nodes, an Airflow task)" if not scalable else "steps set explicitly"
        return BudgetPlan(
            config.minutes,
            times,
            configured,
            dict(configured),
            explicit,
            full,
            note=f"over the budget, but the steps stay: {why}",
            margin=config.margin,
        )
    per_step = {TEACHER_STEPS: times.teacher_step or 0.0, DISTILL_STEPS: times.ibmd_update or 0.0}
    scalable_seconds = sum(configured[key] * per_step[key] for key in free)
    available = target - (plan.expected_seconds - scalable_seconds)
    factor = min(1.0, max(available / scalable_seconds, 0.0)) if scalable_seconds > 0 else 1.0
    planned = dict(configured)
    for key in free:
        section = key.split(".", 1)[0]
        log_every = int(_lookup(params, f"{section}.train.log_every") or 1)
        planned[key] = _round_steps(configured[key], factor, config.floor, log_every)
    stages = stage_seconds(params, nodes, times, planned)
    note = ""
    if sum(stages.values()) > target:
        note = f"the floor ({config.floor:.0%} of the configured steps) keeps the run over the budget"
    return BudgetPlan(
        config.minutes,
        times,
        configured,
        planned,
        explicit,
        stages,
        _quality_cost(params, configured, planned),
        note,
        config.margin,
    )


def _fewest_steps(configured: int, floor: float) -> int:
    return max(1, math.ceil(configured * floor))


def revise_distillation(
    plan: BudgetPlan,
    params: Mapping[str, Any],
    done: set[str],
    pending: set[str],
    elapsed: float,
    floor: float,
) -> BudgetPlan:
    """``plan`` revised when the distillation starts, from the ``elapsed`` seconds the run has
    taken (start-up and probe included) to finish the nodes in ``done``; ``pending``: the nodes
    still to run after the distillation.

    When the run is more than the margin (``plan.margin`` of the target) ahead of or behind what
    the plan expected by now, the distillation gets the most updates, in whole logging windows,
    between ``floor`` of the configured ones and the configured ones, that end the run within the
    target with the pending stages as planned. Otherwise, or without a budget, or when the
    updates were set explicitly, ``plan`` is returned as it is.
    """
    target = plan.target_seconds
    if target is None or DISTILL_STEPS not in plan.configured or DISTILL_STEPS in plan.explicit:
        return plan
    times = plan.times
    by_now = sum(stage_seconds(params, done, times, plan.planned).values())
    if abs(elapsed - by_now) <= plan.margin * target:
        return plan
    unmeasured = dataclasses.replace(times, startup=0.0, probe=0.0)
    rest = sum(stage_seconds(params, pending - {"distill_student"}, unmeasured, plan.planned).values())
    allowance = target - elapsed - rest
    configured = plan.configured[DISTILL_STEPS]
    log_every = int(_lookup(params, "distill.train.log_every") or 1)
    fewest = _fewest_steps(configured, floor)
    candidates = [configured, *range(configured - configured % log_every, fewest, -log_every), fewest]

    def distillation(steps: int) -> float:
        return stage_seconds(params, {"distill_student"}, unmeasured, {DISTILL_STEPS: steps})["distillation"]

    steps = next((n for n in candidates if n >= fewest and distillation(n) <= allowance), fewest)
    planned = {**plan.planned, DISTILL_STEPS: steps}
    stages = {"so far": elapsed, "distillation": distillation(steps)}
    if rest:
        stages["evaluation"] = rest
    note = ""
    if sum(stages.values()) > target:
        note = f"the floor ({floor:.0%} of the configured updates) keeps the run over the budget"
    return dataclasses.replace(
        plan,
        planned=planned,
        stages=stages,
        quality=_quality_cost(params, plan.configured, planned),
        note=note,
        elapsed=elapsed,
        expected_by_now=by_now,
        first=plan.first or plan,
    )


def planned_parameters(plan: BudgetPlan, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The parameter sections the plan changes (``{"teacher": {...}, "distill": {...}}``), whole:
    ``train.steps`` as planned and ``train.warmup_steps`` scaled with it, so the learning-rate
    warm-up and cosine decay keep their shape over the shorter run."""
    changed: dict[str, dict[str, Any]] = {}
    for key, steps in plan.planned.items():
        if steps == plan.configured[key]:
            continue
        section = key.split(".", 1)[0]
        values = dict(params[section])
        train = dict(values["train"])
        warmup = int(train.get("warmup_steps", 0) or 0)
        train["steps"] = steps
        if warmup:
            train["warmup_steps"] = min(steps - 1, round(warmup * steps / plan.configured[key]))
        values["train"] = train
        changed[section] = values
    return changed


# ---------------------------------------------------------------------------------------------
# What the run prints at its start


def _minutes(seconds: float) -> str:
    return f"{seconds / 60.0:.1f} min"


def summarize_plan(plan: BudgetPlan) -> str:
    """The plan in one line (for the log)."""
    steps = ", ".join(
        f"{key} {plan.planned[key]:,}" + ("" if plan.planned[key] == configured else f" of {configured:,}")
        for key, configured in plan.configured.items()
    )
    budget = "no budget" if plan.budget_minutes is None else f"budget {plan.budget_minutes:g} min"
    return f"{plan.times.path}; {steps}; expected total {_minutes(plan.expected_seconds)} ({budget})"


def format_plan(plan: BudgetPlan) -> str:
    """The block printed at the start of a run: the precision path, the measured step times, the
    steps (planned against configured), the expected time per stage and in total, the budget and
    the quality cost of fewer steps."""
    times = plan.times
    lines = [f"run plan on this machine: {times.path}"]
    measured = []
    if times.teacher_step is not None:
        measured.append(f"teacher step {times.teacher_step:.3g} s")
    if times.ibmd_update is not None:
        measured.append(f"IBMD update {times.ibmd_update:.3g} s")
    measured.append(f"one image's network evaluation {times.forward_image * 1e3:.3g} ms")
    if times.forward_single is not None:
        measured.append(f"at batch 1 {times.forward_single * 1e3:.3g} ms")
    if times.report_resample is not None:
        measured.append(f"report {times.report_resample * 1e3:.3g} ms per model and resample")
    if times.inception_image is not None:
        measured.append(f"Inception {times.inception_image:.3g} s/image")
    lines.append(f"  measured: {', '.join(measured)} (probe {times.probe:.0f} s, not training)")
    for stage, (bf16, float32) in times.precision_seconds.items():
        name = "teacher step" if stage == "teacher" else "IBMD update"
        lines.append(
            f"  precision ({stage}.cpu_bf16: auto): {name} {bf16:.3g} s in bf16, {float32:.3g} s in "
            f"float32; runs in {times.precision[stage]}"
        )
    for key, configured in plan.configured.items():
        planned = plan.planned[key]
        origin = "set explicitly, kept" if key in plan.explicit else "configured"
        if planned == configured:
            lines.append(f"  {key}: {planned:,} ({origin})")
        else:
            lines.append(f"  {key}: {planned:,} planned by the budget (configured {configured:,})")
    stages = ", ".join(f"{name} {_minutes(seconds)}" for name, seconds in plan.stages.items())
    lines.append(f"  expected: {stages}")
    budget = "no budget"
    if plan.target_seconds is not None:
        budget = f"budget {plan.budget_minutes:g} min"
        if plan.margin:
            budget += f", planned within {_minutes(plan.target_seconds)} for a {plan.margin:.0%} margin"
    path = "fewer steps" if plan.scaled else "the configured steps"
    lines.append(f"  expected total {_minutes(plan.expected_seconds)} ({budget}; {path})")
    if plan.note:
        lines.append(f"  note: {plan.note}")
    lines.extend(f"  quality cost: {line}" for line in plan.quality)
    if plan.scaled:
        lines.append(
            "  to run the configured steps: --params budget.minutes=null (or set "
            "teacher.train.steps / distill.train.steps explicitly)"
        )
    return "\n".join(lines)


def format_revision(plan: BudgetPlan) -> str:
    """The block printed when the distillation starts with a revised plan
    (:func:`revise_distillation`): the time taken so far against the first plan's, the
    distillation's updates as revised, the expected total and the quality cost."""
    first = plan.first or plan
    key = DISTILL_STEPS
    lines = [
        f"run plan revised before the distillation: the run has taken {_minutes(plan.elapsed or 0.0)}, "
        f"its plan expected {_minutes(plan.expected_by_now or 0.0)} by now",
        f"  {key}: {plan.planned[key]:,} (planned at the start {first.planned[key]:,}; configured "
        f"{plan.configured[key]:,})",
    ]
    stages = ", ".join(f"{name} {_minutes(seconds)}" for name, seconds in plan.stages.items())
    lines.append(f"  expected: {stages}")
    lines.append(
        f"  expected total {_minutes(plan.expected_seconds)} (budget {plan.budget_minutes:g} min, "
        f"planned within {_minutes(plan.target_seconds or 0.0)})"
    )
    if plan.note:
        lines.append(f"  note: {plan.note}")
    lines.extend(f"  quality cost: {line}" for line in plan.quality)
    return "\n".join(lines)
