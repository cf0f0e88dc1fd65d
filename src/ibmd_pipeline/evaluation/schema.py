"""The evaluation report (``metrics.json``): every key, declared once.

The runner builds an :class:`EvaluationReport`; the table, plots and grid of
:mod:`ibmd_pipeline.evaluation.report` read one. Both are plain dicts in standard JSON, so the
catalog's JSON dataset stores and loads them unchanged. :func:`check_report` compares a report
with these declarations (every required key present, no undeclared key), recursively.
"""

# No ``from __future__ import annotations``: TypedDict reads ``NotRequired`` from the evaluated
# annotations to tell required keys from optional ones.
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "BootstrapFacts",
    "Checkpoints",
    "ClassifierFacts",
    "ClosenessFacts",
    "Comparison",
    "ElapsedSeconds",
    "EvaluationReport",
    "FIDFacts",
    "MetricDifference",
    "MetricRecord",
    "ModelFacts",
    "ProtocolFacts",
    "Scores",
    "SpeedFacts",
    "StudentFacts",
    "TeacherFacts",
    "WeightsFacts",
    "check_report",
    "find_comparison",
]


class Scores(TypedDict):
    """The metrics of one image set; ``None`` when a metric is not measured (``reasons`` says why).

    ``intervals`` holds the 95% interval (``bootstrap.confidence``) of every measured metric.
    """

    fid: float | None
    kid: float | None  # mean over subsets
    kid_std: float | None  # standard deviation over subsets
    fd_classifier: float | None  # Fréchet distance in the classifier's penultimate features
    kid_classifier: float | None
    kid_classifier_std: float | None
    lpips: float | None
    ca: float | None  # top-1 accuracy in percent
    psnr: float  # dB, capped per image at ``psnr_cap_db``
    ssim: float | None
    consistency: float | None  # RMS of A(restoration) - xT in [0, 1] units
    energy_distance: float | None  # to the reference teacher's draws, per image
    diversity: float | None  # per-pixel standard deviation over draws
    images: int  # images of this set (its closeness and Inception subsets are in ``protocol``)
    intervals: dict[str, list[float]]


class MetricRecord(Scores):
    """One model at one NFE: its scores, speed and seeds."""

    model: str  # "teacher" (main sampler), "teacher_<mode>", "student"
    nfe: int
    sampler: str | None  # the teacher's sampler; None for the student
    label: str  # "<model>@<nfe>"
    seed: int  # the first sampler seed
    seeds: list[int]
    sec_per_image: float  # throughput batch: median seconds / batch size
    sec_per_image_iqr: float
    images_per_sec: float
    latency_seconds: float  # batch of one: median seconds
    latency_iqr_seconds: float
    speedup_vs_teacher: NotRequired[dict[str, float]]  # students: teacher NFE -> throughput speed-up
    latency_speedup_vs_teacher: NotRequired[dict[str, float]]  # students: teacher NFE -> latency speed-up
    lpips_win_rate: NotRequired[float | None]  # students: share of images with lower LPIPS than the baseline


class MetricDifference(TypedDict):
    """``candidate - baseline`` of one metric, its interval and the verdict drawn from it."""

    difference: float
    interval: list[float] | None
    verdict: Literal["better", "tie", "worse"] | None


class Comparison(TypedDict):
    """A student run against a teacher run, on their common first images."""

    candidate: str
    baseline: str
    images: int
    metrics: dict[str, MetricDifference]
    ca_mcnemar: NotRequired[dict[str, float | int]]  # a_only, b_only, p_value
    lpips_win_rate: NotRequired[dict[str, Any]]  # rate, interval


def find_comparison(comparisons: Sequence[Comparison], candidate: str, baseline: str) -> Comparison | None:
    """The comparison of run ``candidate`` against run ``baseline`` (labels ``<model>@<nfe>``), if any."""
    for comparison in comparisons:
        if comparison["candidate"] == candidate and comparison["baseline"] == baseline:
            return comparison
    return None


class WeightsFacts(TypedDict):
    """Where the FID and LPIPS weights came from (``official:<path>`` / ``offline:<package>``)."""

    fid: str | None
    lpips: str | None


class Checkpoints(TypedDict):
    """Catalog versions of what was evaluated."""

    teacher: str | None
    student: str | None
    classifier: str | None
    teacher_of_student: str | None
    teacher_evaluation: str | None  # the cached teacher evaluation (None: measured in this run)


class TeacherFacts(TypedDict):
    bridge: str
    conditional: bool
    use_ema: bool
    samplers: list[str]
    # bfloat16 autocast during the model's training, as its checkpoint records it (None: not
    # recorded, e.g. an imported teacher). Evaluation itself samples in float32.
    trained_bf16: bool | None
    # training steps as its checkpoint records them: what ran, after any time budget (README,
    # "The default run on your CPU"); None: not recorded
    trained_steps: int | None


class StudentFacts(TypedDict):
    trained_nfe: int
    noise: bool
    evaluated_nfe: list[int]
    trained_bf16: bool | None  # as TeacherFacts.trained_bf16
    trained_steps: int | None  # generator updates, as TeacherFacts.trained_steps


class ModelFacts(TypedDict):
    teacher: TeacherFacts
    student: StudentFacts


class ClassifierFacts(TypedDict):
    """The frame of every CA: the classifier on the clean (ceiling) and corrupted (floor) images."""

    ceiling: float | None
    floor: float | None
    reason: str | None
    clean_test_accuracy: float | None  # on the whole clean test split


class FIDFacts(TypedDict):
    dims: int | None
    reference: str | None
    reference_images: int | None


class ClosenessFacts(TypedDict):
    teacher: str | None  # the reference run, e.g. "teacher@100"
    images: int
    draws: int


class BootstrapFacts(TypedDict):
    resamples: int
    confidence: float
    seed: int
    means: str
    sets: str


class ProtocolFacts(TypedDict):
    """How the numbers were taken."""

    seeds: list[int]
    images: int
    inception_images: int
    inception_seeds: int
    closeness: ClosenessFacts
    bootstrap: BootstrapFacts
    kid: dict[str, int]  # subset_size, subsets
    lpips_min_size: int
    directions: dict[str, str]  # metric -> "lower" / "higher" is better


class SpeedFacts(TypedDict):
    batch_size: int
    repeats: int
    min_seconds: float
    warmup: int
    threads: int
    device: str
    baseline: str  # the record label speed-ups divide by, e.g. "teacher@100"
    seconds_per_batch: dict[str, list[float]]  # throughput batch, one value per round
    latency_seconds: dict[str, list[float]]  # batch of one, one value per round
    loops: dict[str, dict[str, int]]  # calls per measurement: {"latency", "throughput"}


class ElapsedSeconds(TypedDict):
    restore: dict[str, float]  # per run: restoring and per-image metrics
    metrics: dict[str, float]  # "summary": intervals, FID, KID, comparisons
    speed: dict[str, float]  # "round_robin"
    total: float


class EvaluationReport(TypedDict):
    """The whole ``metrics.json``."""

    records: list[MetricRecord]
    task: str | None
    task_config: dict[str, Any]
    dataset: str
    image_size: int
    channels: int
    num_images: int
    seed: int
    sampler: str
    device: str
    weights: WeightsFacts
    checkpoints: Checkpoints
    models: ModelFacts
    classifier: ClassifierFacts
    corrupted_input: Scores
    reasons: dict[str, str]  # metric -> why it is null
    fid: FIDFacts
    protocol: ProtocolFacts
    comparisons: list[Comparison]
    speed: SpeedFacts
    psnr_cap_db: float
    notes: list[str]
    elapsed_seconds: ElapsedSeconds
    config: dict[str, Any]  # the EvaluateConfig as a dict
    grid_columns: list[str]


def _nested(annotation: Any) -> tuple[str, type] | None:
    """``(container, TypedDict)`` an annotation declares: ``("one", T)`` for ``T`` (also inside
    ``T | None``), ``("list", T)`` for ``list[T]``, ``("dict", T)`` for ``dict[str, T]``."""
    if typing.is_typeddict(annotation):
        return "one", annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and typing.is_typeddict(args[0]):
        return "list", args[0]
    if origin is dict and len(args) == 2 and typing.is_typeddict(args[1]):
        return "dict", args[1]
    for arg in args:  # Optional[T], NotRequired[T]
        if typing.is_typeddict(arg):
            return "one", arg
    return None


def _errors(value: Any, declared: type, path: str) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"{path or 'report'}: expected a mapping, got {type(value).__name__}"]
    hints = typing.get_type_hints(declared)
    errors = [f"{path}{key}: missing" for key in sorted(declared.__required_keys__ - set(value))]
    errors += [f"{path}{key}: not declared" for key in sorted(set(value) - set(hints))]
    for key in sorted(set(value) & set(hints)):
        nested = _nested(hints[key])
        if nested is None or value[key] is None:
            continue
        container, kind = nested
        if container == "list":
            items = [(f"{path}{key}[{i}].", item) for i, item in enumerate(value[key])]
        elif container == "dict":
            items = [(f"{path}{key}.{name}.", item) for name, item in value[key].items()]
        else:
            items = [(f"{path}{key}.", value[key])]
        for where, item in items:
            errors += _errors(item, kind, where)
    return errors


def check_report(report: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every key of ``report`` that differs from
    :class:`EvaluationReport` (missing, or not declared), at any depth."""
    errors = _errors(report, EvaluationReport, "")
    if errors:
        raise ValueError("the evaluation report does not match its declaration: " + "; ".join(errors))
