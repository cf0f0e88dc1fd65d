"""The evaluation report (``metrics.json``): every key, declared once.

The runner builds an :class:`EvaluationReport`; the table, plots and grid of
:mod:`ibmd_pipeline.evaluation.report` read one. Both are plain dicts in standard JSON, so the
catalog's JSON dataset stores and loads them unchanged. :func:`check_report` compares a report
with these declarations (every required key present, no undeclared key), recursively.
"""

# No ``from __future__ import annotations``: TypedDict reads ``NotRequired`` from the evaluated
# annotations to tell required keys from optional ones.
import typing
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "Checkpoints",
    "ClassifierFacts",
    "ElapsedSeconds",
    "EvaluationReport",
    "FIDFacts",
    "MetricRecord",
    "ModelFacts",
    "Scores",
    "SpeedFacts",
    "StudentFacts",
    "TeacherFacts",
    "WeightsFacts",
    "check_report",
]


class Scores(TypedDict):
    """Quality of one image set; ``None`` when the metric is not measured (``reasons`` says why)."""

    fid: float | None
    lpips: float | None
    ca: float | None  # top-1 accuracy in percent
    psnr: float  # dB, capped per image at ``psnr_cap_db``
    ssim: float


class MetricRecord(Scores):
    """One model at one NFE: its scores, speed and seed."""

    model: Literal["teacher", "student"]
    nfe: int
    sec_per_image: float
    images_per_sec: float
    seed: int
    speedup_vs_teacher: NotRequired[dict[str, float]]  # students only: teacher NFE -> speed-up


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


class TeacherFacts(TypedDict):
    bridge: str
    conditional: bool
    use_ema: bool


class StudentFacts(TypedDict):
    trained_nfe: int
    noise: bool
    evaluated_nfe: list[int]


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


class SpeedFacts(TypedDict):
    batch_size: int
    repeats: int
    min_seconds: float
    warmup: int
    device: str
    baseline: str  # the record label the table's speed-up divides by, e.g. "teacher@100"
    seconds_per_batch: dict[str, list[float]]


class ElapsedSeconds(TypedDict):
    restore: dict[str, float]
    metrics: dict[str, float]
    speed: dict[str, float]
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
    speed: SpeedFacts
    psnr_cap_db: float
    notes: list[str]
    elapsed_seconds: ElapsedSeconds
    config: dict[str, Any]  # the EvaluateConfig as a dict
    grid_columns: list[str]


def _typed_dict_of(annotation: Any) -> type | None:
    """The TypedDict an annotation declares (also inside ``list[...]``, ``NotRequired[...]``)."""
    if typing.is_typeddict(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _typed_dict_of(arg)
        if found is not None:
            return found
    return None


def _errors(value: Any, declared: type, path: str) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"{path or 'report'}: expected a mapping, got {type(value).__name__}"]
    hints = typing.get_type_hints(declared)
    errors = [f"{path}{key}: missing" for key in sorted(declared.__required_keys__ - set(value))]
    errors += [f"{path}{key}: not declared" for key in sorted(set(value) - set(hints))]
    for key in sorted(set(value) & set(hints)):
        nested = _typed_dict_of(hints[key])
        if nested is None:
            continue
        items = value[key] if isinstance(value[key], list) else [value[key]]
        for index, item in enumerate(items):
            where = f"{path}{key}[{index}]." if isinstance(value[key], list) else f"{path}{key}."
            errors += _errors(item, nested, where)
    return errors


def check_report(report: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every key of ``report`` that differs from
    :class:`EvaluationReport` (missing, or not declared), at any depth."""
    errors = _errors(report, EvaluationReport, "")
    if errors:
        raise ValueError("the evaluation report does not match its declaration: " + "; ".join(errors))
