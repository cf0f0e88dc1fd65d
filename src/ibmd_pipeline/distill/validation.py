"""A cheap, clean-image-free validation signal for distillation.

IBMD never sees clean images, and neither does its validation. It compares the student's
*conditional* distribution ``p_theta(x0 | xT)`` with the teacher's many-step one on a fixed set
of held-out corrupted images, each drawn ``draws`` times (for inpainting
each draw also gets its own N(0, I) fill of the hole, the randomness of xT itself). The
teacher's references are computed once per run:

- NFE K (``teacher_nfe``): the target of distillation;
- NFE 1: the blurry posterior mean ``E[x0 | xT]`` that a one-step student starts from;
- NFE M for ``reference_nfes`` (e.g. 10) and the student's step counts (the teacher with the
  student's budget).

Every validation samples the student with fixed noise (so the curve is a function of the
weights only) and logs, per step count M in 1, 2, 4 up to its N:

1. the *gap*: the energy distance between the student's draws and the teacher's NFE-K draws
   for the same xT, averaged over the images;
2. the same for the teacher at NFE 1 and the other references (to beat), and the teacher's
   NFE-K draws split in two halves against each other (``teacher_self``: what a student
   indistinguishable from the teacher would score, about 0);
3. the per-pixel standard deviation over draws (diversity), student next to teacher.

Energy distance (Szekely): ``E = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` with X, X' from
one distribution and Y, Y' from the other; ``E >= 0``, and 0 exactly when the distributions
agree. It is the MMD of the distance kernel, so it sees both a wrong mean and a wrong spread:
a point mass at the teacher's mean (the NFE-1 output) scores ``2 E||mu - Y|| - E||Y - Y'||
> 0`` although it is closer to each teacher sample on average than two teacher samples are
to each other. Norms are per-pixel RMS (``||.|| / sqrt(C H W)``, images in [-1, 1]); the
within-set terms skip i = j, so the estimate is unbiased and may dip slightly below 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.distill.config import ValidationConfig
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.engine.devices import autocast_context
from ibmd_pipeline.networks.predictors import X0Predictor

__all__ = ["DistillValidator", "energy_distance", "per_pixel_std", "student_step_counts"]


def _mean_rms_distance(a: Tensor, b: Tensor, skip_diagonal: bool) -> Tensor:
    """``(N,)`` mean over draw pairs of the per-pixel RMS distance; ``a``, ``b`` are ``(m, N, D)``."""
    # (N, m, m) pairwise distances per image
    distances = torch.cdist(a.transpose(0, 1), b.transpose(0, 1)) / a.shape[-1] ** 0.5
    m_a = a.shape[0]
    if skip_diagonal:
        return distances.sum(dim=(1, 2)) / (m_a * (m_a - 1))  # the diagonal is zero
    return distances.mean(dim=(1, 2))


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Per-image energy distance between draw sets ``x`` ``(m, N, ...)`` and ``y`` ``(k, N, ...)``.

    Returns ``(N,)``: ``2 mean||x_i - y_j|| - mean_{i!=j}||x_i - x_j|| - mean_{i!=j}||y_i - y_j||``
    with per-pixel RMS norms; both sets need at least 2 draws (module docstring).
    """
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"energy_distance needs >= 2 draws of the same images, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.flatten(2).double()
    y = y.flatten(2).double()
    cross = _mean_rms_distance(x, y, skip_diagonal=False)
    return 2.0 * cross - _mean_rms_distance(x, x, True) - _mean_rms_distance(y, y, True)


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
    """The teacher's draws on the validation images, ``(draws, images, C, H, W)`` each."""

    many: Tensor  # NFE K
    by_nfe: dict[int, Tensor]  # NFE 1, the reference_nfes and the student's step counts


class DistillValidator:
    """Teacher references on fixed held-out corrupted images, and the student's metrics.

    xT / mask: the held-out images (on the teacher's device), each drawn ``config.draws``
    times. ``student_nfe`` sets the step counts validated (:func:`student_step_counts`).
    ``bf16``: run the networks under bfloat16 autocast (as training does); the distances are
    computed in float64. ``progress``: a bar over each of the teacher's reference runs.
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
        progress: bool = False,
    ):
        self.config = config
        self.bf16 = bf16
        self.progress = progress
        self.device = xT.device
        self.step_counts = student_step_counts(student_nfe)
        self.schedule = teacher.schedule
        self.image_shape = tuple(xT.shape[1:])
        self.xT, self.mask = self._repeat_draws(xT, mask)
        self.references = self._teacher_references(teacher)
        self.reference_metrics = self._reference_metrics()

    def _repeat_draws(self, xT: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The images repeated ``draws`` times (draw-major); with a mask, every repeat's hole gets
        its own N(0, I) fill (fixed seed): that noise is part of xT's distribution, and all the
        randomness a generator without z (I2SB inpainting, OT-ODE) has."""
        draws = self.config.draws
        repeated = xT.repeat(draws, 1, 1, 1)
        if mask is None:
            return repeated, None
        mask = mask.repeat(draws, 1, 1, 1)
        fill = torch.randn(repeated.shape, generator=self._noise(300), device=xT.device, dtype=xT.dtype)
        return repeated * (1.0 - mask) + fill * mask, mask

    def _noise(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.config.seed + offset)

    def _autocast(self):
        return autocast_context(self.device, self.bf16, allow_cpu=True)

    def _as_draws(self, samples: Tensor) -> Tensor:
        return samples.reshape(self.config.draws, -1, *self.image_shape)

    @torch.no_grad()
    def _teacher_references(self, teacher: X0Predictor) -> TeacherReferences:
        def run(nfe: int, offset: int) -> Tensor:
            with self._autocast():
                x0 = sample(
                    teacher, self.xT, self.schedule, nfe, mode="ancestral", mask=self.mask,
                    generator=self._noise(offset), progress=self.progress,
                )
            return self._as_draws(x0.float())

        counts = sorted({1, *self.config.reference_nfes, *self.step_counts})
        return TeacherReferences(
            many=run(self.config.teacher_nfe, 0), by_nfe={m: run(m, 10 + m) for m in counts}
        )

    def gap(self, draws: Tensor) -> float:
        """Mean energy distance between ``draws`` (draws, images, ...) and the teacher's NFE-K draws."""
        return float(energy_distance(draws, self.references.many).mean())

    def _reference_metrics(self) -> dict[str, float]:
        many = self.references.many
        half = self.config.draws // 2
        metrics = {f"val/gap/teacher_nfe{m}": self.gap(x) for m, x in self.references.by_nfe.items()}
        metrics["val/gap/teacher_self"] = float(energy_distance(many[:half], many[half:]).mean())
        metrics["val/std/teacher"] = per_pixel_std(many)
        return metrics

    @torch.no_grad()
    def student_draws(self, generator: BridgeGenerator, nfe: int) -> Tensor:
        """The student's draws ``(draws, images, C, H, W)`` with the validation's fixed noise."""
        with self._autocast():
            x0 = generator(self.xT, mask=self.mask, nfe=nfe, generator=self._noise(100 + nfe))
        return self._as_draws(x0.float())

    @torch.no_grad()
    def __call__(self, generator: BridgeGenerator, raw: BridgeGenerator | None = None) -> dict[str, float]:
        """Metrics of ``generator`` (the EMA weights) and, if given, the gap of the raw weights."""
        was_training = generator.training
        generator.eval()
        metrics = dict(self.reference_metrics)
        for m in self.step_counts:
            draws = self.student_draws(generator, m)
            metrics[f"val/gap/student_nfe{m}"] = self.gap(draws)
            if m == generator.nfe:
                metrics["val/std/student"] = per_pixel_std(draws)
        generator.train(was_training)
        if raw is not None:
            raw_training = raw.training
            raw.eval()
            metrics[f"val/gap/student_raw_nfe{raw.nfe}"] = self.gap(self.student_draws(raw, raw.nfe))
            raw.train(raw_training)
        return metrics
