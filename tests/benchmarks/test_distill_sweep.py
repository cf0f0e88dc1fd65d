"""``benchmarks/distill_sweep.py``: a two-setting sweep on the tiny row's trained teacher, the
grid's parsing and its errors, the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import distill_sweep as ds  # noqa: E402
from row_conf import isolated_conf  # noqa: E402


@pytest.fixture(scope="module")
def sweep(row_run):
    _, _, root = row_run
    grid = ds.parse_grid(["distill.lr_generator=1e-3,1e-5"])
    return ds.run_sweep(
        "sr4x_bicubic", grid, steps=2, every=1, threads=torch.get_num_threads(), device="cpu",
        env="test", conf_source=root / "conf",
    )


def test_each_setting_distils_its_own_student_from_the_same_start(sweep):
    results = sweep["results"]
    assert [r["setting"] for r in results] == [{"distill.lr_generator": 1e-3}, {"distill.lr_generator": 1e-5}]
    for result in results:
        assert [step for step, _ in result["gaps"]] == [0, 1, 2]
        assert result["student_nfe"] == 1 and result["distill_s"] > 0
        assert result["best_gap"] == min(gap for _, gap in result["gaps"])
        assert result["last_gap"] == result["gaps"][-1][1] and result["raw_last_gap"] is not None
        assert {"teacher_nfe1", "teacher_self"} <= set(result["references"])
    # the same seed and start: identical before training, different after different learning rates
    first, second = results
    assert first["gaps"][0] == second["gaps"][0]
    assert first["gaps"][-1] != second["gaps"][-1]
    assert sweep["steps"] == 2 and sweep["teacher_steps"] == 24  # conf/test's teacher
    json.dumps(sweep, allow_nan=False)


def test_the_table_has_a_row_per_setting_and_names_the_references(sweep):
    table = ds.render(sweep["results"])
    lines = table.splitlines()
    assert lines[0].startswith("| setting | gap @0 | gap @1 | gap @2 | best (step)")
    assert lines[2].startswith("| lr_generator=0.001 |") and lines[3].startswith("| lr_generator=1e-05 |")
    assert "teacher_nfe1" in lines[-1]


def test_the_command_writes_its_json(row_run, tmp_path, capsys):
    _, _, root = row_run
    out = tmp_path / "sweep.json"
    code = ds.main([
        "--row", "sr4x_bicubic", "--env", "test", "--conf-source", str(root / "conf"), "--steps", "1",
        "--every", "1", "--device", "cpu", "--threads", str(torch.get_num_threads()), "--out", str(out),
    ])
    assert code == 0
    written = json.loads(out.read_text())
    assert written["row"] == "sr4x_bicubic" and [r["setting"] for r in written["results"]] == [{}]
    assert "| row's |" in capsys.readouterr().out


def test_grid_values_are_typed_and_combined_in_order():
    grid = ds.parse_grid(["distill.lr_generator=3e-4, 1e-4", "distill.train.batch_size=16,32"])
    assert grid == [("distill.lr_generator", [3e-4, 1e-4]), ("distill.train.batch_size", [16, 32])]
    settings = ds.settings_of(grid)
    assert len(settings) == 4
    assert settings[1] == {"distill.lr_generator": 3e-4, "distill.train.batch_size": 32}
    assert ds.nested(settings[1]) == {"lr_generator": 3e-4, "train": {"batch_size": 32}}
    config = ds.sweep_distill_config(
        {"lr_generator": 1.0, "workdir": "w", "train": {"steps": 300, "seed": 0}, "validation": {"every": 0}},
        settings[1], steps=10, every=5,
    )
    assert config == {
        "lr_generator": 3e-4, "workdir": None, "train": {"steps": 10, "seed": 0, "batch_size": 32},
        "validation": {"every": 5},
    }


@pytest.mark.parametrize(
    "item",
    ["lr_generator=1e-4", "distill.lr_generator", "distill.=1", "teacher.train.steps=5", "distill.lr="],
)
def test_malformed_grid_items_are_refused_by_name(item):
    with pytest.raises(ValueError, match="--grid"):
        ds.parse_grid([item])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        ds.parse_grid(["distill.lr_generator=1", "distill.lr_generator=2"])


def test_a_row_without_a_trained_run_says_how_to_get_one(tmp_path, capsys):
    conf = isolated_conf(tmp_path, "jpeg5")  # its data root is an empty temporary folder
    with pytest.raises(FileNotFoundError, match="run_benchmarks.py"):
        ds.trained_row("jpeg5", conf)
    with pytest.raises(SystemExit):
        ds.main(["--row", "no_such_row"])
    assert "allowed" in capsys.readouterr().err
    assert ds.main(["--row", "jpeg5", "--conf-source", str(conf), "--device", "cpu"]) == 2
