"""What an evaluation report shows a reader: the paper-style table, the plots and the sample grid.

All three are pure functions of the report (:class:`~ibmd_pipeline.evaluation.schema.EvaluationReport`,
and, for the grid, of the kept samples), so they can be redrawn from any saved ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are drawn in worker processes without a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

from ibmd_pipeline.evaluation.schema import EvaluationReport, MetricRecord  # noqa: E402

__all__ = ["best_teacher_nfe", "grid_columns", "metrics_table", "plot_report"]

_BRIDGE_NAMES = {"i2sb": "I2SB", "ddbm_vp": "DDBM"}
# column title, record key, number format; "↓"/"↑" say which direction is better
_TABLE_COLUMNS = (
    ("FID ↓", "fid", "{:.2f}"),
    ("LPIPS ↓", "lpips", "{:.3f}"),
    ("CA ↑ (%)", "ca", "{:.1f}"),
    ("PSNR ↑ (dB)", "psnr", "{:.2f}"),
    ("SSIM ↑", "ssim", "{:.3f}"),
)
_MISSING = "–"


def _fmt(value: Any, pattern: str) -> str:
    return _MISSING if value is None else pattern.format(value)


def _teacher_records(report: EvaluationReport) -> list[MetricRecord]:
    return sorted((r for r in report["records"] if r["model"] == "teacher"), key=lambda r: r["nfe"])


def _student_records(report: EvaluationReport) -> list[MetricRecord]:
    return sorted((r for r in report["records"] if r["model"] == "student"), key=lambda r: r["nfe"])


def _teacher_name(report: EvaluationReport) -> str:
    bridge = (report.get("models") or {}).get("teacher", {}).get("bridge")
    return f"Teacher ({_BRIDGE_NAMES.get(bridge, bridge)})" if bridge else "Teacher"


def best_teacher_nfe(report: EvaluationReport) -> int:
    """The teacher NFE with the lowest FID (lowest LPIPS when FID is off; else the largest NFE)."""
    teachers = _teacher_records(report)
    for metric in ("fid", "lpips"):
        scored = [r for r in teachers if r.get(metric) is not None]
        if scored:
            return int(min(scored, key=lambda r: (r[metric], -r["nfe"]))["nfe"])
    return int(teachers[-1]["nfe"])


def metrics_table(report: EvaluationReport) -> str:
    """The report as a markdown table in the paper's style, with the run's facts under it.

    Rows: the corrupted input, the teacher at each NFE, the student at each NFE. Columns: FID,
    LPIPS, CA, PSNR, SSIM, seconds per image and the speed-up over the teacher at NFE 100 (or
    at its largest NFE when 100 was not evaluated).
    """
    baseline = report["speed"]["baseline"]
    baseline_seconds = next(
        r["sec_per_image"] for r in report["records"] if f"{r['model']}@{r['nfe']}" == baseline
    )
    titles = [title for title, _, _ in _TABLE_COLUMNS]
    header = ["Model", "NFE", *titles, "s/img", f"Speed-up vs {baseline.replace('@', ' NFE ')}"]
    lines = [
        f"## {report['task']} on {report['dataset'] or 'the test split'}: {report['num_images']} test images",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    corrupted = report["corrupted_input"]
    lines.append(
        "| Corrupted input (xT) | " + _MISSING + " | "
        + " | ".join(_fmt(corrupted.get(key), pattern) for _, key, pattern in _TABLE_COLUMNS)
        + f" | {_MISSING} | {_MISSING} |"
    )
    names = {"teacher": _teacher_name(report), "student": "IBMD student"}
    for record in _teacher_records(report) + _student_records(report):
        cells = [names[record["model"]], str(record["nfe"])]
        cells += [_fmt(record.get(key), pattern) for _, key, pattern in _TABLE_COLUMNS]
        cells += [f"{record['sec_per_image']:.3g}", f"{baseline_seconds / record['sec_per_image']:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")

    classifier = report["classifier"]
    facts = [""]
    if classifier.get("ceiling") is not None:
        facts.append(
            f"CA ceiling (classifier on the clean images): {classifier['ceiling']:.1f}%; "
            f"floor (on the corrupted input): {classifier['floor']:.1f}%."
        )
    for metric, reason in report.get("reasons", {}).items():
        facts.append(f"{metric.upper()} not measured: {reason}.")
    fid = report.get("fid") or {}
    if fid.get("dims") is not None:
        facts.append(
            f"FID: {fid['dims']}-d Inception features against {fid['reference_images']} clean test images "
            f"({fid['reference']}); weights {report['weights']['fid']}."
        )
    if report["weights"].get("lpips"):
        facts.append(f"LPIPS: AlexNet v0.1, weights {report['weights']['lpips']}.")
    speed = report["speed"]
    calls = f"{speed['repeats']} timed batches"
    if speed.get("min_seconds"):
        calls = f"at least {speed['repeats']} timed batches and {speed['min_seconds']:g} s of timed work"
    facts.append(
        f"Speed: median of {calls}, batches of {speed['batch_size']}, after {speed['warmup']} "
        f"warm-up call(s) on {speed['device']}. PSNR capped at {report['psnr_cap_db']:g} dB per image."
    )
    versions = report["checkpoints"]
    facts.append(
        f"Checkpoints: teacher {versions['teacher']}, student {versions['student']} "
        f"(distilled from teacher {versions['teacher_of_student']}), classifier {versions['classifier']}; "
        f"sampler {report['sampler']}, seed {report['seed']}."
    )
    facts += [f"Note: {note}." for note in report.get("notes", [])]
    return "\n".join(lines + facts) + "\n"


def _mark_students(ax: Axes, students: list[MetricRecord], x_key: str, y_key: str) -> None:
    points = [(r[x_key], r[y_key], r["nfe"]) for r in students if r.get(y_key) is not None]
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker="*", s=220, color="tab:red",
                   zorder=3, label="IBMD student")
        for x, y, nfe in points:
            ax.annotate(f"{nfe}", (x, y), textcoords="offset points", xytext=(6, 6), color="tab:red")


def _unavailable(ax: Axes, metric: str, report: EvaluationReport) -> None:
    reason = report.get("reasons", {}).get(metric, "not measured")
    ax.text(0.5, 0.5, f"{metric.upper()} not measured:\n{reason}", ha="center", va="center",
            transform=ax.transAxes, wrap=True)


def plot_report(report: EvaluationReport) -> Figure:
    """Three panels: FID vs NFE, CA vs NFE (both log x) and FID vs seconds per image (log x).

    The teacher is a line over its NFE, student points are red stars; dashed lines mark the
    corrupted input and, for CA, the classifier's ceiling (clean images) and floor.
    """
    teachers, students = _teacher_records(report), _student_records(report)
    figure, (ax_fid, ax_ca, ax_speed) = plt.subplots(1, 3, figsize=(16, 4.8))
    teacher_label = _teacher_name(report)
    nfes = sorted({r["nfe"] for r in report["records"]})

    panels = ((ax_fid, "fid", "FID ↓ vs NFE"), (ax_ca, "ca", "classifier accuracy ↑ vs NFE"))
    for ax, metric, title in panels:
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations)")
        # plain tick labels at the evaluated NFE rather than powers of ten
        ax.set_xticks(nfes)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        points = [(r["nfe"], r[metric]) for r in teachers if r.get(metric) is not None]
        if not points:
            _unavailable(ax, metric, report)
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue", label=teacher_label)
        _mark_students(ax, students, "nfe", metric)
        corrupted = report["corrupted_input"].get(metric)
        if corrupted is not None:
            label = "corrupted input (floor)" if metric == "ca" else "corrupted input"
            ax.axhline(corrupted, color="gray", ls="--", lw=1, label=label)
        ax.set_ylabel("FID" if metric == "fid" else "CA (%)")
    ceiling = report["classifier"].get("ceiling")
    if ceiling is not None:
        ax_ca.axhline(ceiling, color="tab:green", ls=":", lw=1.5, label="clean images (ceiling)")

    ax_speed.set_title("FID ↓ vs seconds per image")
    ax_speed.set_xscale("log")
    speed = report["speed"]
    ax_speed.set_xlabel(f"seconds per image (batch {speed['batch_size']}, {speed['device']})")
    points = [(r["sec_per_image"], r["fid"], r["nfe"]) for r in teachers if r.get("fid") is not None]
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax_speed.plot(xs, ys, "o-", color="tab:blue", label=teacher_label)
        for x, y, nfe in points:
            ax_speed.annotate(
                f"NFE {nfe}", (x, y), textcoords="offset points", xytext=(6, -12), color="tab:blue"
            )
        _mark_students(ax_speed, students, "sec_per_image", "fid")
        ax_speed.set_ylabel("FID")
    else:
        _unavailable(ax_speed, "fid", report)
    for ax in (ax_fid, ax_ca, ax_speed):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    dataset = report["dataset"] or "the test split"
    figure.suptitle(f"{report['task']} on {dataset}: {report['num_images']} test images")
    figure.tight_layout()
    return figure


def grid_columns(report: EvaluationReport, samples: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """The sample grid's columns, left to right: corrupted | teacher at its smallest NFE |
    teacher at its best NFE (lowest FID; dropped when that is the smallest) | student at its
    largest evaluated NFE | clean. Returns ``(title, images)`` pairs."""
    teacher_nfes = [r["nfe"] for r in _teacher_records(report)]
    best = best_teacher_nfe(report)
    student_nfe = _student_records(report)[-1]["nfe"]
    fastest = f"teacher@{teacher_nfes[0]}"
    columns = [("corrupted", samples["corrupted"]), (fastest, samples[fastest])]
    if best != teacher_nfes[0]:
        columns.append((f"teacher@{best}", samples[f"teacher@{best}"]))
    columns += [(f"student@{student_nfe}", samples[f"student@{student_nfe}"]), ("clean", samples["clean"])]
    return columns
