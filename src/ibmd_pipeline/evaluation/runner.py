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

The report (``metrics.json``), standard JSON::

    {"records": [{"model": "teacher" | "student", "nfe", "fid", "lpips", "ca", "psnr", "ssim",
                  "sec_per_image", "images_per_sec", "seed",
                  "speedup_vs_teacher": {"<teacher nfe>": x}  (students only)}, ...],
     "task", "task_config", "dataset", "image_size", "channels", "num_images", "seed", "sampler",
     "device", "weights": {"fid", "lpips"} (source labels),
     "checkpoints": {"teacher", "student", "classifier", "teacher_of_student"} (catalog versions),
     "models": {"teacher": {"bridge", "conditional", "use_ema"},
                "student": {"trained_nfe", "noise", "evaluated_nfe"}},
     "classifier": {"ceiling", "floor", "reason", "clean_test_accuracy"},
     "corrupted_input": {"fid", "lpips", "ca", "psnr", "ssim"},
     "reasons": {metric: why it is null}, "fid": {"dims", "reference", "reference_images"},
     "speed": {"batch_size", "repeats", "min_seconds", "warmup", "device", "baseline", "seconds_per_batch"},
     "psnr_cap_db", "notes": [...], "elapsed_seconds": {"restore", "metrics", "speed", "total"},
     "config": the EvaluateConfig as a dict, "grid_columns": [...]}
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
    "MetricSuite",
    "ModelRun",
    "measure_speed",
    "restore_images",
    "resolve_student_nfe",
    "run_evaluation",
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

    def score(self, images: Tensor, clean: Tensor, labels: Tensor | None) -> dict[str, float | None]:
        """``{"fid", "lpips", "ca", "psnr", "ssim"}`` of restorations ``images`` (CA in percent,
        PSNR in dB capped per image at :data:`PSNR_CAP_DB`)."""
        return {
            "fid": self.fid.score(images) if self.fid is not None else None,
            "lpips": self.lpips.score(images, clean) if self.lpips is not None else None,
            "ca": self.accuracy(images, labels),
            "psnr": psnr_per_image(images, clean).clamp(max=PSNR_CAP_DB).mean().item(),
            "ssim": ssim(images, clean),
        }


@dataclass
class EvaluationResult:
    """The JSON-ready ``report`` and the first ``grid_rows`` images of each run for the grid.

    ``samples`` maps ``"corrupted"``, ``"clean"``, ``"mask"`` (inpainting) and every run's label
    (``"teacher@100"``, ``"student@1"``) to ``(rows, C, H, W)`` CPU tensors.
    """

    report: dict[str, Any]
    samples: dict[str, Tensor]


def _speed_baseline(teacher_nfe: Sequence[int]) -> int:
    """The teacher NFE the table's speed-up column divides by: 100 (the paper's) when
    evaluated, else the teacher's largest."""
    return 100 if 100 in teacher_nfe else max(teacher_nfe)


def _check_json(report: Mapping[str, Any]) -> None:
    try:
        json.dumps(report, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"the evaluation report holds a non-finite number: {err}") from err


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

    Before any sampling: both checkpoints are checked against the test data's task, image size
    and channels (:class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError`), the student's
    NFE against its trained N (``ConfigError``), the cached references against the test data
    (:class:`~ibmd_pipeline.evaluation.references.StaleReferenceError`) and the metric weights
    (:class:`~ibmd_pipeline.metrics.weights.WeightsUnavailableError`). ``suite`` replaces the
    metric networks (tests). The report's layout is in the module docstring; it is checked to be
    standard JSON (no NaN or infinity).
    """
    started = time.perf_counter()
    device = torch.device(device)
    task = dict(pairs_test.get("task") or {})
    task_kind = task.get("kind")
    size, channels = int(pairs_test["clean"].shape[-1]), int(pairs_test["clean"].shape[1])
    checks = {"task_kind": task_kind, "image_size": size, "channels": channels}
    teacher = teacher_from_checkpoint(teacher_checkpoint, use_ema=config.use_ema, device=device, **checks)
    student = student_from_checkpoint(student_checkpoint, use_ema=config.use_ema, device=device, **checks)
    student_nfe = resolve_student_nfe(config, student.nfe)
    check_references(pairs_test, config, fid_reference, classifier)
    subset = evaluated_subset(pairs_test, config)
    labels = subset.get("labels")
    if suite is None:
        suite = MetricSuite.build(
            config,
            device=device,
            fid_reference=fid_reference,
            classifier=classifier,
            labelled=labels is not None,
            image_size=min(size, int(pairs_test["clean"].shape[-2])),
            progress=progress,
        )
    clean, xT, mask = subset["clean"], subset["corrupted"], subset.get("mask")
    n = int(clean.shape[0])
    rows = min(config.grid_rows, n)
    runs = teacher_runs(teacher, config.teacher_nfe, config.sampler) + student_runs(student, student_nfe)
    logger.info(
        "evaluating %s on %d test images (%s, %s): %s",
        task_kind, n, dataset or "data", device_description(device), ", ".join(r.label for r in runs),
    )

    elapsed: dict[str, dict[str, float]] = {"restore": {}, "metrics": {}, "speed": {}}
    tick = time.perf_counter()
    corrupted_scores = suite.score(xT, clean, labels)
    elapsed["metrics"]["corrupted_input"] = time.perf_counter() - tick
    classifier_facts = {
        "ceiling": suite.accuracy(clean, labels),
        "floor": corrupted_scores["ca"],
        "reason": suite.reasons.get("ca"),
        # the classifier's own accuracy on the whole clean test split (the subset's is "ceiling")
        "clean_test_accuracy": (classifier or {}).get("clean_test_accuracy") if suite.classifier else None,
    }

    samples: dict[str, Tensor] = {"corrupted": xT[:rows], "clean": clean[:rows]}
    if mask is not None:
        samples["mask"] = mask[:rows]
    records: list[dict[str, Any]] = []
    speeds: dict[str, SamplingSpeed] = {}
    for run in runs:
        tick = time.perf_counter()
        restored = restore_images(
            run, xT, mask, batch_size=config.batch_size, seed=config.seed, device=device, progress=progress
        )
        elapsed["restore"][run.label] = time.perf_counter() - tick
        samples[run.label] = restored[:rows]
        tick = time.perf_counter()
        scores = suite.score(restored, clean, labels)
        elapsed["metrics"][run.label] = time.perf_counter() - tick
        tick = time.perf_counter()
        logger.info("timing %s at batch %d", run.label, config.speed.batch_size)
        speeds[run.label] = measure_speed(run, xT, mask, config, device)
        elapsed["speed"][run.label] = time.perf_counter() - tick
        record = {
            "model": run.model,
            "nfe": run.nfe,
            **scores,
            "sec_per_image": speeds[run.label].seconds_per_image,
            "images_per_sec": speeds[run.label].images_per_second,
            "seed": config.seed,
        }
        records.append(record)
        logger.info("%s: %s", run.label, {k: record[k] for k in (*METRICS, "sec_per_image")})

    teacher_speed = {r.nfe: speeds[r.label] for r in runs if r.model == "teacher"}
    for record in records:
        if record["model"] == "student":
            own = speeds[f"student@{record['nfe']}"]
            record["speedup_vs_teacher"] = {
                str(nfe): speedup(baseline, own) for nfe, baseline in sorted(teacher_speed.items())
            }

    versions = {
        "teacher": teacher.version,
        "student": student.version,
        "classifier": (classifier or {}).get("catalog_version"),
        "teacher_of_student": student.config.get("teacher_version"),
    }
    notes = []
    if versions["teacher_of_student"] is not None and teacher.version is not None and (
        versions["teacher_of_student"] != teacher.version
    ):
        notes.append(
            f"the student was distilled from teacher version {versions['teacher_of_student']}, "
            f"the teacher evaluated here is version {teacher.version}"
        )
        logger.warning(notes[-1])
    reference_weights = (fid_reference or {}).get("weights")
    if suite.fid is not None and reference_weights not in (None, suite.fid.weights_source):
        notes.append(
            f"FID reference statistics were computed with {reference_weights}, "
            f"the evaluation's Inception is {suite.fid.weights_source}"
        )

    report: dict[str, Any] = {
        "records": records,
        "task": task_kind,
        "task_config": task,
        "dataset": dataset,
        "image_size": size,
        "channels": channels,
        "num_images": n,
        "seed": config.seed,
        "sampler": config.sampler,
        "device": device_description(device),
        "weights": suite.weights,
        "checkpoints": versions,
        "models": {
            "teacher": {
                "bridge": teacher.bridge.kind, "conditional": teacher.conditional, "use_ema": config.use_ema
            },
            "student": {
                "trained_nfe": student.nfe, "noise": student.noise, "evaluated_nfe": list(student_nfe)
            },
        },
        "classifier": classifier_facts,
        "corrupted_input": corrupted_scores,
        "reasons": {metric: suite.reasons[metric] for metric in METRICS if metric in suite.reasons},
        "fid": {
            "dims": config.fid.dims if suite.fid is not None else None,
            "reference": config.fid.reference if suite.fid is not None else None,
            "reference_images": int((fid_reference or {}).get("n", 0)) if suite.fid is not None else None,
        },
        "speed": {
            "batch_size": config.speed.batch_size,
            "repeats": config.speed.repeats,
            "min_seconds": config.speed.min_seconds,
            "warmup": config.speed.warmup,
            "device": device_description(device),
            "baseline": f"teacher@{_speed_baseline(config.teacher_nfe)}",
            "seconds_per_batch": {label: list(s.seconds_per_batch) for label, s in speeds.items()},
        },
        "psnr_cap_db": PSNR_CAP_DB,
        "notes": notes,
        "elapsed_seconds": {**elapsed, "total": time.perf_counter() - started},
        "config": config_to_dict(config),
    }
    report["grid_columns"] = [title for title, _ in grid_columns(report, samples)]
    _check_json(report)
    return EvaluationResult(report=report, samples=samples)
