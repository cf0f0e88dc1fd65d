"""The tables, the plots and the grid columns, drawn from a real report of a tiny evaluation."""

import copy

import pytest
import torch
from evaluation_fakes import tiny_config
from matplotlib.figure import Figure

from ibmd_pipeline.evaluation import (
    best_teacher_nfe,
    grid_columns,
    metrics_table,
    plot_report,
    run_evaluation,
    run_title,
)
from ibmd_pipeline.evaluation.report import KID_SCALE


@pytest.fixture(scope="module")
def evaluated(pairs_test, teacher_sr, student_sr, references):
    config = tiny_config(num_seeds=2, teacher_modes=["deterministic"])
    return run_evaluation(
        pairs_test,
        teacher_sr,
        student_sr,
        config,
        fid_reference=references["fid"],
        classifier=references["classifier"],
        progress=False,
        dataset="toy shapes",
    )


@pytest.fixture
def report(evaluated):
    return copy.deepcopy(evaluated.report)


def _rows(table: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``header_start``."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_quality_table_shows_every_value_with_its_interval(report):
    table = metrics_table(report)
    assert table.startswith("## sr4x_bicubic on toy shapes: 8 test images, 2 seeds")
    header = next(line for line in table.splitlines() if line.startswith("| Model | NFE | FID"))
    assert header.split(" | ")[2:6] == ["FID ↓", "KID ×10³ ↓", "FD cls ↓", "KID cls ×10³ ↓"]
    rows = _rows(table, "| Model | NFE | FID")
    assert [row[:2] for row in rows] == [
        ["Corrupted input (xT)", "–"],
        ["Teacher (I2SB)", "1"],
        ["Teacher (I2SB)", "3"],
        ["Teacher (I2SB), deterministic", "1"],
        ["Teacher (I2SB), deterministic", "3"],
        ["IBMD student", "1"],
    ]
    student = report["records"][-1]
    low, high = student["intervals"]["psnr"]
    assert rows[-1][8] == f"{student['psnr']:.2f} [{low:.2f}, {high:.2f}]"
    kid_low, _ = student["intervals"]["kid"]
    assert rows[-1][3].startswith(f"{student['kid'] * KID_SCALE:.2f} [{kid_low * KID_SCALE:.2f}, ")


def test_target_and_speed_table_gives_closeness_latency_and_speed_ups(report):
    table = metrics_table(report)
    rows = _rows(table, "| Model | NFE | Energy dist.")
    assert [row[:2] for row in rows][-1] == ["IBMD student", "1"] and len(rows) == 5
    student = report["records"][-1]
    baseline = next(r for r in report["records"] if r["label"] == "teacher@3")
    throughput = baseline["sec_per_image"] / student["sec_per_image"]
    latency = baseline["latency_seconds"] / student["latency_seconds"]
    assert rows[-1][-1] == f"{throughput:.1f}×, {latency:.1f}×"
    assert "Speed-up vs teacher NFE 3 (throughput, latency)" in table


def test_verdict_table_gives_each_difference_its_interval_and_verdict(report):
    table = metrics_table(report)
    header = next(line for line in table.splitlines() if line.startswith("| Student − teacher"))
    assert (
        "student NFE 1 − teacher NFE 3" in header and "student NFE 1 − teacher deterministic NFE 3" in header
    )
    rows = {row[0]: row[1:] for row in _rows(table, "| Student − teacher")}
    comparison = report["comparisons"][1]  # student@1 - teacher@3
    entry = comparison["metrics"]["psnr"]
    low, high = entry["interval"]
    assert (
        rows["PSNR ↑ (dB)"][1] == f"{entry['difference']:.3g} [{low:.3g}, {high:.3g}] **{entry['verdict']}**"
    )
    rate = comparison["lpips_win_rate"]["rate"]
    assert rows["LPIPS win rate"][1].startswith(f"{100 * rate:.0f}% [")
    assert rows["CA McNemar p"][1].startswith(f"{comparison['ca_mcnemar']['p_value']:.3g} (")
    assert "Diversity" not in rows  # no better direction, no verdict


def test_facts_say_how_every_number_was_taken(report):
    table = metrics_table(report)
    assert "against 16 clean images (disjoint reference)" in table
    assert "4 draws against teacher NFE 3's 4 draws, on the first 4 images" in table
    assert "1 interleaved rounds at batch 1 (latency) and batch 2 (s/img)" in table
    assert "40 resamples (seed 0), the same for every model" in table
    assert "LPIPS: AlexNet v0.1 on images upsampled to at least 64 px" in table
    report["reasons"]["lpips"] = "disabled (evaluate.lpips.enabled: false)"
    assert "lpips not measured: disabled (evaluate.lpips.enabled: false)." in metrics_table(report)


def test_plot_has_error_bars_against_nfe_and_the_perception_distortion_plane(report):
    figure = plot_report(report)
    assert isinstance(figure, Figure) and len(figure.axes) == 6
    ax_fid, ax_kid, ax_pd, ax_fd, ax_ca, ax_time = figure.axes
    assert [ax.get_xscale() for ax in (ax_fid, ax_kid, ax_fd, ax_ca, ax_time)] == ["log"] * 5
    teacher_line = ax_kid.get_lines()[0]
    teachers = [r for r in report["records"] if r["model"] == "teacher"]
    assert list(teacher_line.get_xdata()) == [1, 3]
    assert list(teacher_line.get_ydata()) == pytest.approx([r["kid"] * KID_SCALE for r in teachers])
    # each point has its 95% interval as an error bar
    bars = ax_kid.containers[0]
    low, high = teachers[0]["intervals"]["kid"]
    segment = bars.lines[2][0].get_segments()[0]
    assert [y for _, y in segment] == pytest.approx([low * KID_SCALE, high * KID_SCALE])
    labels = set(ax_pd.get_legend_handles_labels()[1])
    assert {"Teacher (I2SB)", "IBMD student", "teacher, other samplers"} <= labels
    assert ax_pd.get_xlabel() == "PSNR (dB)" and ax_pd.get_ylabel() == "KID ×10³"
    assert {"clean images (ceiling)", "corrupted input"} <= set(ax_ca.get_legend_handles_labels()[1])


def test_plot_says_why_a_metric_is_missing(report):
    for record in report["records"]:
        record["fid"] = None
    report["reasons"]["fid"] = "disabled (evaluate.fid.enabled: false)"
    texts = [t.get_text() for t in plot_report(report).axes[0].texts]
    assert texts == ["fid not measured:\ndisabled (evaluate.fid.enabled: false)"]


def test_grid_columns_are_titled_corrupted_each_teacher_nfe_the_student_and_clean(report, evaluated):
    columns = grid_columns(report, evaluated.samples)
    assert [title for title, _ in columns] == [
        "corrupted",
        "teacher NFE 1",
        "teacher NFE 3",
        "teacher deterministic NFE 1",
        "teacher deterministic NFE 3",
        "student NFE 1",
        "clean",
    ]
    assert torch.equal(columns[2][1], evaluated.samples["teacher@3"])
    assert run_title("teacher_deterministic@10") == "teacher deterministic NFE 10"


def test_best_teacher_nfe_is_the_lowest_fid_then_kid_then_lpips(report):
    for record, fid in zip(report["records"], (3.0, 2.0, 1.0, 1.0, 0.5), strict=True):
        record["fid"] = fid
    assert best_teacher_nfe(report) == 3  # the main sampler's teachers only
    for record, kid in zip(report["records"], (0.1, 0.2, 0.0, 0.0, 0.0), strict=True):
        record["fid"], record["kid"] = None, kid
    assert best_teacher_nfe(report) == 1
    for record in report["records"]:
        record["kid"] = record["lpips"] = None
    assert best_teacher_nfe(report) == 3  # nothing measured: the largest NFE
