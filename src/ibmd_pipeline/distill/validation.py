"""A cheap, clean-image-free validation signal for distillation.

IBMD never sees clean images, and neither does its validation. On a fixed batch of corrupted
images held out from the training set, the teacher's references are computed once:

- its one-step output (NFE 1, the blurry posterior mean the student starts from),
- its many-step samples (NFE K, the target of distillation), twice with independent noise,
- its K-step samples drawn several times for a few images (its diversity).

Every validation then samples the student on the same batch (with fixed noise, so the curve
is a function of the weights only) and logs

1. the *gap*: the sliced Wasserstein-2 distance between the student's samples and the
   teacher's NFE-K samples, for the student run with each of 1, 2, 4 steps up to its N;
2. the same distance for the teacher at NFE 1 (and NFE M), the reference the student should
   beat, and between the teacher's two independent NFE-K draws, the noise floor at this
   batch size (a student indistinguishable from the teacher sits there);
3. the per-pixel standard deviation of the student over z (diversity), next to the teacher's
   (for inpainting, each draw also refills the hole's noise).

The sliced distance compares the two *sets* of images as distributions over pixel space
(R^D, D = C*H*W): for P random unit directions it sorts both projected sets and averages the
squared differences (the exact 1-D W2 between equal-size empirical measures), then takes the
square root of the mean. For two single images it is their per-pixel RMS difference, so the
numbers read as "RMS pixel distance" (images in [-1, 1]). It is well defined with any batch
size and costs one matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.distill.config import ValidationConfig
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.engine.devices import autocast_context
from ibmd_pipeline.networks.predictors import X0Predictor

__all__ = ["DistillValidator", "per_pixel_std", "random_directions", "sliced_wasserstein"]


def random_directions(dim: int, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``(dim, count)`` float32 unit vectors, uniform on the sphere (normalised Gaussians)."""
    directions = torch.randn(dim, count, generator=generator, dtype=torch.float32)
    return directions / directions.norm(dim=0, keepdim=True)


def sliced_wasserstein(a: Tensor, b: Tensor, directions: Tensor) -> float:
    """Sliced W2 between the image sets ``a`` and ``b`` (same count, any shape ``(N, ...)``).

    ``directions``: ``(D, P)`` unit vectors, D = the flattened image size (see
    :func:`random_directions`). ``sqrt(mean_p W2^2(<a, p>, <b, p>))``; W2 between equal-size
    1-D empirical measures pairs the sorted values.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    flat_a = a.reshape(a.shape[0], -1).float()
    flat_b = b.reshape(b.shape[0], -1).float()
    if directions.shape[0] != flat_a.shape[1]:
        raise ValueError(
            f"directions of dimension {directions.shape[0]} for images of size {flat_a.shape[1]}"
        )
    directions = directions.to(flat_a.device)
    proj_a = (flat_a @ directions).sort(dim=0).values
    proj_b = (flat_b @ directions).sort(dim=0).values
    return math.sqrt(float((proj_a - proj_b).square().mean()))


def per_pixel_std(draws: Tensor) -> float:
    """Mean over images and pixels of the std over draws; ``draws`` is ``(draws, N, C, H, W)``."""
    if draws.shape[0] < 2:
        raise ValueError(f"per_pixel_std needs at least 2 draws, got {draws.shape[0]}")
    return float(draws.float().std(dim=0).mean())


def student_step_counts(nfe: int) -> tuple[int, ...]:
    """The step counts a student trained with ``nfe`` steps is validated at: 1, 2, 4 up to ``nfe``."""
    return tuple(sorted({m for m in (1, 2, 4) if m <= nfe} | {nfe}))


@dataclass(frozen=True)
class TeacherReferences:
    """The teacher's samples on the held-out batch, computed once per run."""

    nfe1: Tensor
    by_nfe: dict[int, Tensor]  # the teacher at the student's step counts M > 1
    many: Tensor  # NFE K
    many_again: Tensor  # NFE K, independent noise
    many_draws: Tensor  # (draws, diversity_images, C, H, W) at NFE K


class DistillValidator:
    """Teacher references on a fixed corrupted batch, and the student's metrics against them.

    xT / mask: the held-out batch (already on the teacher's device). ``student_nfe`` sets the
    step counts validated (:func:`student_step_counts`). ``bf16``: run the networks under
    bfloat16 autocast (as training does); the distances are computed in float32.
    """

    def __init__(
        self,
        teacher: X0Predictor,
        xT: Tensor,
        mask: Tensor | None,
        config: ValidationConfig,
        student_nfe: int,
        *,
        bf16: bool = False,
    ):
        self.xT = xT
        self.bf16 = bf16
        self.mask = mask
        self.config = config
        self.step_counts = student_step_counts(student_nfe)
        self.schedule = teacher.schedule
        dim = int(xT[0].numel())
        directions_seed = torch.Generator().manual_seed(config.seed)
        self.directions = random_directions(dim, config.projections, directions_seed)
        self.references = self._teacher_references(teacher)
        self.reference_metrics = self._reference_metrics()

    def _noise(self, offset: int) -> torch.Generator:
        generator = torch.Generator(device=self.xT.device)
        return generator.manual_seed(self.config.seed + offset)

    def _autocast(self):
        return autocast_context(self.xT.device, self.bf16, allow_cpu=True)

    @torch.no_grad()
    def _teacher_references(self, teacher: X0Predictor) -> TeacherReferences:
        config, schedule = self.config, self.schedule
        k = config.teacher_nfe

        def run(nfe: int, offset: int, xT: Tensor = self.xT, mask: Tensor | None = self.mask) -> Tensor:
            with self._autocast():
                return sample(
                    teacher, xT, schedule, nfe, mode="ancestral", mask=mask, generator=self._noise(offset)
                )

        draws_xT, draws_mask = self._diversity_batch()
        many_draws = run(k, 4, draws_xT, draws_mask).reshape(
            config.diversity_draws, config.diversity_images, *self.xT.shape[1:]
        )
        return TeacherReferences(
            nfe1=run(1, 1),
            by_nfe={m: run(m, 10 + m) for m in self.step_counts if m > 1},
            many=run(k, 2),
            many_again=run(k, 3),
            many_draws=many_draws,
        )

    def distance(self, samples: Tensor) -> float:
        """Sliced W2 between ``samples`` of the held-out batch and the teacher's NFE-K samples."""
        return sliced_wasserstein(samples, self.references.many, self.directions)

    def _reference_metrics(self) -> dict[str, float]:
        refs = self.references
        metrics = {
            "val/gap/teacher_nfe1": self.distance(refs.nfe1),
            "val/gap/teacher_floor": self.distance(refs.many_again),
            "val/std/teacher": per_pixel_std(refs.many_draws),
        }
        metrics.update({f"val/gap/teacher_nfe{m}": self.distance(x) for m, x in refs.by_nfe.items()})
        return metrics

    @torch.no_grad()
    def student_samples(self, generator: BridgeGenerator, nfe: int) -> Tensor:
        """The student's samples on the held-out batch with the validation's fixed noise."""
        with self._autocast():
            return generator(self.xT, mask=self.mask, nfe=nfe, generator=self._noise(100 + nfe))

    @torch.no_grad()
    def __call__(self, generator: BridgeGenerator, raw: BridgeGenerator | None = None) -> dict[str, float]:
        """Metrics of ``generator`` (the EMA weights) and, if given, the gap of the raw weights."""
        was_training = generator.training
        generator.eval()
        metrics = dict(self.reference_metrics)
        for m in self.step_counts:
            metrics[f"val/gap/student_nfe{m}"] = self.distance(self.student_samples(generator, m))
        metrics["val/std/student"] = self._student_std(generator)
        if raw is not None:
            raw_training = raw.training
            raw.eval()
            metrics[f"val/gap/student_raw_nfe{raw.nfe}"] = self.distance(self.student_samples(raw, raw.nfe))
            raw.train(raw_training)
        generator.train(was_training)
        return metrics

    def _diversity_batch(self) -> tuple[Tensor, Tensor | None]:
        """The first ``diversity_images`` held-out images, repeated ``diversity_draws`` times.

        With a mask, each repeat's hole gets its own N(0, I) fill (fixed seed): for inpainting
        that noise is part of xT's distribution, and it is all the randomness a generator
        without z (I2SB inpainting, OT-ODE) has.
        """
        config = self.config
        xT = self.xT[: config.diversity_images].repeat(config.diversity_draws, 1, 1, 1)
        if self.mask is None:
            return xT, None
        mask = self.mask[: config.diversity_images].repeat(config.diversity_draws, 1, 1, 1)
        fill = torch.randn(xT.shape, generator=self._noise(300), device=xT.device, dtype=xT.dtype)
        return xT * (1.0 - mask) + fill * mask, mask

    def _student_std(self, generator: BridgeGenerator) -> float:
        config = self.config
        xT, mask = self._diversity_batch()
        with self._autocast():
            draws = generator(xT, mask=mask, generator=self._noise(200))
        draws = draws.reshape(config.diversity_draws, config.diversity_images, *self.xT.shape[1:])
        return per_pixel_std(draws)

