"""Settings of an evaluation run (Kedro ``params:evaluate``), parsed once into frozen configs.

The metric networks themselves (FID Inception, LPIPS AlexNet, the CA classifier) live in
:mod:`ibmd_pipeline.metrics`; this module only says which metrics to compute, on how many test
images and sampler seeds, with which models at which numbers of function evaluations (NFE), and
how intervals and timings are taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ibmd_pipeline.engine.config import parse_config, require
from ibmd_pipeline.engine.distributed import DistributedConfig
from ibmd_pipeline.metrics.classifier import ClassifierConfig

__all__ = [
    "FID_DIMS",
    "BootstrapSettings",
    "CASettings",
    "ClosenessSettings",
    "EvaluateConfig",
    "FIDSettings",
    "KIDSettings",
    "LPIPSSettings",
    "SpeedSettings",
    "parse_evaluate_config",
]

#: Feature sizes of pytorch-fid's Inception blocks; 2048 (pool3) is the standard FID.
FID_DIMS: tuple[int, ...] = (64, 192, 768, 2048)

Sampler = Literal["ancestral", "deterministic"]


@dataclass(frozen=True)
class FIDSettings:
    """Inception metrics (FID and KID) of every model against clean reference images.

    enabled: compute them (needs the Inception weights, see :mod:`ibmd_pipeline.metrics.weights`).
    dims: Inception feature size: 2048 (pool3, the standard and the only one comparable with
        published numbers), or 64 / 192 / 768 (earlier blocks, cheap, for smoke tests).
    batch_size: images per Inception forward.
    num_images: how many of the evaluated images (the first ones) go through Inception for each
        model: the forward at 299x299 is the evaluation's main cost on a CPU. null = all.
    seeds: how many of the sampler seeds (the first ones) go through Inception.
    reference: the clean images the model's features are compared with:
        ``disjoint`` = ``reference_images`` clean images of the training split, none of which is
        restored by any model (the default: no evaluated image is its own reference);
        ``evaluated`` = the clean versions of the images that go through Inception (I2SB's
        paired protocol); ``test_split`` = every clean test image.
    reference_images: the number of training images of the ``disjoint`` reference (null = all).
    """

    enabled: bool = True
    dims: Literal[64, 192, 768, 2048] = 2048
    batch_size: int = 50
    num_images: int | None = 200
    seeds: int = 1
    reference: Literal["disjoint", "evaluated", "test_split"] = "disjoint"
    reference_images: int | None = 300

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_images is not None:
            require(self.num_images >= 4, f"{key}.num_images", f"must be >= 4 or null, got {self.num_images}")
        require(self.seeds >= 1, f"{key}.seeds", f"must be >= 1, got {self.seeds}")
        if self.reference_images is not None:
            require(
                self.reference_images >= 4,
                f"{key}.reference_images",
                f"must be >= 4 or null, got {self.reference_images}",
            )


@dataclass(frozen=True)
class KIDSettings:
    """KID's point estimate: mean and standard deviation over ``subsets`` random subsets of
    ``subset_size`` features (at most the smaller set), as torchmetrics computes it."""

    subset_size: int = 100
    subsets: int = 50

    def validate(self, key: str) -> None:
        require(self.subset_size >= 2, f"{key}.subset_size", f"must be >= 2, got {self.subset_size}")
        require(self.subsets >= 1, f"{key}.subsets", f"must be >= 1, got {self.subsets}")


@dataclass(frozen=True)
class LPIPSSettings:
    """LPIPS (AlexNet, v0.1) of each restoration to its clean image; ``enabled`` needs the weights.

    min_size: both images are upsampled (bilinear, integer factor) until their shorter side is
        at least this many pixels: AlexNet sees a 32-px image as 1x1 maps in its last layers.
    """

    enabled: bool = True
    min_size: int = 64

    def validate(self, key: str) -> None:
        require(
            self.min_size >= 31, f"{key}.min_size", f"must be >= 31 (AlexNet's input), got {self.min_size}"
        )


@dataclass(frozen=True)
class CASettings:
    """Classifier accuracy and the classifier-feature metrics: ``enabled`` trains ``classifier``
    on the clean training split once (the ``evaluate_reference`` pipeline), then measures its
    top-1 accuracy on restorations and the Fréchet distance and KID of its penultimate features
    against the clean evaluated images."""

    enabled: bool = True
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass(frozen=True)
class ClosenessSettings:
    """How close each model's conditional distribution is to the teacher's many-step one.

    On the first ``num_images`` evaluated images, every model draws ``draws`` restorations of
    each input (one per sampler seed, the evaluation's seeds first); the per-image energy
    distance to the reference teacher's draws and the per-pixel standard deviation over draws
    (diversity) are reported.

    teacher_nfe: the reference teacher's NFE, one of ``teacher_nfe``; null = 100 when evaluated,
        else the largest (the table's speed baseline).
    """

    enabled: bool = True
    teacher_nfe: int | None = None
    num_images: int = 50
    draws: int = 4

    def validate(self, key: str) -> None:
        require(self.num_images >= 1, f"{key}.num_images", f"must be >= 1, got {self.num_images}")
        require(self.draws >= 2, f"{key}.draws", f"must be >= 2 (a spread needs two draws), got {self.draws}")


@dataclass(frozen=True)
class BootstrapSettings:
    """Intervals over the evaluated images: ``resamples`` paired resamples (the same for every
    model and the reference), ``confidence`` level, ``seed`` of the resampling."""

    resamples: int = 300
    confidence: float = 0.95
    seed: int = 0

    def validate(self, key: str) -> None:
        require(self.resamples >= 20, f"{key}.resamples", f"must be >= 20, got {self.resamples}")
        require(
            0.5 <= self.confidence < 1.0, f"{key}.confidence", f"must be in [0.5, 1), got {self.confidence}"
        )
        require(self.seed >= 0, f"{key}.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class SpeedSettings:
    """Wall-clock speed of every model, timed together at the end of the evaluation.

    Each round times every model once at batch 1 (latency) and once at ``batch_size``
    (throughput; the first test images, repeated if needed), in an order rotated from round to
    round; the median and interquartile range over the rounds are reported.
    repeats: rounds. warmup: untimed calls of each first.
    min_seconds: one measurement repeats a call until it lasts this long (millisecond one-step
        calls get a stable time).
    threads: CPU threads while timing; 0 = the thread count the evaluation runs with.
    """

    batch_size: int = 16
    repeats: int = 5
    warmup: int = 1
    min_seconds: float = 0.25
    threads: int = 0

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.repeats >= 1, f"{key}.repeats", f"must be >= 1, got {self.repeats}")
        require(self.warmup >= 0, f"{key}.warmup", f"must be >= 0, got {self.warmup}")
        require(self.min_seconds >= 0, f"{key}.min_seconds", f"must be >= 0, got {self.min_seconds}")
        require(self.threads >= 0, f"{key}.threads", f"must be >= 0, got {self.threads}")


def _check_nfe_list(values: tuple[int, ...], key: str) -> None:
    require(len(values) >= 1, key, "must list at least one NFE")
    for index, nfe in enumerate(values):
        require(nfe >= 1, f"{key}[{index}]", f"must be >= 1, got {nfe}")
    require(len(set(values)) == len(values), key, f"lists an NFE twice: {list(values)}")


def speed_baseline_nfe(teacher_nfe: tuple[int, ...]) -> int:
    """The teacher NFE speed-ups and closeness refer to: 100 (the paper's) when evaluated, else
    the teacher's largest."""
    return 100 if 100 in teacher_nfe else max(teacher_nfe)


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation of the teacher and the student on the same test images and seeds.

    num_images: the first this many images of ``pairs_test`` are restored by every model (all of
        them when the split is smaller); every per-image metric and the classifier-feature
        metrics use them. At least 4 (intervals need a few images).
    teacher_nfe: the teacher's sampler is run at each of these NFE (e.g. 1, 10, 100, 999).
    teacher_max_images: NFE -> the most images the teacher restores at that NFE (e.g.
        ``{999: 100}``: a 999-step chain on a CPU); comparisons then use those first images. A
        null count is no cap (it lifts the cap of a config this one is merged over).
    student_nfe: NFE of the student; null = every one of 1, 2, 4 up to the steps N it was
        trained with (a student trained with N steps may run fewer, docs/method.md sec. 4.4).
    sampler: the teacher's sampler, ``ancestral`` (bridge posterior, I2SB) or ``deterministic``
        (DDIM/DBIM): its runs are ``teacher@<nfe>``. The student always runs its own chain.
    teacher_modes: further teacher samplers, each run at every ``teacher_nfe`` as its own rows
        (``teacher_<mode>@<nfe>``), e.g. ``[deterministic]`` for DDBM's DBIM baseline.
    seed, num_seeds: every model restores every image once per sampler seed ``seed``, ...,
        ``seed + num_seeds - 1``, each sampling batch with a fresh generator seeded from the seed
        and the batch's first image: a re-run reproduces every sample, all models see the same
        noise, and so do any number of processes.
    batch_size: images per sampling call (and per LPIPS / classifier call); it sets which images
        share a generator, so a changed batch size changes the draws.
    use_ema: evaluate the EMA weights of teacher and student (as the paper does).
    grid_rows: examples shown in the sample grid.
    distributed: processes that restore and measure the images together
        (``nproc_per_node`` local workers, or the processes of ``torchrun``/``srun``): each takes
        every ``world_size``-th sampling batch, and rank 0 gathers the per-image values and
        features and writes the report, which equals one process's up to float rounding.
    """

    num_images: int = 300
    teacher_nfe: tuple[int, ...] = (1, 10, 100)
    teacher_max_images: dict[int, int] = field(default_factory=dict)
    student_nfe: tuple[int, ...] | None = None
    sampler: Sampler = "ancestral"
    teacher_modes: tuple[Sampler, ...] = ()
    seed: int = 0
    num_seeds: int = 1
    batch_size: int = 64
    use_ema: bool = True
    grid_rows: int = 8
    fid: FIDSettings = field(default_factory=FIDSettings)
    kid: KIDSettings = field(default_factory=KIDSettings)
    lpips: LPIPSSettings = field(default_factory=LPIPSSettings)
    ca: CASettings = field(default_factory=CASettings)
    closeness: ClosenessSettings = field(default_factory=ClosenessSettings)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        # NFE keys arrive as integers from YAML and as strings from a report's JSON.
        caps = {}
        for nfe, count in dict(self.teacher_max_images).items():
            if isinstance(nfe, bool) or not str(nfe).isdigit():
                raise ValueError(f"teacher_max_images: keys are teacher NFE (integers), got {nfe!r}")
            if count is None:  # no cap: how a config merged over another lifts that one's cap
                continue
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"teacher_max_images[{nfe}]: expected an integer or null, got {count!r}")
            caps[int(nfe)] = count
        object.__setattr__(self, "teacher_max_images", caps)

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.num_images >= 4,
            f"{prefix}num_images",
            f"must be >= 4 (intervals need a few images), got {self.num_images}",
        )
        _check_nfe_list(self.teacher_nfe, f"{prefix}teacher_nfe")
        for nfe, count in self.teacher_max_images.items():
            where = f"{prefix}teacher_max_images.{nfe}"
            require(
                nfe in self.teacher_nfe, where, f"NFE {nfe} is not in teacher_nfe {list(self.teacher_nfe)}"
            )
            require(count >= 4, where, f"must be >= 4, got {count}")
        if self.student_nfe is not None:
            _check_nfe_list(self.student_nfe, f"{prefix}student_nfe")
        require(
            self.sampler not in self.teacher_modes
            and len(set(self.teacher_modes)) == len(self.teacher_modes),
            f"{prefix}teacher_modes",
            f"lists a sampler twice or the main sampler '{self.sampler}': {list(self.teacher_modes)}",
        )
        require(self.seed >= 0, f"{prefix}seed", f"must be >= 0, got {self.seed}")
        require(self.num_seeds >= 1, f"{prefix}num_seeds", f"must be >= 1, got {self.num_seeds}")
        require(
            self.fid.seeds <= self.num_seeds,
            f"{prefix}fid.seeds",
            f"must be at most num_seeds ({self.num_seeds}), got {self.fid.seeds}",
        )
        closeness_nfe = self.closeness.teacher_nfe
        require(
            closeness_nfe is None or closeness_nfe in self.teacher_nfe,
            f"{prefix}closeness.teacher_nfe",
            f"must be one of teacher_nfe {list(self.teacher_nfe)} or null, got {closeness_nfe}",
        )
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.grid_rows >= 1, f"{prefix}grid_rows", f"must be >= 1, got {self.grid_rows}")

    @property
    def seeds(self) -> tuple[int, ...]:
        """The sampler seeds of the evaluation."""
        return tuple(range(self.seed, self.seed + self.num_seeds))

    @property
    def draw_seeds(self) -> tuple[int, ...]:
        """The sampler seeds of the closeness draws: the evaluation's seeds first, then further ones."""
        return tuple(range(self.seed, self.seed + self.closeness.draws))

    @property
    def closeness_nfe(self) -> int:
        """The reference teacher NFE of the closeness metrics."""
        return self.closeness.teacher_nfe or speed_baseline_nfe(self.teacher_nfe)


def parse_evaluate_config(mapping: Mapping[str, Any] | None, key: str = "evaluate") -> EvaluateConfig:
    """``params:evaluate`` as an :class:`EvaluateConfig`; a bad value raises ``ConfigError`` naming
    its key."""
    return parse_config(EvaluateConfig, mapping, key)
