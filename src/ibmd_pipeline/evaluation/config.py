"""Settings of an evaluation run (Kedro ``params:evaluate``), parsed once into frozen configs.

The metric networks themselves (FID Inception, LPIPS AlexNet, the CA classifier) live in
:mod:`ibmd_pipeline.metrics`; this module only says which metrics to compute, on how many test
images, with which models at which numbers of function evaluations (NFE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ibmd_pipeline.engine.config import parse_config, require
from ibmd_pipeline.metrics.classifier import ClassifierConfig

__all__ = [
    "FID_DIMS",
    "CASettings",
    "EvaluateConfig",
    "FIDSettings",
    "LPIPSSettings",
    "SpeedSettings",
    "parse_evaluate_config",
]

#: Feature sizes of pytorch-fid's Inception blocks; 2048 (pool3) is the standard FID.
FID_DIMS: tuple[int, ...] = (64, 192, 768, 2048)


@dataclass(frozen=True)
class FIDSettings:
    """FID against cached statistics of clean test images.

    enabled: compute FID (needs the Inception weights, see :mod:`ibmd_pipeline.metrics.weights`).
    dims: Inception feature size: 2048 (pool3, the standard and the only one comparable with
        published numbers), or 64 / 192 / 768 (earlier blocks, cheap, for smoke tests).
    batch_size: images per Inception forward.
    reference: which clean test images the reference statistics are computed from:
        ``evaluated`` = the clean versions of the evaluated images (I2SB's protocol: the
        restorations are compared with the same images' originals), ``test_split`` = every clean
        test image (less biased, costs the Inception forward on the whole split once).
    """

    enabled: bool = True
    dims: Literal[64, 192, 768, 2048] = 2048
    batch_size: int = 50
    reference: Literal["evaluated", "test_split"] = "evaluated"

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class LPIPSSettings:
    """LPIPS (AlexNet, v0.1) of each restoration to its clean image; ``enabled`` needs the weights."""

    enabled: bool = True


@dataclass(frozen=True)
class CASettings:
    """Classifier accuracy: ``enabled`` trains ``classifier`` on the clean training split once
    (the ``evaluate_reference`` pipeline) and measures its top-1 accuracy on restorations."""

    enabled: bool = True
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass(frozen=True)
class SpeedSettings:
    """Wall-clock speed of every model/NFE at one batch size.

    batch_size: images per timed sampling call (the first test images, repeated if needed).
    repeats: timed calls at least; the median is reported. warmup: untimed calls before them.
    min_seconds: timing goes on past ``repeats`` until the timed calls add up to this many
        seconds, so millisecond one-step calls get a stable median.
    """

    batch_size: int = 16
    repeats: int = 3
    warmup: int = 1
    min_seconds: float = 1.0

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.repeats >= 1, f"{key}.repeats", f"must be >= 1, got {self.repeats}")
        require(self.warmup >= 0, f"{key}.warmup", f"must be >= 0, got {self.warmup}")
        require(self.min_seconds >= 0, f"{key}.min_seconds", f"must be >= 0, got {self.min_seconds}")


def _check_nfe_list(values: tuple[int, ...], key: str) -> None:
    require(len(values) >= 1, key, "must list at least one NFE")
    for index, nfe in enumerate(values):
        require(nfe >= 1, f"{key}[{index}]", f"must be >= 1, got {nfe}")
    require(len(set(values)) == len(values), key, f"lists an NFE twice: {list(values)}")


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation of the teacher and the student on the same test images and seeds.

    num_images: the first this many images of ``pairs_test`` are restored (all of them when the
        split is smaller). At least 2 (FID needs a covariance).
    teacher_nfe: the teacher's sampler is run at each of these NFE (e.g. 1, 10, 100, 1000).
    student_nfe: NFE of the student; null = every one of 1, 2, 4 up to the steps N it was
        trained with (a student trained with N steps may run fewer, method doc section 4).
    sampler: the teacher's sampler, ``ancestral`` (bridge posterior, I2SB) or ``deterministic``
        (DDIM/DBIM); the student always runs its own chain.
    seed: every model at every NFE restores with a fresh generator seeded with this value, so
        a re-run reproduces every sample and all models see the same noise stream.
    batch_size: images per sampling call (and per LPIPS / classifier call).
    use_ema: evaluate the EMA weights of teacher and student (as the paper does).
    grid_rows: examples shown in the sample grid.
    """

    num_images: int = 200
    teacher_nfe: tuple[int, ...] = (1, 10, 100)
    student_nfe: tuple[int, ...] | None = None
    sampler: Literal["ancestral", "deterministic"] = "ancestral"
    seed: int = 0
    batch_size: int = 64
    use_ema: bool = True
    grid_rows: int = 8
    fid: FIDSettings = field(default_factory=FIDSettings)
    lpips: LPIPSSettings = field(default_factory=LPIPSSettings)
    ca: CASettings = field(default_factory=CASettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.num_images >= 2,
            f"{prefix}num_images",
            f"must be >= 2 (FID needs a covariance), got {self.num_images}",
        )
        _check_nfe_list(self.teacher_nfe, f"{prefix}teacher_nfe")
        if self.student_nfe is not None:
            _check_nfe_list(self.student_nfe, f"{prefix}student_nfe")
        require(self.seed >= 0, f"{prefix}seed", f"must be >= 0, got {self.seed}")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.grid_rows >= 1, f"{prefix}grid_rows", f"must be >= 1, got {self.grid_rows}")


def parse_evaluate_config(mapping: Mapping[str, Any] | None, key: str = "evaluate") -> EvaluateConfig:
    """``params:evaluate`` as an :class:`EvaluateConfig`; a bad value raises ``ConfigError`` naming
    its key."""
    return parse_config(EvaluateConfig, mapping, key)
