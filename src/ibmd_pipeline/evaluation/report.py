"""What an evaluation report shows a reader: the tables, the plots and the sample grid.

All of them are pure functions of the report (:class:`~ibmd_pipeline.evaluation.schema.EvaluationReport`,
and, for the grid, of the kept samples), so they can be redrawn from any saved ``metrics.json``.
Every value is shown with its 95% interval, and every verdict (better / tie / worse) is the
one the report drew from the interval of a difference, never from two point values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports are drawn in worker processes without a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

from ibmd_pipeline.evaluation.schema import Comparison, EvaluationReport, MetricRecord, Scores  # noqa: E402

__all__ = [
    "best_teacher_nfe",
    "grid_columns",
    "metric_cell",
    "metrics_table",
    "plot_report",
    "run_title",
    "verdict_cell",
]

_BRIDGE_NAMES = {"i2sb": "I2SB", "ddbm_vp": "DDBM"}
#: KID values are small; tables and plots show them times this.
KID_SCALE = 1000.0
# column title, record key, number format, scale; "↓"/"↑" say which direction is better
_QUALITY_COLUMNS = (
    ("FID ↓", "fid", "{:.2f}", 1.0),
    ("KID ×10³ ↓", "kid", "{:.2f}", KID_SCALE),
    ("FD cls ↓", "fd_classifier", "{:.3g}", 1.0),
    ("KID cls ×10³ ↓", "kid_classifier", "{:.3g}", KID_SCALE),
    ("LPIPS ↓", "lpips", "{:.3f}", 1.0),
    ("CA ↑ (%)", "ca", "{:.1f}", 1.0),
    ("PSNR ↑ (dB)", "psnr", "{:.2f}", 1.0),
    ("SSIM ↑", "ssim", "{:.3f}", 1.0),
)
_TARGET_COLUMNS = (
    ("Energy dist. ↓", "energy_distance", "{:.4f}", 1.0),
    ("Diversity", "diversity", "{:.4f}", 1.0),
    ("Consistency ↓", "consistency", "{:.4f}", 1.0),
)
_MISSING = "–"


def _fmt(value: Any, pattern: str, scale: float = 1.0) -> str:
    return _MISSING if value is None else pattern.format(value * scale)


def _cell(scores: Scores, key: str, pattern: str, scale: float = 1.0) -> str:
    """``value [low, high]``, or the value alone when it has no interval."""
    value = scores.get(key)
    if value is None:
        return _MISSING
    interval = (scores.get("intervals") or {}).get(key)
    text = _fmt(value, pattern, scale)
    if interval:
        text += f" [{_fmt(interval[0], pattern, scale)}, {_fmt(interval[1], pattern, scale)}]"
    return text


def _column(key: str) -> tuple[str, float]:
    """The number format and scale of metric ``key`` in every table."""
    for _, column_key, pattern, scale in (*_QUALITY_COLUMNS, *_TARGET_COLUMNS):
        if column_key == key:
            return pattern, scale
    raise KeyError(f"no table column for metric {key!r}")


def metric_cell(scores: Scores, key: str) -> str:
    """Metric ``key`` of ``scores`` as the report's tables show it: ``value [low, high]``."""
    return _cell(scores, key, *_column(key))


def verdict_cell(comparison: Comparison, key: str) -> str:
    """Metric ``key`` of a comparison as the report shows it: ``difference [low, high] **verdict**``."""
    return _verdict_cell(comparison, key, _column(key)[1])


def _teacher_records(report: EvaluationReport) -> list[MetricRecord]:
    """The teacher's main-sampler records, by NFE."""
    return sorted((r for r in report["records"] if r["model"] == "teacher"), key=lambda r: r["nfe"])


def _mode_records(report: EvaluationReport) -> list[MetricRecord]:
    """The records of the teacher's further sampler modes, by mode and NFE."""
    return sorted(
        (r for r in report["records"] if r["model"].startswith("teacher_")),
        key=lambda r: (r["model"], r["nfe"]),
    )


def _student_records(report: EvaluationReport) -> list[MetricRecord]:
    return sorted((r for r in report["records"] if r["model"] == "student"), key=lambda r: r["nfe"])


def _teacher_name(report: EvaluationReport, sampler: str | None = None) -> str:
    bridge = (report.get("models") or {}).get("teacher", {}).get("bridge")
    name = f"Teacher ({_BRIDGE_NAMES.get(bridge, bridge)})" if bridge else "Teacher"
    return f"{name}, {sampler}" if sampler and sampler != report.get("sampler") else name


def run_title(label: str) -> str:
    """A run label as a reader names it: ``teacher@100`` -> ``teacher NFE 100``."""
    model, _, nfe = label.partition("@")
    return f"{model.replace('_', ' ')} NFE {nfe}" if nfe else model.replace("_", " ")


def best_teacher_nfe(report: EvaluationReport) -> int:
    """The teacher NFE with the lowest FID (else KID, else LPIPS; else the largest NFE)."""
    teachers = _teacher_records(report)
    for metric in ("fid", "kid", "lpips"):
        scored = [r for r in teachers if r.get(metric) is not None]
        if scored:
            return int(min(scored, key=lambda r: (r[metric], -r["nfe"]))["nfe"])
    return int(teachers[-1]["nfe"])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _row_name(report: EvaluationReport, record: MetricRecord) -> str:
    return "IBMD student" if record["model"] == "student" else _teacher_name(report, record["sampler"])


def _quality_table(report: EvaluationReport, records: list[MetricRecord]) -> list[str]:
    header = ["Model", "NFE", *(title for title, *_ in _QUALITY_COLUMNS)]
    rows = [
        [
            "Corrupted input (xT)",
            _MISSING,
            *(_cell(report["corrupted_input"], k, p, s) for _, k, p, s in _QUALITY_COLUMNS),
        ]
    ]
    for record in records:
        rows.append(
            [
                _row_name(report, record),
                str(record["nfe"]),
                *(_cell(record, k, p, s) for _, k, p, s in _QUALITY_COLUMNS),
            ]
        )
    return _table(header, rows)


def _target_and_speed_table(report: EvaluationReport, records: list[MetricRecord]) -> list[str]:
    baseline = report["speed"]["baseline"]
    by_label = {r["label"]: r for r in records}
    base = by_label.get(baseline)
    header = [
        "Model",
        "NFE",
        *(title for title, *_ in _TARGET_COLUMNS),
        "Latency (s, IQR)",
        "s/img (IQR)",
        f"Speed-up vs {run_title(baseline)} (throughput, latency)",
    ]
    rows = []
    for record in records:
        speedup = _MISSING
        if base is not None:
            speedup = (
                f"{base['sec_per_image'] / record['sec_per_image']:.1f}×, "
                f"{base['latency_seconds'] / record['latency_seconds']:.1f}×"
            )
        rows.append(
            [
                _row_name(report, record),
                str(record["nfe"]),
                *(_cell(record, k, p, s) for _, k, p, s in _TARGET_COLUMNS),
                f"{record['latency_seconds']:.3g} ({record['latency_iqr_seconds']:.2g})",
                f"{record['sec_per_image']:.3g} ({record['sec_per_image_iqr']:.2g})",
                speedup,
            ]
        )
    return _table(header, rows)


def _verdict_cell(comparison: Comparison, metric: str, scale: float) -> str:
    """``difference [low, high] **verdict**``, to three significant digits (differences are small)."""
    pattern = "{:.3g}"
    entry = comparison["metrics"].get(metric)
    if entry is None:
        return _MISSING
    text = _fmt(entry["difference"], pattern, scale)
    if entry["interval"]:
        low, high = entry["interval"]
        text += f" [{_fmt(low, pattern, scale)}, {_fmt(high, pattern, scale)}]"
    return f"{text} **{entry['verdict']}**" if entry["verdict"] else text


def _verdict_table(report: EvaluationReport) -> list[str]:
    comparisons = report.get("comparisons") or []
    if not comparisons:
        return []
    header = [
        "Student − teacher",
        *(f"{run_title(c['candidate'])} − {run_title(c['baseline'])}" for c in comparisons),
    ]
    rows = []
    for title, key, _, scale in (*_QUALITY_COLUMNS, *_TARGET_COLUMNS[:1], *_TARGET_COLUMNS[2:]):
        if any(key in c["metrics"] for c in comparisons):
            rows.append([title, *(_verdict_cell(c, key, scale) for c in comparisons)])
    wins = [c.get("lpips_win_rate") for c in comparisons]
    if any(wins):
        rows.append(
            [
                "LPIPS win rate",
                *(
                    _MISSING
                    if not w
                    else f"{100 * w['rate']:.0f}%"
                    + (
                        f" [{100 * w['interval'][0]:.0f}, {100 * w['interval'][1]:.0f}]"
                        if w["interval"]
                        else ""
                    )
                    for w in wins
                ),
            ]
        )
    tests = [c.get("ca_mcnemar") for c in comparisons]
    if any(tests):
        rows.append(
            [
                "CA McNemar p",
                *(
                    _MISSING if not t else f"{t['p_value']:.3g} ({t['a_only']} vs {t['b_only']})"
                    for t in tests
                ),
            ]
        )
    return _table(header, rows)


def metrics_table(report: EvaluationReport) -> str:
    """The report as markdown: quality with 95% intervals; closeness to the teacher, consistency
    and speed; the student-minus-teacher differences with their verdicts; the run's facts."""
    records = _teacher_records(report) + _mode_records(report) + _student_records(report)
    protocol = report["protocol"]
    confidence = f"{100 * protocol['bootstrap']['confidence']:.0f}%"
    seeds = protocol["seeds"]
    lines = [
        f"## {report['task']} on {report['dataset'] or 'the test split'}: "
        f"{report['num_images']} test images, "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}",
        "",
        f"Values with their {confidence} intervals over test images ([low, high]).",
        "",
        *_quality_table(report, records),
        "",
        *_target_and_speed_table(report, records),
    ]
    verdicts = _verdict_table(report)
    if verdicts:
        lines += [
            "",
            f"Differences student − teacher with {confidence} intervals; the verdict (better, tie, "
            "worse) is whether the interval excludes 0.",
            "",
            *verdicts,
        ]
    lines += _facts(report)
    return "\n".join(lines) + "\n"


def _training_fact(models: Mapping[str, Any]) -> str:
    """What training ran, as the checkpoints record it (after any time budget)."""

    def precision(facts: Mapping[str, Any]) -> str:
        bf16 = facts.get("trained_bf16")
        return "" if bf16 is None else (" in bf16" if bf16 else " in float32")

    def count(facts: Mapping[str, Any], unit: str) -> str:
        steps = facts.get("trained_steps")
        return f"{unit} not recorded" if steps is None else f"{steps:,} {unit}"

    teacher, student = models["teacher"], models["student"]
    return (
        f"Training: teacher {count(teacher, 'steps')}{precision(teacher)}, student "
        f"{count(student, 'generator updates')}{precision(student)}."
    )


def _facts(report: EvaluationReport) -> list[str]:
    protocol, classifier = report["protocol"], report["classifier"]
    facts = [""]
    if classifier.get("ceiling") is not None:
        facts.append(
            f"CA ceiling (classifier on the clean images): {classifier['ceiling']:.1f}%; "
            f"floor (on the corrupted input): {classifier['floor']:.1f}%."
        )
    for metric, reason in report.get("reasons", {}).items():
        facts.append(f"{metric} not measured: {reason}.")
    fid = report.get("fid") or {}
    if fid.get("dims") is not None:
        facts.append(
            f"FID, KID: {fid['dims']}-d Inception features of the first "
            f"{protocol['inception_images']} images "
            f"({protocol['inception_seeds']} seed(s)) against {fid['reference_images']} clean images "
            f"({fid['reference']} reference); weights {report['weights']['fid']}. KID: mean (std) over "
            f"{protocol['kid']['subsets']} subsets of {protocol['kid']['subset_size']}."
        )
    facts.append(
        "FD cls, KID cls: the task classifier's penultimate features against the clean evaluated images."
    )
    closeness = protocol["closeness"]
    if closeness["teacher"]:
        facts.append(
            f"Energy distance: per image, {closeness['draws']} draws against "
            f"{run_title(closeness['teacher'])}'s {closeness['draws']} draws, on the first "
            f"{closeness['images']} images (for that teacher itself: "
            "half of its draws against the other half); diversity: per-pixel standard deviation over draws."
        )
    if report["weights"].get("lpips"):
        facts.append(
            f"LPIPS: AlexNet v0.1 on images upsampled to at least {protocol['lpips_min_size']} px, "
            f"weights {report['weights']['lpips']}."
        )
    speed = report["speed"]
    facts.append(
        f"Speed: every model timed together, {speed['repeats']} interleaved rounds at batch 1 (latency) and "
        f"batch {speed['batch_size']} (s/img), each measurement at least {speed['min_seconds']:g} s, after "
        f"{speed['warmup']} warm-up call(s), {speed['threads']} thread(s) on {speed['device']}: "
        "median (IQR). "
        f"PSNR capped at {report['psnr_cap_db']:g} dB per image."
    )
    bootstrap = protocol["bootstrap"]
    facts.append(
        f"Intervals: {bootstrap['resamples']} resamples (seed {bootstrap['seed']}), the same for "
        "every model; "
        f"means: {bootstrap['means']}; FID and KID: {bootstrap['sets']}."
    )
    facts.append(_training_fact(report["models"]))
    versions = report["checkpoints"]
    facts.append(
        f"Checkpoints: teacher {versions['teacher']}, student {versions['student']} "
        f"(distilled from teacher {versions['teacher_of_student']}), classifier {versions['classifier']}, "
        f"teacher evaluation {versions['teacher_evaluation'] or 'measured in this run'}; sampler "
        f"{report['sampler']}, seeds {protocol['seeds']}."
    )
    facts += [f"Note: {note}." for note in report.get("notes", [])]
    return facts


# ---------------------------------------------------------------------------------------------
# Plots


def _error(record: Mapping[str, Any], key: str, scale: float) -> tuple[float, float]:
    """Distances from the value down and up to its interval ends (0 without an interval)."""
    interval = (record.get("intervals") or {}).get(key)
    if not interval:
        return 0.0, 0.0
    value = record[key] * scale
    return max(0.0, value - interval[0] * scale), max(0.0, interval[1] * scale - value)


def _points(records: Sequence[Mapping[str, Any]], x_key: str, y_key: str, scale: float = 1.0):
    chosen = [r for r in records if r.get(y_key) is not None and r.get(x_key) is not None]
    xs = [r[x_key] for r in chosen]
    ys = [r[y_key] * scale for r in chosen]
    errors = [_error(r, y_key, scale) for r in chosen]
    return chosen, xs, ys, ([e[0] for e in errors], [e[1] for e in errors])


def _unavailable(ax: Axes, metric: str, report: EvaluationReport) -> None:
    reason = report.get("reasons", {}).get(metric, "not measured")
    ax.text(
        0.5,
        0.5,
        f"{metric} not measured:\n{reason}",
        ha="center",
        va="center",
        transform=ax.transAxes,
        wrap=True,
    )


def _nfe_axis(ax: Axes, nfes: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_xticks(nfes)  # plain tick labels at the evaluated NFE rather than powers of ten
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _against_nfe(ax: Axes, report: EvaluationReport, metric: str, title: str, scale: float = 1.0) -> None:
    ax.set_title(title)
    _nfe_axis(ax, sorted({r["nfe"] for r in report["records"]}))
    teachers = _teacher_records(report)
    _, xs, ys, errors = _points(teachers, "nfe", metric, scale)
    if not xs:
        _unavailable(ax, metric, report)
        return
    ax.errorbar(xs, ys, yerr=errors, fmt="o-", color="tab:blue", capsize=3, label=_teacher_name(report))
    for mode in sorted({r["model"] for r in _mode_records(report)}):
        records = [r for r in _mode_records(report) if r["model"] == mode]
        _, mx, my, merr = _points(records, "nfe", metric, scale)
        if mx:
            ax.errorbar(
                mx,
                my,
                yerr=merr,
                fmt="s--",
                color="tab:purple",
                capsize=3,
                label=_teacher_name(report, records[0]["sampler"]),
            )
    chosen, sx, sy, serr = _points(_student_records(report), "nfe", metric, scale)
    if sx:
        ax.errorbar(
            sx, sy, yerr=serr, fmt="*", markersize=14, color="tab:red", capsize=3, label="IBMD student"
        )
    corrupted = report["corrupted_input"].get(metric)
    if corrupted is not None:
        ax.axhline(corrupted * scale, color="gray", ls="--", lw=1, label="corrupted input")
    if metric == "ca" and report["classifier"].get("ceiling") is not None:
        ax.axhline(
            report["classifier"]["ceiling"], color="tab:green", ls=":", lw=1.5, label="clean images (ceiling)"
        )


def _perception_distortion(ax: Axes, report: EvaluationReport) -> None:
    """KID (perception) against PSNR (distortion): every run a point with both intervals."""
    ax.set_title("perception-distortion: KID ×10³ ↓ vs PSNR ↑")
    ax.set_xlabel("PSNR (dB)")
    ax.set_ylabel("KID ×10³")
    groups = (
        (_teacher_records(report), "o", "tab:blue", _teacher_name(report)),
        (_mode_records(report), "s", "tab:purple", "teacher, other samplers"),
        (_student_records(report), "*", "tab:red", "IBMD student"),
    )
    plotted = False
    for records, marker, color, label in groups:
        chosen = [r for r in records if r.get("kid") is not None]
        if not chosen:
            continue
        ax.errorbar(
            [r["psnr"] for r in chosen],
            [r["kid"] * KID_SCALE for r in chosen],
            xerr=list(zip(*(_error(r, "psnr", 1.0) for r in chosen), strict=True)),
            yerr=list(zip(*(_error(r, "kid", KID_SCALE) for r in chosen), strict=True)),
            fmt=marker,
            markersize=12 if marker == "*" else 6,
            color=color,
            capsize=3,
            label=label,
        )
        for r in chosen:
            ax.annotate(
                f"{r['nfe']}",
                (r["psnr"], r["kid"] * KID_SCALE),
                textcoords="offset points",
                xytext=(5, 5),
                color=color,
            )
        plotted = True
    if not plotted:
        _unavailable(ax, "kid", report)


def _against_time(ax: Axes, report: EvaluationReport) -> None:
    ax.set_title("KID ×10³ ↓ vs seconds per image")
    ax.set_xscale("log")
    speed = report["speed"]
    ax.set_xlabel(f"seconds per image (batch {speed['batch_size']}, {speed['device']})")
    plotted = False
    for records, marker, color, label in (
        (_teacher_records(report), "o-", "tab:blue", _teacher_name(report)),
        (_student_records(report), "*", "tab:red", "IBMD student"),
    ):
        chosen, xs, ys, errors = _points(records, "sec_per_image", "kid", KID_SCALE)
        if xs:
            ax.errorbar(
                xs,
                ys,
                yerr=errors,
                fmt=marker,
                markersize=14 if marker == "*" else 6,
                color=color,
                capsize=3,
                label=label,
            )
            for r, x, y in zip(chosen, xs, ys, strict=True):
                ax.annotate(
                    f"NFE {r['nfe']}", (x, y), textcoords="offset points", xytext=(6, -12), color=color
                )
            plotted = True
    if not plotted:
        _unavailable(ax, "kid", report)


def plot_report(report: EvaluationReport) -> Figure:
    """Six panels with 95% error bars: FID, KID, classifier FD and CA against NFE (log x); the
    perception-distortion plane (KID against PSNR); KID against seconds per image.

    The teacher is a line over its NFE, other teacher samplers dashed, student points are red
    stars; dashed lines mark the corrupted input and, for CA, the classifier's ceiling.
    """
    figure, axes = plt.subplots(2, 3, figsize=(18, 10))
    _against_nfe(axes[0, 0], report, "fid", "FID ↓ vs NFE")
    _against_nfe(axes[0, 1], report, "kid", "KID ×10³ ↓ vs NFE", KID_SCALE)
    _perception_distortion(axes[0, 2], report)
    _against_nfe(axes[1, 0], report, "fd_classifier", "classifier-feature FD ↓ vs NFE")
    _against_nfe(axes[1, 1], report, "ca", "classifier accuracy ↑ (%) vs NFE")
    _against_time(axes[1, 2], report)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    dataset = report["dataset"] or "the test split"
    seeds = len(report["protocol"]["seeds"])
    figure.suptitle(
        f"{report['task']} on {dataset}: {report['num_images']} test images, {seeds} seed(s); "
        "error bars: 95% intervals"
    )
    figure.tight_layout()
    return figure


def grid_columns(report: EvaluationReport, samples: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """The sample grid's titled columns, left to right: corrupted | the teacher at each NFE (and
    each further sampler) | the student at each NFE | clean. Returns ``(title, images)`` pairs."""
    records = _teacher_records(report) + _mode_records(report) + _student_records(report)
    columns = [("corrupted", samples["corrupted"])]
    columns += [(run_title(r["label"]), samples[r["label"]]) for r in records if r["label"] in samples]
    columns.append(("clean", samples["clean"]))
    return columns
