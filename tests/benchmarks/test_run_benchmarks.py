"""``benchmarks/run_benchmarks.py``: one grid row end to end on the tiny ``test`` settings, the
results file's schema and arithmetic, the grid's settings, the table and the README block.

The row runs the real pipelines in Kedro sessions on its environment ``bench_sr4x_bicubic`` with
the ``test`` env's sizes beneath its settings, over a copy of ``conf/`` that moves its data root
under ``tmp_path``: nothing is written to ``benchmarks/results``, ``benchmarks/work`` or ``data/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from kedro.config import OmegaConfigLoader

from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.evaluation import parse_evaluate_config, resolve_student_nfe
from ibmd_pipeline.parameters import SECTION_PARSERS, validate_parameters
from ibmd_pipeline.settings import CONFIG_LOADER_ARGS
from ibmd_pipeline.teacher.config import parse_teacher_config
from ibmd_pipeline.teacher.trainer import plan_teacher

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import run_benchmarks as rb  # noqa: E402
from row_conf import isolated_conf  # noqa: E402

RESULT_KEYS = {
    "schema", "row", "task", "task_config", "labels", "teacher", "distill", "evaluate", "quick", "env",
    "overrides", "hardware", "timings", "cost", "records", "evaluation", "fid_vs_distill_steps",
    "created", "git", "command",
}
RECORD_KEYS = {
    "model", "nfe", "fid", "lpips", "ca", "psnr", "ssim", "sec_per_image", "images_per_sec", "seed"
}


# ---------------------------------------------------------------- one row, end to end


def test_a_row_writes_its_results_file_with_the_documented_schema(row_run):
    path, result, root = row_run
    assert path == root / "results" / "sr4x_bicubic.json"
    json.dumps(result, allow_nan=False)
    assert set(result) == RESULT_KEYS
    assert (result["schema"], result["row"], result["task"], result["quick"], result["env"]) == (
        rb.SCHEMA, "sr4x_bicubic", "sr4x_bicubic", False, "test"
    )
    assert result["labels"] == {"task": "sr4x_bicubic", "teacher": "I2SB (unconditional)"}
    teacher = result["teacher"]
    assert (teacher["schedule"], teacher["conditional"], teacher["ot_ode"]) == ("i2sb", False, False)
    assert (teacher["network"], teacher["steps"], teacher["beta_max"]) == ("tiny", 24, 0.3)  # conf/test
    assert teacher["parameters"] > 0
    distill = result["distill"]
    assert (distill["student_nfe"], distill["steps"], distill["L"], distill["K"], distill["batch_size"]) == (
        1, 4, 5, 1, 4
    )
    assert result["evaluate"]["teacher_nfe"] == [1, 4] and result["evaluate"]["student_nfe"] == [1]
    assert result["evaluate"]["num_images"] == 16 and result["evaluation"]["task"] == "sr4x_bicubic"
    assert result["overrides"]["engine"] == {"device": "cpu", "num_threads": torch.get_num_threads()}
    assert result["hardware"]["torch"] == torch.__version__ and result["hardware"]["cpu"]
    assert result["hardware"]["torch_threads"] == torch.get_num_threads()
    # the row's own data root holds the catalog's outputs
    reports = root / "work" / "sr4x_bicubic" / "data" / "08_reporting" / "metrics.json"
    assert list(reports.glob("*/metrics.json"))


def test_records_carry_the_speedup_against_every_teacher_nfe(row_run):
    _, result, _ = row_run
    records = result["records"]
    assert [(r["model"], r["nfe"]) for r in records] == [("teacher", 1), ("teacher", 4), ("student", 1)]
    teacher_seconds = {r["nfe"]: r["sec_per_image"] for r in records if r["model"] == "teacher"}
    for record in records:
        assert RECORD_KEYS <= set(record)
        for nfe, seconds in teacher_seconds.items():
            assert record[f"speedup_vs_teacher_nfe{nfe}"] == pytest.approx(seconds / record["sec_per_image"])
    assert records[0]["speedup_vs_teacher_nfe1"] == 1.0
    student = records[-1]  # the evaluation's own speed-ups agree
    assert student["speedup_vs_teacher_nfe4"] == pytest.approx(student["speedup_vs_teacher"]["4"])


def test_speedup_is_the_teachers_seconds_per_image_over_the_records_own():
    records = [
        {"model": "teacher", "nfe": 1, "sec_per_image": 0.01},
        {"model": "teacher", "nfe": 100, "sec_per_image": 1.0},
        {"model": "student", "nfe": 2, "sec_per_image": 0.02, "speedup_vs_teacher": {"100": 50.0}},
    ]
    with_speedups = rb.add_speedups(records)
    speedups = [(r["speedup_vs_teacher_nfe1"], r["speedup_vs_teacher_nfe100"]) for r in with_speedups]
    assert speedups == [(1.0, 100.0), (0.01, 1.0), (0.5, 50.0)]
    assert with_speedups[2]["speedup_vs_teacher"] == {"100": 50.0}
    assert "speedup_vs_teacher_nfe1" not in records[0]


def test_timings_and_cost_are_measured(row_run):
    _, result, _ = row_run
    timings = result["timings"]
    stages = ("degrade_s", "teacher_s", "distill_s", "evaluate_s", "cost_s", "curve_s")
    assert all(timings[key] > 0 for key in stages)
    assert timings["total_s"] >= sum(timings[key] for key in stages)
    cost = result["cost"]
    assert cost["update_over_teacher_step"] == pytest.approx(cost["update_s"] / cost["teacher_step_s"])
    assert cost["update_over_teacher_step"] > 0 and cost["L"] == 5 and cost["batch_size"] == 4
    memory = cost["peak_memory_bytes"]
    peaks = memory["update"]["peak"] / memory["teacher_step"]["peak"]
    assert cost["peak_memory_ratio"] == pytest.approx(peaks)
    assert all(m["peak"] >= m["after_setup"] > 0 for m in memory.values())


def test_the_distillation_curve_ends_at_the_rows_own_student(row_run):
    _, result, _ = row_run
    curve = result["fid_vs_distill_steps"]
    assert [point["steps"] for point in curve] == [2, 4]  # conftest.CURVE
    assert 0 < curve[0]["distill_s"] < curve[1]["distill_s"]
    assert all(isinstance(point["fid"], float) and point["psnr"] > 0 for point in curve)
    # same settings, teacher, data and seeds: the run's last snapshot is the pipeline's student
    student = result["records"][-1]
    for metric in ("fid", "psnr", "ssim", "ca"):
        assert curve[-1][metric] == pytest.approx(student[metric], rel=1e-4, abs=1e-6), metric


# ---------------------------------------------------------------- the table and the README


def test_the_table_lists_each_row_once_full_results_before_quick_ones(row_run, tmp_path):
    _, result, _ = row_run
    quick_same_row = {**result, "quick": True, "records": result["records"][:1]}
    quick_other_row = {**result, "row": "jpeg5", "quick": True, "fid_vs_distill_steps": None}
    rb.write_json(tmp_path / "jpeg5.quick.json", quick_other_row)
    rb.write_json(tmp_path / "sr4x_bicubic.quick.json", quick_same_row)
    rb.write_json(tmp_path / "sr4x_bicubic.json", result)
    (tmp_path / "other.json").write_text(json.dumps({"records": []}))  # not results files: skipped
    (tmp_path / "list.json").write_text("[]")
    loaded = rb.load_results(tmp_path)
    assert [(r["row"], r["quick"]) for r in loaded] == [("sr4x_bicubic", False), ("jpeg5", True)]

    table = rb.render_table(loaded)
    main, _, rest = table.partition("\n\n")
    lines = main.splitlines()
    assert lines[0].startswith("| row | task | teacher | student NFE (train) | model | NFE | FID |")
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(cells) == 6 and all(len(row) == 21 for row in cells), [(len(r), r) for r in cells]
    assert [row[0] for row in cells] == ["sr4x_bicubic", "", "", "jpeg5 (quick)", "", ""]
    student, record = cells[2], result["records"][2]
    interval = record["intervals"]["fid"]
    assert student[4:7] == ["student", "1", f"{record['fid']:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"]
    # the student's differences to the teacher, with the verdicts drawn from their intervals
    (comparison,) = [
        c for c in result["evaluation"]["comparisons"]
        if c["candidate"] == "student@1" and c["baseline"] == "teacher@4"
    ]
    verdict = comparison["metrics"]["kid"]["verdict"]
    assert student[13].startswith("vs teacher@4: KID ") and f"**{verdict}**" in student[13]
    assert cells[0][13] == ""  # the teacher's own lines carry no verdict
    assert student[15] == (
        f"1: {record['speedup_vs_teacher_nfe1']:.3g}×, 4: {record['speedup_vs_teacher_nfe4']:.3g}×"
    )
    assert cells[0][16] == f"{result['timings']['teacher_s'] / 60:.1f} min" and student[16] == ""
    assert cells[0][18] == f"{result['cost']['update_over_teacher_step']:.2f}×"
    precision = {True: "bf16", False: "fp32"}
    assert cells[0][20] == f"{precision[result['teacher']['bf16']]} / {precision[result['distill']['bf16']]}"
    assert f"Measured on {result['hardware']['cpu']}" in rest
    assert "(sr4x_bicubic, jpeg5 (quick))" in rest
    curve_rows = [line for line in rest.splitlines() if line.startswith(("| 2 |", "| 4 |"))]
    assert len(curve_rows) == 2 and "FID against distillation length, sr4x_bicubic:" in rest


def test_the_readme_block_is_replaced_between_its_markers():
    text = f"# Title\n\nintro\n{rb.TABLE_START}\nold table\n{rb.TABLE_END}\nafter\n"
    new = rb.replace_marked_block(text, "| a |\n|---|\n")
    assert new == f"# Title\n\nintro\n{rb.TABLE_START}\n| a |\n|---|\n{rb.TABLE_END}\nafter\n"
    assert rb.replace_marked_block(new, "| a |\n|---|\n") == new
    for broken in (
        "no markers",
        f"{rb.TABLE_START}\nx\n",
        f"{rb.TABLE_END}\nx\n{rb.TABLE_START}\n",
        f"{rb.TABLE_START}\n{rb.TABLE_START}\n{rb.TABLE_END}\n",
    ):
        with pytest.raises(ValueError, match="benchmark-table:start"):
            rb.replace_marked_block(broken, "| a |")


def test_table_command_updates_the_readme_or_refuses_without_markers(row_run, tmp_path, capsys):
    path, result, _ = row_run
    rb.write_json(tmp_path / "results" / path.name, result)
    readme = tmp_path / "README.md"
    readme.write_text(f"# R\n{rb.TABLE_START}\n{rb.TABLE_END}\n")
    args = ["--table", "--update-readme", "--out", str(tmp_path / "results"), "--readme", str(readme)]
    assert rb.main(args) == 0
    table = rb.render_table([result])
    assert readme.read_text() == f"# R\n{rb.TABLE_START}\n{table.strip()}\n{rb.TABLE_END}\n"
    assert table in capsys.readouterr().out
    readme.write_text("# R without markers\n")
    assert rb.main(args) == 2
    assert readme.read_text() == "# R without markers\n"
    assert rb.TABLE_START in capsys.readouterr().err


# ---------------------------------------------------------------- the grid's settings


def _loader(row: str) -> OmegaConfigLoader:
    """The configuration ``kedro run --env bench_<row>`` sees."""
    conf = str(PROJECT_ROOT / "conf")
    return OmegaConfigLoader(conf_source=conf, env=rb.row_env(row), **CONFIG_LOADER_ARGS)


@pytest.mark.parametrize("row", list(rb.ROWS))
def test_every_row_is_a_valid_configuration_of_the_teacher_it_names(row):
    params, label = _loader(row)["parameters"], rb.ROWS[row]
    # as `kedro run --env bench_<row>` checks it: every section but the import of a published
    # teacher, which a row's pipelines never run
    validate_parameters(params, set(SECTION_PARSERS) - {"teacher_import"})
    task = parse_config(TaskConfig, params["task"], "task")
    plan = plan_teacher(parse_teacher_config(params["teacher"], seed=0), task, image_size=32, channels=1)
    bridge = plan.resolved.bridge
    assert bridge.kind == ("i2sb" if label.teacher.startswith("I2SB") else "ddbm_vp")
    assert bridge.ot_ode == ("OT-ODE" in label.teacher)
    assert plan.resolved.conditional == ("(conditional)" in label.teacher)
    distill = parse_distill_config(params["distill"])
    evaluate = parse_evaluate_config(params["evaluate"])
    assert distill.student_nfe == label.student_nfe
    assert resolve_student_nfe(evaluate, distill.student_nfe)
    for nfe in evaluate.teacher_nfe:
        plan.schedule.grid(nfe)  # every evaluated NFE is one the teacher's sampler can run
    if task.kind.startswith(("sr4x", "jpeg")):  # the paper's full I2SB chain
        assert max(evaluate.teacher_nfe) == plan.schedule.n_timesteps - 1 == rb.I2SB_FULL_CHAIN_NFE
    if task.kind == "jpeg":
        assert task.jpeg_quality == int(row.removeprefix("jpeg"))


def test_the_grid_is_the_issues_grid():
    grid = {(r.task, r.teacher, r.student_nfe) for r in rb.ROWS.values()}
    assert grid == {
        ("sr4x_bicubic", "I2SB (unconditional)", 1),
        ("sr4x_pool", "I2SB (unconditional)", 1),
        ("jpeg (quality 5)", "I2SB (unconditional)", 1),
        ("jpeg (quality 10)", "I2SB (unconditional)", 1),
        ("inpaint_center", "I2SB (OT-ODE)", 4),
        ("inpaint_center", "DDBM-VP (conditional)", 4),
        ("sketch", "DDBM-VP (conditional)", 1),
        ("sketch", "DDBM-VP (conditional)", 2),
    }


def test_quick_settings_and_overrides_layer_in_order():
    quick = rb.row_params("sr4x_bicubic", quick=True, device="cpu", threads=2)
    assert quick["teacher"]["train"]["steps"] == 600 and quick["distill"]["train"]["steps"] == 100
    assert quick["evaluate"] == {
        "teacher_nfe": [1, 10, 100], "student_nfe": [1], "num_images": 100, "num_seeds": 1,
        "closeness": {"num_images": 100}, "fid": {"num_images": 100, "reference_images": 1000},
        "teacher_max_images": {999: None},
    }
    assert quick["engine"] == {"device": "cpu", "num_threads": 2}
    full = rb.row_params("sr4x_bicubic", quick=False, device="auto", threads=2)
    assert full["evaluate"]["teacher_nfe"] == [1, 10, 100, 999] and "train" not in full["teacher"]
    longer = {"distill": {"train": {"steps": 7}}}
    extra = rb.row_params("sketch-n2", quick=True, device="cpu", threads=1, extra=longer)
    assert extra["distill"] == {"student_nfe": 2, "aux_steps": 5, "lr_generator": 3e-5, "train": {"steps": 7}}
    assert rb.row_settings("sr4x_bicubic")["evaluate"]["teacher_nfe"] == [1, 10, 100, 999]  # not mutated
    beneath = rb.row_params("sketch-n1", quick=False, device="cpu", threads=1, env="test")
    assert beneath["teacher"]["model"] == {  # conf/test's tiny network, the row's bridge over it
        "network": {"preset": "tiny"}, "schedule": "ddbm_vp", "conditional": True, "ot_ode": False
    }
    assert beneath["task"] == {"kind": "sketch"} and beneath["distill"]["train"]["steps"] == 4
    assert rb.results_path(Path("r"), "jpeg5", True) == Path("r/jpeg5.quick.json")
    assert rb.results_path(Path("r"), "jpeg5", False) == Path("r/jpeg5.json")


def test_each_row_is_an_environment_with_its_own_data_root():
    envs = {p.name for p in (PROJECT_ROOT / "conf").iterdir() if p.name.startswith(rb.ROW_ENV_PREFIX)}
    assert envs == {rb.row_env(row) for row in rb.ROWS}
    for row in rb.ROWS:
        loader = _loader(row)
        assert loader["globals"]["data_root"] == f"benchmarks/work/{row}/data"
        teacher_file = loader["catalog"]["teacher_model"]["filepath"]
        assert teacher_file == f"benchmarks/work/{row}/data/06_models/teacher.pt"
        assert rb.row_data_root(row) == PROJECT_ROOT / "benchmarks" / "work" / row / "data"
    # the row's settings are what its environment changes over conf/base, nothing else
    assert rb.row_settings("jpeg5")["task"] == {"kind": "jpeg", "jpeg_quality": 5}
    assert set(rb.row_settings("jpeg5")) == {"task", "teacher", "distill", "evaluate", "budget"}


def test_a_data_root_that_is_not_a_rows_own_is_never_wiped(tmp_path):
    conf = isolated_conf(tmp_path)
    data_root = rb.row_data_root("sr4x_bicubic", conf)
    assert data_root == tmp_path / "work" / "sr4x_bicubic" / "data"
    (data_root / "06_models").mkdir(parents=True)
    rb.wipe_data_root("sr4x_bicubic", data_root)
    assert not data_root.exists()
    project_data = tmp_path / "data"
    project_data.mkdir()
    with pytest.raises(ValueError, match="refusing to wipe"):
        rb.wipe_data_root("sr4x_bicubic", project_data)
    with pytest.raises(ValueError, match="refusing to wipe"):
        rb.wipe_data_root("jpeg5", data_root)  # another row's
    assert project_data.exists()


def test_unknown_environments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown configuration environment 'nope'; allowed: .*test"):
        rb.check_env("nope")
    with pytest.raises(ValueError, match="unknown configuration environment"):
        rb.row_params("jpeg5", quick=False, device="cpu", threads=1, env="nope")


# ---------------------------------------------------------------- the command line


def test_row_ids_are_checked_and_errors_name_the_allowed_ones(capsys):
    with pytest.raises(ValueError) as err:
        rb.parse_rows(["sr4x_bicubic", "sr8x"])
    assert "'sr8x'" in str(err.value) and "allowed: " + ", ".join(rb.ROWS) in str(err.value)
    assert rb.parse_rows(["jpeg5", "jpeg5", "sketch-n1"]) == ["jpeg5", "sketch-n1"]
    with pytest.raises(SystemExit) as exit_info:
        rb.main(["--row", "sr8x"])
    assert exit_info.value.code == 2
    assert "allowed: sr4x_bicubic, sr4x_pool, jpeg5, jpeg10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rb.main([])
    assert "give --row ROW, --all or --quick" in capsys.readouterr().err


def test_curve_and_set_arguments_are_parsed_or_refused():
    assert rb.parse_curve("300, 50,100,50") == (50, 100, 300)
    for bad in ("", "0,10", "ten", "5,-1"):
        with pytest.raises(ValueError, match="--distill-steps-curve"):
            rb.parse_curve(bad)
    assignments = ["distill.train.steps=600", "evaluate.teacher_nfe=[1, 10]", "task.kind=jpeg",
                   "distill.lr_generator=3e-5", "distill.lr_aux=1.0e-4", "distill.noise=nan"]
    assert rb.parse_assignments(assignments) == {
        "distill": {"train": {"steps": 600}, "lr_generator": 3e-5, "lr_aux": 1e-4, "noise": "nan"},
        "evaluate": {"teacher_nfe": [1, 10]}, "task": {"kind": "jpeg"},
    }
    for bad in ("steps", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            rb.parse_assignments([bad])


def test_the_command_runs_the_chosen_rows_and_goes_on_after_a_failure(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_row(row, **settings):
        calls.append((row, settings))
        if row == "jpeg5":
            raise RuntimeError("boom")

    monkeypatch.setattr(rb, "run_row", fake_run_row)
    assert rb.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    [(row, settings)] = calls
    assert row == rb.QUICK_ROW and settings["quick"] and settings["threads"] == 1 and settings["curve"] == ()
    calls.clear()
    args = ["--all", "--set", "distill.train.steps=7", "--distill-steps-curve", "3,1", "--out", str(tmp_path)]
    assert rb.main(args) == 1
    assert [row for row, _ in calls] == list(rb.ROWS)  # the failed jpeg5 did not stop the others
    settings = calls[0][1]
    assert settings["curve"] == (1, 3) and settings["extra_params"] == {"distill": {"train": {"steps": 7}}}
    assert not settings["quick"]
    assert "failed rows: jpeg5" in capsys.readouterr().err
