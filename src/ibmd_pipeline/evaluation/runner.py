"""Running the teacher and the student at several NFE on the same test images, and scoring them.

Every model at every NFE restores the same first ``num_images`` test images, in the same
batches, each run with a fresh ``torch.Generator`` seeded with ``evaluate.seed``: runs are
reproducible and all models see the same noise stream (common random numbers, so differences
between rows come from the models, not from the draws). The corrupted input xT itself is
scored as a baseline, and the classifier's accuracy on the clean and on the corrupted images
frame every CA (ceiling and floor).

Metrics per run: FID against the cached reference statistics, LPIPS / PSNR / SSIM against the
clean images, CA (top-1, in percent) against the labels, and wall-clock speed at
``evaluate.speed.batch_size``. PSNR is capped at :data:`PSNR_CAP_DB` per image: identical images
have an infinite PSNR, which standard JSON cannot hold (and a mean with one ``inf`` says nothing
about the other images). A metric that is disabled or cannot be measured is ``null`` and
``reasons`` says why.

The run has three parts: :func:`prepare_evaluation` loads and checks everything before any
sampling, :func:`score_runs` is the scoring loop, and :func:`build_report` turns its measurements
into the report (``metrics.json``), whose keys are declared in
:mod:`ibmd_pipeline.evaluation.schema`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.distill.student import LoadedStudent, student_from_checkpoint
from ibmd_pipeline.engine.config import ConfigError, config_to_dict
from ibmd_pipeline.evaluation.config import EvaluateConfig
from ibmd_pipeline.evaluation.references import (
    build_fid_scorer,
    build_lpips_scorer,
    check_references,
    evaluated_subset,
)
from ibmd_pipeline.evaluation.report import grid_columns
from ibmd_pipeline.evaluation.schema import (
    Checkpoints,
    ClassifierFacts,
    ElapsedSeconds,
    EvaluationReport,
    FIDFacts,
    MetricRecord,
    ModelFacts,
    Scores,
    SpeedFacts,
    StudentFacts,
    TeacherFacts,
    WeightsFacts,
    check_report,
)
from ibmd_pipeline.metrics.classifier import classifier_accuracy, load_classifier
from ibmd_pipeline.metrics.fid import FIDScorer
from ibmd_pipeline.metrics.image_quality import psnr_per_image, ssim
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.metrics.speed import SamplingSpeed, device_description, speedup, time_sampling
from ibmd_pipeline.teacher.model import LoadedTeacher, teacher_from_checkpoint

__all__ = [
    "LPIPS_MIN_SIZE",
    "METRICS",
    "PSNR_CAP_DB",
    "STUDENT_NFE_CHOICES",
    "EvaluationResult",
    "EvaluationSetup",
    "MetricSuite",
    "ModelRun",
    "Scoring",
    "build_report",
    "measure_speed",
    "prepare_evaluation",
    "restore_images",
    "resolve_student_nfe",
    "run_evaluation",
    "score_runs",
    "student_runs",
    "teacher_runs",
]

logger = logging.getLogger(__name__)

#: Per-image PSNR cap in dB (identical images would give inf; 100 dB is an MSE of 1e-10).
PSNR_CAP_DB = 100.0
#: Smallest image side LPIPS' AlexNet accepts (its strided convolutions and pools reduce 30 px to nothing).
LPIPS_MIN_SIZE = 31
#: Quality metrics of every record, in table order.
METRICS: tuple[str, ...] = ("fid", "lpips", "ca", "psnr", "ssim")
#: Step counts a multi-step student is evaluated at by default (those up to its trained N).
STUDENT_NFE_CHOICES: tuple[int, ...] = (1, 2, 4)

Restore = Callable[[Tensor, Tensor | None, torch.Generator], Tensor]


@dataclass(frozen=True)
class ModelRun:
    """One model at one NFE: ``restore(xT, mask, generator) -> x0`` for a batch on the device."""

    model: Literal["teacher", "student"]
    nfe: int
    restore: Restore

    @property
    def label(self) -> str:
        return f"{self.model}@{self.nfe}"


def teacher_runs(
    teacher: LoadedTeacher, nfes: Sequence[int], sampler: Literal["ancestral", "deterministic"] = "ancestral"
) -> list[ModelRun]:
    """The teacher's bridge sampler at each NFE (ascending)."""

    def at(nfe: int) -> Restore:
        def restore(xT: Tensor, mask: Tensor | None, generator: torch.Generator) -> Tensor:
            return sample(
                teacher.predictor, xT, teacher.schedule, nfe, mode=sampler, mask=mask, generator=generator
            )

        return restore

    return [ModelRun("teacher", nfe, at(nfe)) for nfe in sorted(nfes)]


def student_runs(student: LoadedStudent, nfes: Sequence[int]) -> list[ModelRun]:
    """The student's generator at each NFE (ascending; each at most its trained N)."""

    def at(nfe: int) -> Restore:
        def restore(xT: Tensor, mask: Tensor | None, generator: torch.Generator) -> Tensor:
            return student.sample(xT, nfe=nfe, mask=mask, generator=generator)

        return restore

    return [ModelRun("student", nfe, at(nfe)) for nfe in sorted(nfes)]


def resolve_student_nfe(
    config: EvaluateConfig, trained_nfe: int, key: str = "evaluate.student_nfe"
) -> tuple[int, ...]:
    """The student's NFE to evaluate: ``student_nfe``, or (null) every one of 1, 2, 4 up to the
    trained N. A listed NFE above N is a :class:`ConfigError`."""
    if config.student_nfe is None:
        return tuple(sorted({n for n in STUDENT_NFE_CHOICES if n <= trained_nfe} | {trained_nfe}))
    too_many = [n for n in config.student_nfe if n > trained_nfe]
    if too_many:
        raise ConfigError(
            key,
            f"lists {too_many}, but the student was trained with {trained_nfe} step(s) and runs at most "
            "that many",
        )
    return tuple(sorted(config.student_nfe))


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


@torch.no_grad()
def restore_images(
    run: ModelRun,
    xT: Tensor,
    mask: Tensor | None,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Restore every image of ``xT`` with ``run`` in batches; one generator seeded with ``seed``
    drives all of them. Returns float32 on the CPU; non-finite output is an error."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs = []
    bar = tqdm(total=xT.shape[0], desc=f"restore {run.label}", unit="img", disable=not progress)
    for part in _batches(xT.shape[0], batch_size):
        batch_mask = None if mask is None else mask[part].to(device, torch.float32)
        outputs.append(run.restore(xT[part].to(device, torch.float32), batch_mask, generator).float().cpu())
        bar.update(part.stop - part.start)
    bar.close()
    restored = torch.cat(outputs)
    if not torch.isfinite(restored).all():
        raise FloatingPointError(f"{run.label} produced non-finite images; the checkpoint is unusable")
    return restored


def measure_speed(
    run: ModelRun, xT: Tensor, mask: Tensor | None, config: EvaluateConfig, device: torch.device | str
) -> SamplingSpeed:
    """Seconds per image of ``run`` at ``evaluate.speed.batch_size`` (warm-up excluded, median of repeats).

    The batch is the first test images, repeated when there are fewer than the batch size.
    """
    device = torch.device(device)
    size = config.speed.batch_size
    repeat = math.ceil(size / xT.shape[0])
    batch = xT.repeat(repeat, 1, 1, 1)[:size].to(device, torch.float32)
    batch_mask = None if mask is None else mask.repeat(repeat, 1, 1, 1)[:size].to(device, torch.float32)

    def once() -> Tensor:
        with torch.no_grad():
            return run.restore(batch, batch_mask, torch.Generator(device=device).manual_seed(config.seed))

    speed = config.speed
    return time_sampling(
        once, size, device, repeats=speed.repeats, warmup=speed.warmup, min_seconds=speed.min_seconds
    )


@dataclass
class MetricSuite:
    """The metric networks of one evaluation; a metric whose network is None is reported as null
    with the reason in ``reasons``."""

    fid: FIDScorer | None
    lpips: LPIPSScorer | None
    classifier: nn.Module | None
    reasons: dict[str, str] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    batch_size: int = 64

    @classmethod
    def build(
        cls,
        config: EvaluateConfig,
        *,
        device: torch.device | str = "cpu",
        fid_reference: Mapping[str, Any] | None = None,
        classifier: Mapping[str, Any] | None = None,
        labelled: bool = True,
        image_size: int | None = None,
        progress: bool = True,
    ) -> MetricSuite:
        """Build the enabled metrics (weights are located here: a missing file fails now, with
        a message that says how to provide it or to disable the metric).

        ``labelled``: whether the evaluated images have class labels (else CA is null);
        ``image_size``: the images' side (LPIPS is null below :data:`LPIPS_MIN_SIZE`).
        """
        device = torch.device(device)
        reasons: dict[str, str] = {}
        fid = lpips = model = None
        if config.fid.enabled:
            fid = build_fid_scorer(config, device, progress)
            if fid_reference is None:
                raise ValueError("FID is enabled but no reference statistics were given")
            fid.set_reference(fid_reference)
        else:
            reasons["fid"] = "disabled (evaluate.fid.enabled: false)"
        if config.lpips.enabled and image_size is not None and image_size < LPIPS_MIN_SIZE:
            reasons["lpips"] = (
                f"LPIPS' AlexNet needs images of at least {LPIPS_MIN_SIZE} px, these have {image_size}"
            )
            logger.warning("LPIPS is not measured: %s", reasons["lpips"])
        elif config.lpips.enabled:
            lpips = build_lpips_scorer(config, device)
        else:
            reasons["lpips"] = "disabled (evaluate.lpips.enabled: false)"
        if not config.ca.enabled:
            reasons["ca"] = "disabled (evaluate.ca.enabled: false)"
        elif not labelled:
            reasons["ca"] = "the evaluation data has no class labels"
        elif classifier is None or classifier.get("model") is None:
            reasons["ca"] = (classifier or {}).get("reason") or "no classifier was trained"
        else:
            model = load_classifier(classifier).to(device)
        return cls(fid, lpips, model, reasons, device, config.batch_size)

    @property
    def weights(self) -> dict[str, str | None]:
        """Where the FID and LPIPS weights came from (``official:<path>`` / ``offline:<package>``)."""
        return {
            "fid": self.fid.weights_source if self.fid is not None else None,
            "lpips": self.lpips.weights_source if self.lpips is not None else None,
        }

    def accuracy(self, images: Tensor, labels: Tensor | None) -> float | None:
        """CA in percent, or None when it is not measured."""
        if self.classifier is None or labels is None:
            return None
        return classifier_accuracy(self.classifier, images, labels, self.batch_size, self.device)

    def score(self, images: Tensor, clean: Tensor, labels: Tensor | None) -> Scores:
        """``{"fid", "lpips", "ca", "psnr", "ssim"}`` of restorations ``images`` (CA in percent,
        PSNR in dB capped per image at :data:`PSNR_CAP_DB`)."""
        return Scores(
            fid=self.fid.score(images) if self.fid is not None else None,
            lpips=self.lpips.score(images, clean) if self.lpips is not None else None,
            ca=self.accuracy(images, labels),
            psnr=psnr_per_image(images, clean).clamp(max=PSNR_CAP_DB).mean().item(),
            ssim=ssim(images, clean),
        )


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
    """Everything an evaluation needs, loaded and checked before any sampling.

    ``subset``: the evaluated test images (``clean``, ``corrupted``, ``mask``?, ``labels``?);
    ``runs``: the teacher at each NFE, then the student at each NFE.
    """

    config: EvaluateConfig
    teacher: LoadedTeacher
    student: LoadedStudent
    student_nfe: tuple[int, ...]
    runs: list[ModelRun]
    subset: dict[str, Any]
    suite: MetricSuite
    task: dict[str, Any]
    image_size: int
    channels: int
    device: torch.device
    dataset: str
    fid_reference: Mapping[str, Any] | None
    classifier: Mapping[str, Any] | None

    @property
    def num_images(self) -> int:
        return int(self.subset["clean"].shape[0])


@dataclass
class Scoring:
    """What the scoring loop measured: the corrupted input's scores, one record per run (before
    speed-ups), each run's speed, the kept samples and the time each stage took."""

    corrupted_scores: Scores
    records: list[MetricRecord]
    speeds: dict[str, SamplingSpeed]
    samples: dict[str, Tensor]
    elapsed: dict[str, dict[str, float]]


def prepare_evaluation(
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
) -> EvaluationSetup:
    """Load and check everything before any sampling (see :func:`run_evaluation`)."""
    device = torch.device(device)
    task = dict(pairs_test.get("task") or {})
    size, channels = int(pairs_test["clean"].shape[-1]), int(pairs_test["clean"].shape[1])
    checks = {"task_kind": task.get("kind"), "image_size": size, "channels": channels}
    teacher = teacher_from_checkpoint(teacher_checkpoint, use_ema=config.use_ema, device=device, **checks)
    student = student_from_checkpoint(student_checkpoint, use_ema=config.use_ema, device=device, **checks)
    student_nfe = resolve_student_nfe(config, student.nfe)
    check_references(pairs_test, config, fid_reference, classifier)
    subset = evaluated_subset(pairs_test, config)
    if suite is None:
        suite = MetricSuite.build(
            config,
            device=device,
            fid_reference=fid_reference,
            classifier=classifier,
            labelled=subset.get("labels") is not None,
            image_size=min(size, int(pairs_test["clean"].shape[-2])),
            progress=progress,
        )
    runs = teacher_runs(teacher, config.teacher_nfe, config.sampler) + student_runs(student, student_nfe)
    return EvaluationSetup(
        config, teacher, student, student_nfe, runs, subset, suite, task, size, channels, device, dataset,
        fid_reference, classifier,
    )


def score_runs(setup: EvaluationSetup, progress: bool = True) -> Scoring:
    """The scoring loop: the corrupted input, then every run restores the evaluated images, is
    scored, and is timed."""
    config, suite = setup.config, setup.suite
    clean, xT = setup.subset["clean"], setup.subset["corrupted"]
    mask, labels = setup.subset.get("mask"), setup.subset.get("labels")
    rows = min(config.grid_rows, setup.num_images)
    logger.info(
        "evaluating %s on %d test images (%s, %s): %s",
        setup.task.get("kind"), setup.num_images, setup.dataset or "data", device_description(setup.device),
        ", ".join(r.label for r in setup.runs),
    )

    elapsed: dict[str, dict[str, float]] = {"restore": {}, "metrics": {}, "speed": {}}
    tick = time.perf_counter()
    corrupted_scores = suite.score(xT, clean, labels)
    elapsed["metrics"]["corrupted_input"] = time.perf_counter() - tick

    samples: dict[str, Tensor] = {"corrupted": xT[:rows], "clean": clean[:rows]}
    if mask is not None:
        samples["mask"] = mask[:rows]
    records: list[MetricRecord] = []
    speeds: dict[str, SamplingSpeed] = {}
    for run in setup.runs:
        tick = time.perf_counter()
        restored = restore_images(
            run, xT, mask, batch_size=config.batch_size, seed=config.seed, device=setup.device,
            progress=progress,
        )
        elapsed["restore"][run.label] = time.perf_counter() - tick
        samples[run.label] = restored[:rows]
        tick = time.perf_counter()
        scores = suite.score(restored, clean, labels)
        elapsed["metrics"][run.label] = time.perf_counter() - tick
        tick = time.perf_counter()
        logger.info("timing %s at batch %d", run.label, config.speed.batch_size)
        speeds[run.label] = measure_speed(run, xT, mask, config, setup.device)
        elapsed["speed"][run.label] = time.perf_counter() - tick
        record = MetricRecord(
            model=run.model,
            nfe=run.nfe,
            **scores,
            sec_per_image=speeds[run.label].seconds_per_image,
            images_per_sec=speeds[run.label].images_per_second,
            seed=config.seed,
        )
        records.append(record)
        logger.info("%s: %s", run.label, {k: record[k] for k in (*METRICS, "sec_per_image")})
    return Scoring(corrupted_scores, records, speeds, samples, elapsed)


def _speed_baseline(teacher_nfe: Sequence[int]) -> int:
    """The teacher NFE the table's speed-up column divides by: 100 (the paper's) when
    evaluated, else the teacher's largest."""
    return 100 if 100 in teacher_nfe else max(teacher_nfe)


def _with_speedups(records: list[MetricRecord], speeds: Mapping[str, SamplingSpeed]) -> list[MetricRecord]:
    """Every student record gains its speed-up over the teacher at each evaluated NFE."""
    teacher_speed = {r["nfe"]: speeds[f"teacher@{r['nfe']}"] for r in records if r["model"] == "teacher"}
    for record in records:
        if record["model"] == "student":
            own = speeds[f"student@{record['nfe']}"]
            record["speedup_vs_teacher"] = {
                str(nfe): speedup(baseline, own) for nfe, baseline in sorted(teacher_speed.items())
            }
    return records


def _notes(setup: EvaluationSetup, versions: Checkpoints) -> list[str]:
    """What a reader should know: a student of another teacher, FID statistics of other weights."""
    notes = []
    if versions["teacher_of_student"] is not None and versions["teacher"] is not None and (
        versions["teacher_of_student"] != versions["teacher"]
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
            f"FID reference statistics were computed with {reference_weights}, "
            f"the evaluation's Inception is {fid.weights_source}"
        )
    return notes


def _check_json(report: Mapping[str, Any]) -> None:
    try:
        json.dumps(report, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"the evaluation report holds a non-finite number: {err}") from err


def build_report(setup: EvaluationSetup, scoring: Scoring, total_seconds: float) -> EvaluationReport:
    """The report (:class:`~ibmd_pipeline.evaluation.schema.EvaluationReport`) of one scoring,
    checked against its declaration and to be standard JSON (no NaN or infinity)."""
    config, suite, device = setup.config, setup.suite, setup.device
    teacher, student = setup.teacher, setup.student
    versions = Checkpoints(
        teacher=teacher.version,
        student=student.version,
        classifier=(setup.classifier or {}).get("catalog_version"),
        teacher_of_student=student.config.get("teacher_version"),
    )
    labels = setup.subset.get("labels")
    fid_measured = suite.fid is not None
    report = EvaluationReport(
        records=_with_speedups(scoring.records, scoring.speeds),
        task=setup.task.get("kind"),
        task_config=setup.task,
        dataset=setup.dataset,
        image_size=setup.image_size,
        channels=setup.channels,
        num_images=setup.num_images,
        seed=config.seed,
        sampler=config.sampler,
        device=device_description(device),
        weights=WeightsFacts(**suite.weights),
        checkpoints=versions,
        models=ModelFacts(
            teacher=TeacherFacts(
                bridge=teacher.bridge.kind, conditional=teacher.conditional, use_ema=config.use_ema
            ),
            student=StudentFacts(
                trained_nfe=student.nfe, noise=student.noise, evaluated_nfe=list(setup.student_nfe)
            ),
        ),
        classifier=ClassifierFacts(
            ceiling=suite.accuracy(setup.subset["clean"], labels),
            floor=scoring.corrupted_scores["ca"],
            reason=suite.reasons.get("ca"),
            # the classifier's own accuracy on the whole clean test split (the subset's is "ceiling")
            clean_test_accuracy=(
                (setup.classifier or {}).get("clean_test_accuracy") if suite.classifier else None
            ),
        ),
        corrupted_input=scoring.corrupted_scores,
        reasons={metric: suite.reasons[metric] for metric in METRICS if metric in suite.reasons},
        fid=FIDFacts(
            dims=config.fid.dims if fid_measured else None,
            reference=config.fid.reference if fid_measured else None,
            reference_images=int((setup.fid_reference or {}).get("n", 0)) if fid_measured else None,
        ),
        speed=SpeedFacts(
            batch_size=config.speed.batch_size,
            repeats=config.speed.repeats,
            min_seconds=config.speed.min_seconds,
            warmup=config.speed.warmup,
            device=device_description(device),
            baseline=f"teacher@{_speed_baseline(config.teacher_nfe)}",
            seconds_per_batch={label: list(s.seconds_per_batch) for label, s in scoring.speeds.items()},
        ),
        psnr_cap_db=PSNR_CAP_DB,
        notes=_notes(setup, versions),
        elapsed_seconds=ElapsedSeconds(**scoring.elapsed, total=total_seconds),
        config=config_to_dict(config),
        grid_columns=[],
    )
    report["grid_columns"] = [title for title, _ in grid_columns(report, scoring.samples)]
    check_report(report)
    _check_json(report)
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
) -> EvaluationResult:
    """Evaluate teacher and student on the first ``num_images`` test images.

    Before any sampling (:func:`prepare_evaluation`): both checkpoints are checked against the
    test data's task, image size and channels
    (:class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError`), the student's NFE against
    its trained N (``ConfigError``), the cached references against the test data
    (:class:`~ibmd_pipeline.evaluation.references.StaleReferenceError`) and the metric weights
    (:class:`~ibmd_pipeline.metrics.weights.WeightsUnavailableError`). ``suite`` replaces the
    metric networks (tests). Then :func:`score_runs` measures and :func:`build_report` reports.
    """
    started = time.perf_counter()
    setup = prepare_evaluation(
        pairs_test, teacher_checkpoint, student_checkpoint, config, fid_reference=fid_reference,
        classifier=classifier, device=device, dataset=dataset, progress=progress, suite=suite,
    )
    scoring = score_runs(setup, progress)
    report = build_report(setup, scoring, time.perf_counter() - started)
    return EvaluationResult(report=report, samples=scoring.samples)
