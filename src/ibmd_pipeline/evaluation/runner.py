"""Evaluating the teacher at several NFE and the student on the same test images and seeds.

An evaluation has four parts:

1. :func:`prepare_evaluation` loads and checks everything before any sampling: both checkpoints
   against the test data, the student's NFE, the cached references, the metric weights.
2. The teacher's evaluation (:func:`evaluate_teacher`): the corrupted input and the teacher at
   every NFE (and sampler mode) restore the evaluated images at every seed and are measured per
   image (:mod:`ibmd_pipeline.evaluation.measure`). It does not depend on the student, so the
   ``evaluate_teacher`` pipeline caches it in the catalog (``teacher_evaluation``), keyed by the
   teacher's catalog version and the settings that shape it (:func:`teacher_evaluation_key`).
3. The student at each NFE is measured the same way (:func:`score_students`), and its draws are
   compared with the reference teacher's (energy distance).
4. :func:`build_report` turns the measurements into the report (``metrics.json``, keys declared
   in :mod:`ibmd_pipeline.evaluation.schema`): every metric with its 95% interval over images,
   the differences between each student and each teacher run with verdicts drawn from their
   intervals (:mod:`ibmd_pipeline.evaluation.summary`), and the speed of every model, timed
   together at the end in interleaved rounds (:func:`time_models`).

Distributed evaluation (``evaluate.distributed``, as :func:`~ibmd_pipeline.engine.launch.launch_mode`
decides: ``nproc_per_node`` local workers, or the processes of ``torchrun``/``srun``): every rank
loads the setup, restores and measures its own sampling batches of every run, and the per-image
values, features, samples and draws are gathered (:func:`~ibmd_pipeline.evaluation.measure.measure_run`);
rank 0 then times the models and builds the report exactly as one process does, and only it
returns a result (the other ranks return None).

PSNR is capped at :data:`PSNR_CAP_DB` per image: identical images have an infinite PSNR, which
standard JSON cannot hold. A metric that is disabled or cannot be measured is ``null`` and
``reasons`` says why; the report never holds NaN or infinity.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.distill.student import LoadedStudent, student_from_checkpoint
from ibmd_pipeline.engine.config import config_to_dict, parse_config
from ibmd_pipeline.engine.distributed import DistContext
from ibmd_pipeline.engine.launch import launch_mode, run_data_parallel
from ibmd_pipeline.evaluation.config import EvaluateConfig, speed_baseline_nfe
from ibmd_pipeline.evaluation.measure import (
    CORRUPTED,
    PSNR_CAP_DB,
    EvaluatedImages,
    MetricSuite,
    ModelRun,
    RunMeasurement,
    add_closeness,
    measure_corrupted,
    measure_run,
    measurements_from_bundle,
    measurements_to_bundle,
    plan_run,
    resolve_student_nfe,
    student_runs,
    teacher_runs,
)
from ibmd_pipeline.evaluation.references import (
    StaleReferenceError,
    check_references,
    check_teacher_evaluation,
    evaluated_subset,
    feature_array,
    images_fingerprint,
    state_fingerprint,
)
from ibmd_pipeline.evaluation.report import grid_columns
from ibmd_pipeline.evaluation.schema import (
    BootstrapFacts,
    Checkpoints,
    ClassifierFacts,
    ClosenessFacts,
    Comparison,
    ElapsedSeconds,
    EvaluationReport,
    FIDFacts,
    MetricRecord,
    ModelFacts,
    ProtocolFacts,
    Scores,
    SpeedFacts,
    StudentFacts,
    TeacherFacts,
    WeightsFacts,
    check_report,
    find_comparison,
)
from ibmd_pipeline.evaluation.summary import DIRECTIONS, Summarizer
from ibmd_pipeline.metrics.speed import RoundRobinTiming, device_description, time_round_robin
from ibmd_pipeline.teacher.model import LoadedTeacher, teacher_from_checkpoint

__all__ = [
    "METRICS",
    "TEACHER_EVALUATION_KIND",
    "EvaluationResult",
    "EvaluationSetup",
    "build_report",
    "evaluate_teacher",
    "prepare_evaluation",
    "run_evaluation",
    "score_students",
    "teacher_evaluation_key",
    "time_models",
]

logger = logging.getLogger(__name__)

#: Metrics of every record, in table order.
METRICS: tuple[str, ...] = (
    "fid",
    "kid",
    "fd_classifier",
    "kid_classifier",
    "lpips",
    "ca",
    "psnr",
    "ssim",
    "consistency",
    "energy_distance",
    "diversity",
)
#: ``kind`` of the cached teacher evaluation bundle.
TEACHER_EVALUATION_KIND = "teacher_evaluation"
# Which ``MetricSuite.reasons`` entry makes each metric null.
_REASON_OF = {
    "fid": "fid",
    "kid": "fid",
    "fd_classifier": "ca",
    "kid_classifier": "ca",
    "ca": "ca",
    "lpips": "lpips",
    "ssim": "ssim",
    "consistency": "consistency",
    "energy_distance": "closeness",
    "diversity": "closeness",
}


@dataclass
class EvaluationResult:
    """The JSON-ready ``report`` and the first ``grid_rows`` images of each run for the grid.

    ``samples`` maps ``"corrupted"``, ``"clean"``, ``"mask"`` (inpainting) and every run's label
    (``"teacher@100"``, ``"student@1"``) to ``(rows, C, H, W)`` CPU tensors.
    """

    report: EvaluationReport
    samples: dict[str, Tensor]


@dataclass
class EvaluationSetup:
    """Everything an evaluation needs, loaded and checked before any sampling."""

    config: EvaluateConfig
    teacher: LoadedTeacher
    student: LoadedStudent | None
    student_nfe: tuple[int, ...]
    data: EvaluatedImages
    suite: MetricSuite
    task: dict[str, Any]
    image_size: int
    channels: int
    device: torch.device
    dataset: str
    fid_reference: Mapping[str, Any] | None
    classifier: Mapping[str, Any] | None
    # "teacher" / "student" -> bfloat16 autocast in training as the checkpoint records it (None:
    # not recorded, e.g. an imported teacher or an older checkpoint)
    trained_bf16: dict[str, bool | None]
    # "teacher" / "student" -> training steps (generator updates) as the checkpoint records them:
    # what ran, after any time budget (None: not recorded)
    trained_steps: dict[str, int | None]

    def teacher_runs(self) -> list[ModelRun]:
        """The main sampler at every NFE, then every further sampler mode."""
        runs = teacher_runs(self.teacher, self.config.teacher_nfe, self.config.sampler)
        for mode in self.config.teacher_modes:
            runs += teacher_runs(self.teacher, self.config.teacher_nfe, mode, model=f"teacher_{mode}")
        return runs

    def student_runs(self) -> list[ModelRun]:
        return [] if self.student is None else student_runs(self.student, self.student_nfe)

    @property
    def closeness_label(self) -> str:
        return f"teacher@{self.config.closeness_nfe}"


def _task_config(task: Mapping[str, Any]) -> TaskConfig | None:
    return parse_config(TaskConfig, task, "task") if task.get("kind") else None


def prepare_evaluation(
    pairs_test: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    student_checkpoint: Mapping[str, Any] | None,
    config: EvaluateConfig,
    *,
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
    device: torch.device | str = "cpu",
    dataset: str = "",
    progress: bool = True,
    suite: MetricSuite | None = None,
) -> EvaluationSetup:
    """Load and check everything before any sampling (see :func:`run_evaluation`); without a
    student checkpoint, the setup of the teacher's evaluation alone."""
    device = torch.device(device)
    task = dict(pairs_test.get("task") or {})
    size, channels = int(pairs_test["clean"].shape[-1]), int(pairs_test["clean"].shape[1])
    checks = {"task_kind": task.get("kind"), "image_size": size, "channels": channels}
    teacher = teacher_from_checkpoint(teacher_checkpoint, use_ema=config.use_ema, device=device, **checks)
    student, student_nfe = None, ()
    if student_checkpoint is not None:
        student = student_from_checkpoint(student_checkpoint, use_ema=config.use_ema, device=device, **checks)
        student_nfe = resolve_student_nfe(config, student.nfe)
    check_references(pairs_test, config, fid_reference, classifier)
    data = EvaluatedImages.from_subset(evaluated_subset(pairs_test, config))
    if suite is None:
        suite = MetricSuite.build(
            config,
            device=device,
            fid_reference=fid_reference,
            classifier=classifier,
            labelled=data.labels is not None,
            image_size=data.image_size,
            progress=progress,
            task=_task_config(task),
        )
    if not config.closeness.enabled:
        suite.reasons.setdefault("closeness", "disabled (evaluate.closeness.enabled: false)")
    return EvaluationSetup(
        config,
        teacher,
        student,
        student_nfe,
        data,
        suite,
        task,
        size,
        channels,
        device,
        dataset,
        fid_reference,
        classifier,
        trained_bf16={
            "teacher": teacher_checkpoint.get("autocast_bf16"),
            "student": None if student_checkpoint is None else student_checkpoint.get("autocast_bf16"),
        },
        trained_steps={
            "teacher": _recorded_steps(teacher_checkpoint),
            "student": None if student_checkpoint is None else _recorded_steps(student_checkpoint),
        },
    )


def _recorded_steps(checkpoint: Mapping[str, Any]) -> int | None:
    step = checkpoint.get("step")
    return int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------------------------
# The teacher's evaluation (cached between students)


def teacher_evaluation_key(setup: EvaluationSetup) -> dict[str, Any]:
    """What the teacher's measurements depend on: the teacher, the test data, the classifier, the
    metric weights and the settings that shape restorations and per-image values."""
    config = setup.config
    classifier = setup.classifier or {}
    teacher_identity = setup.teacher.version or state_fingerprint(setup.teacher.predictor.state_dict())
    classifier_identity = None
    if setup.suite.classifier is not None:
        classifier_identity = classifier.get("catalog_version") or state_fingerprint(classifier["model"])
    return {
        "teacher": teacher_identity,
        "test_images": images_fingerprint(setup.data.clean) + f"|{setup.data.count}",
        "classifier": classifier_identity,
        "weights": setup.suite.weights,
        "reasons": dict(sorted(setup.suite.reasons.items())),
        "settings": {
            "num_images": config.num_images,
            "teacher_nfe": list(config.teacher_nfe),
            "teacher_max_images": {str(k): v for k, v in sorted(config.teacher_max_images.items())},
            "sampler": config.sampler,
            "teacher_modes": list(config.teacher_modes),
            "seeds": list(config.seeds),
            "batch_size": config.batch_size,
            "use_ema": config.use_ema,
            "grid_rows": config.grid_rows,
            "noise": "one generator per sampling batch (measure.batch_seed)",
            "fid": {k: v for k, v in config_to_dict(config.fid).items() if k != "batch_size"},
            "lpips": config_to_dict(config.lpips),
            "closeness": {**config_to_dict(config.closeness), "teacher_nfe": config.closeness_nfe},
        },
    }


def _measure_teacher(
    setup: EvaluationSetup, progress: bool, ctx: DistContext | None = None
) -> tuple[list[RunMeasurement], dict[str, float]]:
    """The corrupted input and every teacher run, measured (each run's batches shared among the
    ranks of ``ctx``); closeness against the reference run."""
    config, data = setup.config, setup.data
    elapsed: dict[str, float] = {}
    tick = time.perf_counter()
    measurements = [measure_corrupted(data, plan_run(config, data.count), setup.suite)]
    elapsed[CORRUPTED] = time.perf_counter() - tick
    for run in setup.teacher_runs():
        tick = time.perf_counter()
        plan = plan_run(config, data.count, run.nfe, teacher=True)
        logger.info(
            "teacher evaluation: %s on %d images at seeds %s", run.label, plan.images, list(plan.seeds)
        )
        measurements.append(
            measure_run(
                run, data, plan, setup.suite, batch_size=config.batch_size, progress=progress, ctx=ctx
            )
        )
        elapsed[run.label] = time.perf_counter() - tick
    by_label = {m.label: m for m in measurements}
    reference = by_label.get(setup.closeness_label)
    if reference is not None and reference.draws is not None:
        for measurement in measurements[1:]:
            if measurement is not reference:
                add_closeness(measurement, reference)
        add_closeness(reference, reference, keep_draws=True)
    return measurements, elapsed


def evaluate_teacher(
    pairs_test: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    config: EvaluateConfig,
    *,
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    suite: MetricSuite | None = None,
) -> dict[str, Any] | None:
    """The teacher's evaluation as a catalog bundle (``teacher_evaluation``): the measurements of
    the corrupted input and of the teacher at every NFE and sampler mode, with their key.

    On several processes (``evaluate.distributed``, module docstring) rank 0's bundle comes back;
    ranks other than 0 of a launcher's job get None."""
    args = (pairs_test, teacher_checkpoint, fid_reference, classifier, progress, suite)
    if launch_mode(config.distributed) == "in_process":
        return _evaluate_teacher_on_rank(DistContext.single_process(device), config, *args)
    return run_data_parallel(
        _evaluate_teacher_on_rank, config, *args, device=device, key="evaluate.distributed"
    )


def _evaluate_teacher_on_rank(
    ctx: DistContext,
    config: EvaluateConfig,
    pairs_test: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
    progress: bool,
    suite: MetricSuite | None,
) -> dict[str, Any] | None:
    progress = progress and ctx.is_main
    setup = prepare_evaluation(
        pairs_test,
        teacher_checkpoint,
        None,
        config,
        fid_reference=fid_reference,
        classifier=classifier,
        device=ctx.device,
        progress=progress,
        suite=suite,
    )
    measurements, elapsed = _measure_teacher(setup, progress, ctx)
    if not ctx.is_main:
        return None
    meta = {
        "kind": TEACHER_EVALUATION_KIND,
        "key": teacher_evaluation_key(setup),
        "elapsed_seconds": elapsed,
    }
    return measurements_to_bundle(measurements, meta)


def _cached_teacher(
    setup: EvaluationSetup, cached: Mapping[str, Any]
) -> tuple[list[RunMeasurement], dict[str, float]]:
    if cached.get("kind") != TEACHER_EVALUATION_KIND:
        raise StaleReferenceError("the cached teacher evaluation is not a teacher evaluation bundle")
    check_teacher_evaluation(cached, teacher_evaluation_key(setup))
    return measurements_from_bundle(cached), dict(cached.get("elapsed_seconds") or {})


# ---------------------------------------------------------------------------------------------
# Students, speed


def score_students(
    setup: EvaluationSetup,
    reference: RunMeasurement | None,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> tuple[list[RunMeasurement], dict[str, float]]:
    """Measure the student at every evaluated NFE (its batches shared among the ranks of
    ``ctx``); closeness against the reference teacher run."""
    measurements, elapsed = [], {}
    for run in setup.student_runs():
        tick = time.perf_counter()
        plan = plan_run(setup.config, setup.data.count)
        measurement = measure_run(
            run,
            setup.data,
            plan,
            setup.suite,
            batch_size=setup.config.batch_size,
            progress=progress,
            ctx=ctx,
        )
        if reference is not None:
            add_closeness(measurement, reference)
        measurements.append(measurement)
        elapsed[run.label] = time.perf_counter() - tick
    return measurements, elapsed


def time_models(
    setup: EvaluationSetup, runs: list[ModelRun], progress: bool = False
) -> dict[str, dict[str, RoundRobinTiming]]:
    """Latency (batch of one) and throughput (``speed.batch_size``) of every run, timed together
    in interleaved rounds with a fixed thread count (:func:`~ibmd_pipeline.metrics.speed.time_round_robin`).

    Returns ``{label: {"latency": timing, "throughput": timing}}``; every call restores the first
    test images (repeated to fill the batch) with a generator seeded with ``evaluate.seed``.
    ``progress``: a bar over the timed calls with the remaining time.
    """
    config, device = setup.config, setup.device
    size = config.speed.batch_size
    xT, mask = setup.data.corrupted, setup.data.mask
    repeat = math.ceil(size / xT.shape[0])
    batch = xT.repeat(repeat, 1, 1, 1)[:size].to(device, torch.float32)
    batch_mask = None if mask is None else mask.repeat(repeat, 1, 1, 1)[:size].to(device, torch.float32)

    def call(run: ModelRun, images: Tensor, images_mask: Tensor | None):
        def once() -> Tensor:
            with torch.no_grad():
                return run.restore(
                    images, images_mask, torch.Generator(device=device).manual_seed(config.seed)
                )

        return once

    calls = {}
    for run in runs:
        calls[f"{run.label}|latency"] = call(run, batch[:1], None if batch_mask is None else batch_mask[:1])
        calls[f"{run.label}|throughput"] = call(run, batch, batch_mask)
    speed = config.speed
    logger.info("timing %d models together: %d rounds, batch 1 and %d", len(runs), speed.repeats, size)
    timings = time_round_robin(
        calls,
        rounds=speed.repeats,
        warmup=speed.warmup,
        min_seconds=speed.min_seconds,
        threads=speed.threads or None,
        device=device,
        progress=progress,
    )
    result: dict[str, dict[str, RoundRobinTiming]] = {}
    for key, timing in timings.items():
        label, kind = key.split("|")
        result.setdefault(label, {})[kind] = timing
    return result


# ---------------------------------------------------------------------------------------------
# The report


def _summarizer(setup: EvaluationSetup) -> Summarizer:
    config, suite = setup.config, setup.suite
    inception = None
    if suite.fid is not None and setup.fid_reference is not None:
        inception = feature_array(setup.fid_reference["features"])
    classifier_reference = None
    if suite.classifier is not None and setup.data.labels is not None:
        outputs = suite.classifier_features(setup.data.clean)
        classifier_reference = None if outputs is None else outputs[0]
    return Summarizer(
        config.bootstrap,
        config.kid,
        inception_reference=inception,
        inception_paired=config.fid.reference == "evaluated",
        classifier_reference=classifier_reference,
    )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scores(summary: Mapping[str, Any]) -> Scores:
    return Scores(
        **{metric: _finite_or_none(summary[metric]) for metric in METRICS},
        kid_std=summary["kid_std"],
        kid_classifier_std=summary["kid_classifier_std"],
        images=summary["images"],
        intervals=summary["intervals"],
    )


def _record(
    measurement: RunMeasurement,
    summary: Mapping[str, Any],
    timing: Mapping[str, RoundRobinTiming],
    batch_size: int,
) -> MetricRecord:
    throughput, latency = timing["throughput"], timing["latency"]
    return MetricRecord(
        model=measurement.model,
        nfe=measurement.nfe,
        sampler=measurement.sampler,
        label=measurement.label,
        seed=measurement.seeds[0],
        seeds=list(measurement.seeds),
        **_scores(summary),
        sec_per_image=throughput.median / batch_size,
        sec_per_image_iqr=throughput.iqr / batch_size,
        images_per_sec=batch_size / throughput.median,
        latency_seconds=latency.median,
        latency_iqr_seconds=latency.iqr,
    )


def _with_speedups(records: list[MetricRecord]) -> None:
    """Every student record gains its speed-ups over the teacher (main sampler) at each NFE."""
    teachers = {r["nfe"]: r for r in records if r["model"] == "teacher"}
    for record in records:
        if record["model"] == "student":
            record["speedup_vs_teacher"] = {
                str(nfe): t["sec_per_image"] / record["sec_per_image"] for nfe, t in sorted(teachers.items())
            }
            record["latency_speedup_vs_teacher"] = {
                str(nfe): t["latency_seconds"] / record["latency_seconds"]
                for nfe, t in sorted(teachers.items())
            }


def _notes(setup: EvaluationSetup, versions: Checkpoints, world_size: int = 1) -> list[str]:
    """What a reader should know: a student of another teacher, FID statistics of other weights,
    images restored on several processes."""
    notes = []
    if world_size > 1:
        notes.append(
            f"restored and measured on {world_size} processes (rank r: sampling batches r, "
            f"r + {world_size}, ...); timed on rank 0 alone"
        )
    if (
        versions["teacher_of_student"] is not None
        and versions["teacher"] is not None
        and (versions["teacher_of_student"] != versions["teacher"])
    ):
        notes.append(
            f"the student was distilled from teacher version {versions['teacher_of_student']}, "
            f"the teacher evaluated here is version {versions['teacher']}"
        )
        logger.warning(notes[-1])
    fid = setup.suite.fid
    reference_weights = (setup.fid_reference or {}).get("weights")
    if fid is not None and reference_weights not in (None, fid.weights_source):
        notes.append(
            f"FID reference features were computed with {reference_weights}, "
            f"the evaluation's Inception is {fid.weights_source}"
        )
    return notes


def _check_json(report: Mapping[str, Any]) -> None:
    try:
        json.dumps(report, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"the evaluation report holds a non-finite number: {err}") from err


def _reasons(setup: EvaluationSetup, summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """metric -> why it is null, for every metric that some model's record lacks (the corrupted
    input has no draws: it is no model)."""
    reasons = {}
    for metric in METRICS:
        models = [s for label, s in summaries.items() if label != CORRUPTED]
        if all(s[metric] is not None for s in models):
            continue
        reason = setup.suite.reasons.get(_REASON_OF[metric])
        if reason is None and metric in ("energy_distance", "diversity"):
            reason = f"the reference teacher {setup.closeness_label} has fewer than 2 draws per image"
        reasons[metric] = reason or "not measured"
    return reasons


@dataclass
class Scoring:
    """Every measurement of one evaluation and how long each took."""

    corrupted: RunMeasurement
    teachers: list[RunMeasurement]
    students: list[RunMeasurement]
    timings: dict[str, dict[str, RoundRobinTiming]]
    elapsed: dict[str, float]
    teacher_evaluation_version: str | None

    @property
    def models(self) -> list[RunMeasurement]:
        return self.teachers + self.students


def build_report(
    setup: EvaluationSetup, scoring: Scoring, elapsed_speed: float, started: float, world_size: int = 1
) -> EvaluationReport:
    """The report of one evaluation, checked against its declaration and to be standard JSON."""
    tick = time.perf_counter()
    config, suite, device = setup.config, setup.suite, setup.device
    summarizer = _summarizer(setup)
    summaries = {m.label: summarizer.summarize(m) for m in [scoring.corrupted, *scoring.models]}
    records = [
        _record(m, summaries[m.label], scoring.timings[m.label], config.speed.batch_size)
        for m in scoring.models
    ]
    _with_speedups(records)
    comparisons: list[Comparison] = [
        Comparison(**summarizer.compare(student, teacher))
        for student in scoring.students
        for teacher in scoring.teachers
    ]
    baseline = f"teacher@{speed_baseline_nfe(config.teacher_nfe)}"
    for record in records:
        if record["model"] == "student":
            match = find_comparison(comparisons, record["label"], baseline)
            record["lpips_win_rate"] = (match.get("lpips_win_rate") or {}).get("rate") if match else None

    teacher, student = setup.teacher, setup.student
    versions = Checkpoints(
        teacher=teacher.version,
        student=student.version,
        classifier=(setup.classifier or {}).get("catalog_version"),
        teacher_of_student=student.config.get("teacher_version"),
        teacher_evaluation=scoring.teacher_evaluation_version,
    )
    labels = setup.data.labels
    corrupted = _scores(summaries[CORRUPTED])
    fid_measured = suite.fid is not None
    teacher_plan = plan_run(config, setup.data.count)
    summary_seconds = time.perf_counter() - tick
    report = EvaluationReport(
        records=records,
        task=setup.task.get("kind"),
        task_config=setup.task,
        dataset=setup.dataset,
        image_size=setup.image_size,
        channels=setup.channels,
        num_images=setup.data.count,
        seed=config.seed,
        sampler=config.sampler,
        device=device_description(device),
        weights=WeightsFacts(**suite.weights),
        checkpoints=versions,
        models=ModelFacts(
            teacher=TeacherFacts(
                bridge=teacher.bridge.kind,
                conditional=teacher.conditional,
                use_ema=config.use_ema,
                samplers=[config.sampler, *config.teacher_modes],
                trained_bf16=setup.trained_bf16["teacher"],
                trained_steps=setup.trained_steps["teacher"],
            ),
            student=StudentFacts(
                trained_nfe=student.nfe,
                noise=student.noise,
                evaluated_nfe=list(setup.student_nfe),
                trained_bf16=setup.trained_bf16["student"],
                trained_steps=setup.trained_steps["student"],
            ),
        ),
        classifier=ClassifierFacts(
            ceiling=suite.accuracy(setup.data.clean, labels),
            floor=corrupted["ca"],
            reason=suite.reasons.get("ca"),
            # the classifier's own accuracy on the whole clean test split (the subset's is "ceiling")
            clean_test_accuracy=(
                (setup.classifier or {}).get("clean_test_accuracy") if suite.classifier else None
            ),
        ),
        corrupted_input=corrupted,
        reasons=_reasons(setup, summaries),
        fid=FIDFacts(
            dims=config.fid.dims if fid_measured else None,
            reference=config.fid.reference if fid_measured else None,
            reference_images=int((setup.fid_reference or {}).get("n", 0)) if fid_measured else None,
        ),
        protocol=ProtocolFacts(
            seeds=list(config.seeds),
            images=setup.data.count,
            inception_images=teacher_plan.inception_images if fid_measured else 0,
            inception_seeds=config.fid.seeds if fid_measured else 0,
            closeness=ClosenessFacts(
                teacher=setup.closeness_label if config.closeness.enabled else None,
                images=teacher_plan.closeness_images,
                draws=config.closeness.draws if config.closeness.enabled else 0,
            ),
            bootstrap=BootstrapFacts(
                resamples=config.bootstrap.resamples,
                confidence=config.bootstrap.confidence,
                seed=config.bootstrap.seed,
                means="paired bootstrap over images, percentile interval",
                sets="half-samples without replacement, centred on the full-sample value",
            ),
            kid={"subset_size": config.kid.subset_size, "subsets": config.kid.subsets},
            lpips_min_size=config.lpips.min_size,
            directions=dict(DIRECTIONS),
        ),
        comparisons=comparisons,
        speed=SpeedFacts(
            batch_size=config.speed.batch_size,
            repeats=config.speed.repeats,
            min_seconds=config.speed.min_seconds,
            warmup=config.speed.warmup,
            threads=config.speed.threads or torch.get_num_threads(),
            device=device_description(device),
            baseline=baseline,
            seconds_per_batch={k: list(t["throughput"].seconds) for k, t in scoring.timings.items()},
            latency_seconds={k: list(t["latency"].seconds) for k, t in scoring.timings.items()},
            loops={
                k: {kind: t[kind].loops for kind in ("latency", "throughput")}
                for k, t in scoring.timings.items()
            },
        ),
        psnr_cap_db=PSNR_CAP_DB,
        notes=_notes(setup, versions, world_size),
        elapsed_seconds=ElapsedSeconds(
            restore=scoring.elapsed,
            metrics={"summary": summary_seconds},
            speed={"round_robin": elapsed_speed},
            total=time.perf_counter() - started,
        ),
        config=config_to_dict(config),
        grid_columns=[],
    )
    return report


def run_evaluation(
    pairs_test: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    student_checkpoint: Mapping[str, Any],
    config: EvaluateConfig,
    *,
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
    device: torch.device | str = "cpu",
    dataset: str = "",
    progress: bool = True,
    suite: MetricSuite | None = None,
    teacher_evaluation: Mapping[str, Any] | None = None,
) -> EvaluationResult | None:
    """Evaluate teacher and student on the first ``num_images`` test images at every seed.

    Before any sampling (:func:`prepare_evaluation`): both checkpoints are checked against the
    test data's task, image size and channels
    (:class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError`), the student's NFE against
    its trained N (``ConfigError``), the cached references and the cached ``teacher_evaluation``
    (when given) against the test data, teacher and settings
    (:class:`~ibmd_pipeline.evaluation.references.StaleReferenceError`) and the metric weights
    (:class:`~ibmd_pipeline.metrics.weights.WeightsUnavailableError`). Without a cached teacher
    evaluation the teacher is measured here. ``suite`` replaces the metric networks (tests).

    On several processes (``evaluate.distributed``, module docstring) the images are restored
    and measured by all of them and rank 0's result comes back; ranks other than 0 of a
    launcher's job get None.
    """
    args = (
        pairs_test,
        teacher_checkpoint,
        student_checkpoint,
        fid_reference,
        classifier,
        dataset,
        progress,
        suite,
        teacher_evaluation,
    )
    if launch_mode(config.distributed) == "in_process":
        return _evaluate_on_rank(DistContext.single_process(device), config, *args)
    payload = run_data_parallel(_evaluation_payload, config, *args, device=device, key="evaluate.distributed")
    return None if payload is None else EvaluationResult(report=payload["report"], samples=payload["samples"])


def _evaluation_payload(ctx: DistContext, config: EvaluateConfig, *args: Any) -> dict[str, Any] | None:
    """:func:`_evaluate_on_rank` as tensors and plain values (what a spawned worker returns)."""
    result = _evaluate_on_rank(ctx, config, *args)
    return None if result is None else {"report": result.report, "samples": result.samples}


def _evaluate_on_rank(
    ctx: DistContext,
    config: EvaluateConfig,
    pairs_test: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    student_checkpoint: Mapping[str, Any],
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
    dataset: str,
    progress: bool,
    suite: MetricSuite | None,
    teacher_evaluation: Mapping[str, Any] | None,
) -> EvaluationResult | None:
    """One rank's part of :func:`run_evaluation`: all ranks restore and measure, rank 0 times
    the models and reports."""
    progress = progress and ctx.is_main
    started = time.perf_counter()
    setup = prepare_evaluation(
        pairs_test,
        teacher_checkpoint,
        student_checkpoint,
        config,
        fid_reference=fid_reference,
        classifier=classifier,
        device=ctx.device,
        dataset=dataset,
        progress=progress,
        suite=suite,
    )
    if teacher_evaluation is not None:
        measured, elapsed = _cached_teacher(setup, teacher_evaluation)
        version = teacher_evaluation.get("catalog_version")
    else:
        measured, elapsed = _measure_teacher(setup, progress, ctx)
        version = None
    corrupted, teachers = measured[0], measured[1:]
    reference = next((m for m in teachers if m.label == setup.closeness_label and m.draws is not None), None)
    students, student_elapsed = score_students(setup, reference, progress, ctx)
    if not ctx.is_main:
        return None
    tick = time.perf_counter()
    timings = time_models(setup, setup.teacher_runs() + setup.student_runs(), progress=progress)
    elapsed_speed = time.perf_counter() - tick
    scoring = Scoring(corrupted, teachers, students, timings, {**elapsed, **student_elapsed}, version)
    report = build_report(setup, scoring, elapsed_speed, started, ctx.world_size)
    samples = _samples(setup, scoring)
    report["grid_columns"] = [title for title, _ in grid_columns(report, samples)]
    check_report(report)
    _check_json(report)
    return EvaluationResult(report=report, samples=samples)


def _samples(setup: EvaluationSetup, scoring: Scoring) -> dict[str, Tensor]:
    rows = min(setup.config.grid_rows, setup.data.count)
    samples = {"corrupted": setup.data.corrupted[:rows], "clean": setup.data.clean[:rows]}
    if setup.data.mask is not None:
        samples["mask"] = setup.data.mask[:rows]
    for measurement in scoring.models:
        samples[measurement.label] = measurement.samples
    return samples
