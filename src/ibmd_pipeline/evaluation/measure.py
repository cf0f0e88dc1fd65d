"""Restoring the evaluated images with one model at one NFE and measuring every image.

A :class:`RunMeasurement` holds what one image set measured, per image and per sampler seed:
PSNR, SSIM, LPIPS, whether the classifier was right, consistency with the input, the
classifier's penultimate features and the Inception features, and, on the first images, the
closeness to the reference teacher. Every number of the report (means, FID, KID, intervals,
verdicts) is computed from these in :mod:`ibmd_pipeline.evaluation.summary`, so a cached
measurement (the teacher's, :func:`measurements_to_bundle`) gives the same report as a fresh one.

Common random numbers: every model restores image ``i`` at seed ``s`` from the same input and
the same noise, so differences between models come from the models, not from the draws. Each
sampling batch (``batch_size`` consecutive images) draws from its own generator, seeded with
``s`` for the batch of image 0 and with a seed derived from ``s`` and the batch's first image
index for the others (:func:`batch_seed`): the noise of an image depends on its index and the
batch size, never on which batches were restored before it. That is what lets a distributed
evaluation restore whole batches on different ranks and still give the numbers of one process
(:func:`measure_run` with a :class:`~ibmd_pipeline.engine.distributed.DistContext`). For
inpainting, the hole of xT is refilled with N(0, I) noise drawn from seed ``s`` too: the fill
is part of xT's randomness, and the only randomness of a model without z (I2SB inpainting,
OT-ODE), as in the distillation's validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.distill.student import LoadedStudent
from ibmd_pipeline.distill.validation import energy_distance
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.distributed import DistContext, gather_objects
from ibmd_pipeline.evaluation.config import EvaluateConfig
from ibmd_pipeline.evaluation.references import build_fid_scorer, build_lpips_scorer
from ibmd_pipeline.metrics.classifier import (
    ClassifierConfig,
    classifier_accuracy,
    features_and_predictions,
    load_classifier,
    min_image_size,
)
from ibmd_pipeline.metrics.consistency import consistency_per_image, consistency_reason
from ibmd_pipeline.metrics.fid import FIDScorer
from ibmd_pipeline.metrics.image_quality import psnr_per_image, ssim, ssim_per_image
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.teacher.model import LoadedTeacher

__all__ = [
    "CORRUPTED",
    "PER_IMAGE_METRICS",
    "PSNR_CAP_DB",
    "SSIM_MIN_SIZE",
    "STUDENT_NFE_CHOICES",
    "EvaluatedImages",
    "MetricSuite",
    "ModelRun",
    "RunMeasurement",
    "RunPlan",
    "add_closeness",
    "batch_seed",
    "measure_corrupted",
    "measure_run",
    "measurements_from_bundle",
    "measurements_to_bundle",
    "plan_run",
    "resolve_student_nfe",
    "restore_images",
    "seeded_inputs",
    "shard_batches",
    "student_runs",
    "teacher_runs",
]

logger = logging.getLogger(__name__)

#: Per-image PSNR cap in dB (identical images would give inf; 100 dB is an MSE of 1e-10).
PSNR_CAP_DB = 100.0
#: SSIM's Gaussian window is 11 px wide: smaller images have no SSIM.
SSIM_MIN_SIZE = 11
#: Step counts a multi-step student is evaluated at by default (those up to its trained N).
STUDENT_NFE_CHOICES: tuple[int, ...] = (1, 2, 4)
#: Per-image values of a measurement, ``(seeds, images)`` each (``correct``: 1 or 0).
PER_IMAGE_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "correct", "consistency")
#: Label of the corrupted input, measured as an image set of its own (the baseline).
CORRUPTED = "corrupted_input"
# Seed offset of the inpainting hole's fill, so that it is not the sampler's noise stream.
_FILL_SEED_OFFSET = 7919
# Seed stride between sampling batches (the 64-bit golden ratio, as between ranks in
# engine.distributed): batch seeds stay apart from the small sampler seeds seed, seed + 1, ...
_BATCH_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**63

Restore = Callable[[Tensor, Tensor | None, torch.Generator], Tensor]


# ---------------------------------------------------------------------------------------------
# Models at an NFE


@dataclass(frozen=True)
class ModelRun:
    """One model at one NFE: ``restore(xT, mask, generator) -> x0`` for a batch on the device.

    model: ``teacher`` (the main sampler), ``teacher_<mode>`` (a further teacher sampler) or
    ``student``; sampler: the teacher's sampler (``None`` for the student).
    """

    model: str
    nfe: int
    restore: Restore
    sampler: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model}@{self.nfe}"


def teacher_runs(
    teacher: LoadedTeacher, nfes: Sequence[int], sampler: str = "ancestral", model: str = "teacher"
) -> list[ModelRun]:
    """The teacher's bridge sampler ``sampler`` at each NFE (ascending), as records of ``model``."""

    def at(nfe: int) -> Restore:
        def restore(xT: Tensor, mask: Tensor | None, generator: torch.Generator) -> Tensor:
            return sample(
                teacher.predictor, xT, teacher.schedule, nfe, mode=sampler, mask=mask, generator=generator
            )

        return restore

    return [ModelRun(model, nfe, at(nfe), sampler) for nfe in sorted(nfes)]


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


def batch_seed(seed: int, start: int) -> int:
    """The generator seed of the sampling batch whose first image is ``start`` at sampler seed
    ``seed``: ``seed`` itself for the first batch, a seed ``_BATCH_SEED_STRIDE`` apart per image
    index for the others."""
    return seed if start == 0 else (seed + start * _BATCH_SEED_STRIDE) % _SEED_MODULUS


def shard_batches(count: int, batch_size: int, ctx: DistContext | None = None) -> list[slice]:
    """This rank's sampling batches of ``count`` images: every ``world_size``-th batch, starting
    at its rank (all of them in one process). Whole batches, so a batch's noise and composition
    do not depend on the world size."""
    parts = _batches(count, batch_size)
    return parts if ctx is None else parts[ctx.rank :: ctx.world_size]


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
    parts: Sequence[slice] | None = None,
) -> Tensor:
    """Restore the images of ``xT`` with ``run`` in batches of ``batch_size``, each batch with a
    generator seeded with :func:`batch_seed`; ``parts``: only these batches (of
    :func:`shard_batches`), concatenated in order. Returns float32 on the CPU; non-finite output
    is an error."""
    device = torch.device(device)
    parts = _batches(xT.shape[0], batch_size) if parts is None else list(parts)
    outputs = []
    total = sum(part.stop - part.start for part in parts)
    bar = tqdm(total=total, desc=f"restore {run.label} (seed {seed})", unit="img", disable=not progress)
    for part in parts:
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, part.start))
        batch_mask = None if mask is None else mask[part].to(device, torch.float32)
        outputs.append(run.restore(xT[part].to(device, torch.float32), batch_mask, generator).float().cpu())
        bar.update(part.stop - part.start)
    bar.close()
    if not outputs:
        return xT[:0].float()
    restored = torch.cat(outputs)
    if not torch.isfinite(restored).all():
        raise FloatingPointError(f"{run.label} produced non-finite images; the checkpoint is unusable")
    return restored


def seeded_inputs(xT: Tensor, mask: Tensor | None, seed: int) -> Tensor:
    """xT for sampler seed ``seed``: unchanged, or with the inpainting hole refilled with N(0, I)
    noise drawn from ``seed`` (module docstring)."""
    if mask is None:
        return xT
    generator = torch.Generator().manual_seed(seed + _FILL_SEED_OFFSET)
    fill = torch.randn(xT.shape, generator=generator, dtype=xT.dtype)
    return xT * (1.0 - mask) + fill * mask


# ---------------------------------------------------------------------------------------------
# The metric networks


@dataclass(frozen=True)
class EvaluatedImages:
    """The evaluated test images: ``clean``, ``corrupted``, ``mask`` (inpainting), ``labels``."""

    clean: Tensor
    corrupted: Tensor
    mask: Tensor | None = None
    labels: Tensor | None = None

    @classmethod
    def from_subset(cls, subset: Mapping[str, Any]) -> EvaluatedImages:
        return cls(subset["clean"], subset["corrupted"], subset.get("mask"), subset.get("labels"))

    @property
    def count(self) -> int:
        return int(self.clean.shape[0])

    @property
    def image_size(self) -> int:
        return min(int(self.clean.shape[-2]), int(self.clean.shape[-1]))


@dataclass
class MetricSuite:
    """The metric networks of one evaluation. A metric whose network is ``None`` (or that cannot
    be computed for this data) is null, with the reason in ``reasons`` under its key: ``fid``
    (FID and KID), ``lpips``, ``ca`` (accuracy and the classifier-feature metrics),
    ``consistency``, ``ssim``."""

    fid: FIDScorer | None
    lpips: LPIPSScorer | None
    classifier: nn.Module | None
    reasons: dict[str, str] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    batch_size: int = 64
    task: TaskConfig | None = None

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
        task: TaskConfig | None = None,
    ) -> MetricSuite:
        """Build the enabled metrics (weights are located here: a missing file fails now, with
        a message that says how to provide it or to disable the metric).

        ``labelled``: whether the evaluated images have class labels (else CA is null);
        ``image_size``: the images' shorter side (SSIM and the classifier have minimum sizes);
        ``task``: the degradation, for consistency (null without it).
        """
        device = torch.device(device)
        reasons: dict[str, str] = {}
        fid = lpips = model = None
        if config.fid.enabled:
            fid = build_fid_scorer(config, device, progress)
            if fid_reference is not None and fid_reference.get("mu") is not None:
                fid.set_reference(fid_reference)
        else:
            reasons["fid"] = "disabled (evaluate.fid.enabled: false)"
        if config.lpips.enabled:
            lpips = build_lpips_scorer(config, device)
        else:
            reasons["lpips"] = "disabled (evaluate.lpips.enabled: false)"
        classifier_config = config.ca.classifier
        if classifier is not None and classifier.get("config"):
            classifier_config = parse_config(ClassifierConfig, classifier["config"], "classifier")
        smallest = min_image_size(classifier_config)
        if not config.ca.enabled:
            reasons["ca"] = "disabled (evaluate.ca.enabled: false)"
        elif not labelled:
            reasons["ca"] = "the evaluation data has no class labels"
        elif image_size is not None and image_size < smallest:
            reasons["ca"] = f"the classifier needs images of at least {smallest} px, these have {image_size}"
        elif classifier is None or classifier.get("model") is None:
            reasons["ca"] = (classifier or {}).get("reason") or "no classifier was trained"
        else:
            model = load_classifier(classifier).to(device)
        if task is None:
            reasons["consistency"] = "the test data do not name the task that degraded them"
        elif consistency_reason(task) is not None:
            reasons["consistency"] = consistency_reason(task)
        if image_size is not None and image_size < SSIM_MIN_SIZE:
            reasons["ssim"] = (
                f"SSIM's {SSIM_MIN_SIZE}-px window needs images of at least that size, got {image_size}"
            )
        for metric, reason in reasons.items():
            if not reason.startswith("disabled"):
                logger.warning("%s is not measured: %s", metric.upper(), reason)
        return cls(fid, lpips, model, reasons, device, config.batch_size, task)

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

    def classifier_features(self, images: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """``(penultimate features (N, E) float32, predicted classes (N,))``, or None."""
        if self.classifier is None:
            return None
        features, predictions = features_and_predictions(
            self.classifier, images, self.batch_size, self.device
        )
        return features.numpy(), predictions.numpy()

    def per_image(
        self, images: Tensor, clean: Tensor, corrupted: Tensor, mask: Tensor | None, labels: Tensor | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Per-image values ``{metric: (N,) float64}`` of :data:`PER_IMAGE_METRICS` (those measured)
        of restorations ``images``, and their classifier features ``(N, E)`` (or None)."""
        values = {"psnr": psnr_per_image(images, clean).clamp(max=PSNR_CAP_DB).double().numpy()}
        if "ssim" not in self.reasons:
            values["ssim"] = ssim_per_image(images, clean).double().numpy()
        if self.lpips is not None:
            values["lpips"] = self.lpips.per_image(images, clean).double().numpy()
        features = None
        outputs = self.classifier_features(images) if labels is not None else None
        if outputs is not None:
            features, predictions = outputs
            values["correct"] = (predictions == labels.numpy()).astype(np.float64)
        if "consistency" not in self.reasons:
            values["consistency"] = consistency_per_image(images, corrupted, self.task, mask).numpy()
        return values, features

    def score(self, images: Tensor, clean: Tensor, labels: Tensor | None) -> dict[str, float | None]:
        """``{"fid", "lpips", "ca", "psnr", "ssim"}`` means of restorations ``images`` (CA in percent,
        PSNR in dB capped per image at :data:`PSNR_CAP_DB`; FID against the reference set with
        :meth:`FIDScorer.set_reference`)."""
        return {
            "fid": self.fid.score(images) if self.fid is not None and self.fid.reference else None,
            "lpips": self.lpips.score(images, clean) if self.lpips is not None else None,
            "ca": self.accuracy(images, labels),
            "psnr": psnr_per_image(images, clean).clamp(max=PSNR_CAP_DB).mean().item(),
            "ssim": ssim(images, clean) if "ssim" not in self.reasons else None,
        }


# ---------------------------------------------------------------------------------------------
# Measuring one image set


@dataclass
class RunMeasurement:
    """What one image set measured (a model at one NFE, or the corrupted input).

    per_image: metric -> ``(seeds, images)`` float64 (see :data:`PER_IMAGE_METRICS`).
    classifier_features: ``(seeds, images, E)`` float32, or None.
    inception_features: ``(Inception seeds, Inception images, dims)`` float32, or None.
    energy_distance, diversity: ``(closeness images,)`` float64 per image, or None.
    draws: ``(draws, closeness images, C, H, W)``: kept for the reference teacher only.
    samples: the first grid rows restored at the first seed.
    """

    label: str
    model: str
    nfe: int | None
    sampler: str | None
    seeds: tuple[int, ...]
    per_image: dict[str, np.ndarray]
    classifier_features: np.ndarray | None
    inception_features: np.ndarray | None
    samples: Tensor
    draws: Tensor | None = None
    energy_distance: np.ndarray | None = None
    diversity: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return int(self.per_image["psnr"].shape[1])


@dataclass(frozen=True)
class RunPlan:
    """How many images one run restores at which seeds, and which of them feed which metric."""

    images: int
    seeds: tuple[int, ...]
    inception_images: int
    inception_seeds: int
    closeness_images: int
    draw_seeds: tuple[int, ...]
    rows: int

    def count_at(self, seed: int) -> int:
        """Images restored at ``seed``: the evaluated ones at the evaluation's seeds, the closeness
        images at the further draw seeds."""
        count = self.images if seed in self.seeds else 0
        return max(count, self.closeness_images if seed in self.draw_seeds else 0)


def plan_run(
    config: EvaluateConfig, available: int, nfe: int | None = None, teacher: bool = False
) -> RunPlan:
    """The plan of one run on ``available`` evaluated images (a teacher NFE may be capped by
    ``teacher_max_images``)."""
    images = min(config.num_images, available)
    if teacher and nfe in config.teacher_max_images:
        images = min(images, config.teacher_max_images[nfe])
    inception = images if config.fid.num_images is None else min(images, config.fid.num_images)
    closeness = min(images, config.closeness.num_images) if config.closeness.enabled else 0
    return RunPlan(
        images=images,
        seeds=config.seeds,
        inception_images=inception,
        inception_seeds=config.fid.seeds,
        closeness_images=closeness,
        draw_seeds=config.draw_seeds if config.closeness.enabled else (),
        rows=min(config.grid_rows, images),
    )


def _in_order(pieces: Sequence[tuple[np.ndarray, Any]]) -> Any:
    """The rows of every rank's ``(image indices, rows)`` piece, in image order (numpy arrays
    stay numpy, tensors stay tensors); None when no rank has any."""
    pieces = [(index, rows) for index, rows in pieces if rows is not None and len(index)]
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0][1]
    order = np.argsort(np.concatenate([index for index, _ in pieces]), kind="stable")
    if isinstance(pieces[0][1], Tensor):
        return torch.cat([rows for _, rows in pieces])[torch.from_numpy(order)]
    return np.concatenate([rows for _, rows in pieces])[order]


def _measure_shard(
    restored: Tensor,
    index: np.ndarray,
    inputs: Tensor,
    mask: Tensor | None,
    data: EvaluatedImages,
    plan: RunPlan,
    suite: MetricSuite,
    seed: int,
) -> dict[str, tuple[np.ndarray, Any]]:
    """This rank's share of one seed: ``{name: (image indices, rows)}`` for the per-image values,
    classifier and Inception features, grid samples and closeness draws of its restored images."""

    def first(limit: int) -> tuple[np.ndarray, Tensor]:
        keep = index < limit
        return index[keep], torch.from_numpy(keep)

    shard: dict[str, tuple[np.ndarray, Any]] = {}
    if seed in plan.seeds:
        rows, keep = first(plan.images)
        if len(rows):
            where = torch.from_numpy(rows)
            labels = None if data.labels is None else data.labels[where]
            values, features = suite.per_image(
                restored[keep],
                data.clean[where],
                inputs[where],
                None if mask is None else mask[where],
                labels,
            )
            shard.update({f"per_image:{metric}": (rows, array) for metric, array in values.items()})
            shard["classifier_features"] = (rows, features)
        rows, keep = first(plan.inception_images)
        if suite.fid is not None and plan.seeds.index(seed) < plan.inception_seeds and len(rows):
            shard["inception_features"] = (rows, suite.fid.features(restored[keep]))
        rows, keep = first(plan.rows)
        shard["samples"] = (rows, restored[keep].clone())
    if seed in plan.draw_seeds:
        rows, keep = first(plan.closeness_images)
        shard["draws"] = (rows, restored[keep].clone())
    return shard


def measure_run(
    run: ModelRun,
    data: EvaluatedImages,
    plan: RunPlan,
    suite: MetricSuite,
    *,
    batch_size: int,
    progress: bool = False,
    ctx: DistContext | None = None,
) -> RunMeasurement:
    """Restore the evaluated images with ``run`` at every seed of ``plan`` and measure them.

    With ``ctx`` of a world of several processes, every rank restores and measures its own
    batches (:func:`shard_batches`) and the per-image values, features, samples and draws are
    gathered, in image order, on every rank: the same measurement as one process, up to the
    float rounding of features computed in other batch compositions."""
    distributed = ctx is not None and ctx.distributed
    per_seed: dict[str, list[np.ndarray]] = {}
    classifier_features, inception_features, draws = [], [], []
    samples = None
    for seed in sorted(set(plan.seeds) | set(plan.draw_seeds)):
        count = plan.count_at(seed)
        mask = None if data.mask is None else data.mask[:count]
        inputs = seeded_inputs(data.corrupted[:count], mask, seed)
        parts = shard_batches(count, batch_size, ctx if distributed else None)
        index = np.concatenate([np.arange(p.start, p.stop) for p in parts] or [np.zeros(0, np.int64)])
        restored = restore_images(
            run,
            inputs,
            mask,
            batch_size=batch_size,
            seed=seed,
            device=suite.device,
            progress=progress,
            parts=parts,
        )
        shard = _measure_shard(restored, index, inputs, mask, data, plan, suite, seed)
        shards = gather_objects(shard, ctx) if distributed else [shard]
        names = dict.fromkeys(name for s in shards for name in s)
        gathered = {name: _in_order([s[name] for s in shards if name in s]) for name in names}
        for name, rows in gathered.items():
            if name.startswith("per_image:") and rows is not None:
                per_seed.setdefault(name.split(":", 1)[1], []).append(rows)
        if gathered.get("classifier_features") is not None:
            classifier_features.append(gathered["classifier_features"])
        if gathered.get("inception_features") is not None:
            inception_features.append(gathered["inception_features"])
        if samples is None and "samples" in gathered:
            samples = gathered["samples"]
        if gathered.get("draws") is not None:
            draws.append(gathered["draws"])
    return RunMeasurement(
        label=run.label,
        model=run.model,
        nfe=run.nfe,
        sampler=run.sampler,
        seeds=plan.seeds,
        per_image={metric: np.stack(arrays) for metric, arrays in per_seed.items()},
        classifier_features=np.stack(classifier_features) if classifier_features else None,
        inception_features=np.stack(inception_features) if inception_features else None,
        samples=samples,
        draws=torch.stack(draws) if draws else None,
    )


def measure_corrupted(data: EvaluatedImages, plan: RunPlan, suite: MetricSuite) -> RunMeasurement:
    """The corrupted input xT measured as an image set of its own (the baseline row)."""
    n = plan.images
    labels = None if data.labels is None else data.labels[:n]
    mask = None if data.mask is None else data.mask[:n]
    xT = data.corrupted[:n]
    values, features = suite.per_image(xT, data.clean[:n], xT, mask, labels)
    inception = suite.fid.features(xT[: plan.inception_images])[None] if suite.fid is not None else None
    return RunMeasurement(
        label=CORRUPTED,
        model=CORRUPTED,
        nfe=None,
        sampler=None,
        seeds=(plan.seeds[0],),
        per_image={metric: array[None] for metric, array in values.items()},
        classifier_features=None if features is None else features[None],
        inception_features=inception,
        samples=xT[: plan.rows].clone(),
    )


def _split_half_distance(draws: Tensor) -> np.ndarray | None:
    """Energy distance between the two halves of one model's draws: what a model that samples
    exactly like it scores (about 0); needs 2 draws per half."""
    half = draws.shape[0] // 2
    if half < 2:
        return None
    return energy_distance(draws[:half], draws[half : 2 * half]).numpy()


def add_closeness(measurement: RunMeasurement, reference: RunMeasurement, keep_draws: bool = False) -> None:
    """Fill ``measurement``'s per-image energy distance to ``reference``'s draws and its diversity
    (per-pixel standard deviation over its draws, averaged over pixels), on their common first
    images; the reference itself gets the split-half distance of its own draws. The draws are
    then dropped unless ``keep_draws``."""
    draws = measurement.draws
    if draws is None or reference.draws is None:
        return
    measurement.diversity = draws.float().std(dim=0).flatten(1).mean(1).double().numpy()
    if measurement is reference:
        measurement.energy_distance = _split_half_distance(draws)
    else:
        common = min(draws.shape[1], reference.draws.shape[1])
        measurement.energy_distance = energy_distance(draws[:, :common], reference.draws[:, :common]).numpy()
    if not keep_draws:
        measurement.draws = None


# ---------------------------------------------------------------------------------------------
# Catalog bundles of measurements (the cached teacher evaluation)

_SEPARATOR = "::"


def measurements_to_bundle(measurements: Sequence[RunMeasurement], meta: Mapping[str, Any]) -> dict[str, Any]:
    """A catalog bundle of ``measurements``: tensors under ``<label>::<field>``, plain values (the
    runs' descriptions and ``meta``) beside them; it loads with ``weights_only=True``."""
    bundle: dict[str, Any] = {**meta, "runs": []}
    for m in measurements:
        bundle["runs"].append(
            {
                "label": m.label,
                "model": m.model,
                "nfe": m.nfe,
                "sampler": m.sampler,
                "seeds": list(m.seeds),
                "metrics": sorted(m.per_image),
            }
        )
        prefix = f"{m.label}{_SEPARATOR}"
        for metric, array in m.per_image.items():
            bundle[f"{prefix}per_image{_SEPARATOR}{metric}"] = torch.from_numpy(np.asarray(array, np.float64))
        arrays = {
            "classifier_features": m.classifier_features,
            "inception_features": m.inception_features,
            "samples": m.samples,
            "draws": m.draws,
            "energy_distance": m.energy_distance,
            "diversity": m.diversity,
        }
        for name, array in arrays.items():
            if array is not None:
                bundle[f"{prefix}{name}"] = torch.as_tensor(array)
    return bundle


def measurements_from_bundle(bundle: Mapping[str, Any]) -> list[RunMeasurement]:
    """The measurements of a :func:`measurements_to_bundle` bundle (arrays come back as numpy,
    images as tensors)."""

    def array(key: str) -> np.ndarray | None:
        value = bundle.get(key)
        if value is None:
            return None
        return value.numpy() if isinstance(value, Tensor) else np.asarray(value)

    def tensor(key: str) -> Tensor | None:
        value = bundle.get(key)
        return None if value is None else torch.as_tensor(value)

    measurements = []
    for run in bundle["runs"]:
        prefix = f"{run['label']}{_SEPARATOR}"
        measurements.append(
            RunMeasurement(
                label=run["label"],
                model=run["model"],
                nfe=run["nfe"],
                sampler=run["sampler"],
                seeds=tuple(run["seeds"]),
                per_image={m: array(f"{prefix}per_image{_SEPARATOR}{m}") for m in run["metrics"]},
                classifier_features=array(f"{prefix}classifier_features"),
                inception_features=array(f"{prefix}inception_features"),
                samples=tensor(f"{prefix}samples"),
                draws=tensor(f"{prefix}draws"),
                energy_distance=array(f"{prefix}energy_distance"),
                diversity=array(f"{prefix}diversity"),
            )
        )
    return measurements
