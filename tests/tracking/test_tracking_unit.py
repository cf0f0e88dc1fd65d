"""The pure half of tracking: the ``tracking`` block, parameter flattening, metric names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.hooks import ARTIFACT_FILES, default_run_name
from ibmd_pipeline.tracking import (
    PARAM_VALUE_LIMIT,
    SteppedMetric,
    TrackingConfig,
    airflow_tags,
    evaluation_metrics,
    flatten_params,
    history_metrics,
    parse_tracking_config,
    resolve_tracking_uri,
)

CONF = Path(__file__).resolve().parents[2] / "conf"

REPORT = {
    "records": [
        {"model": "teacher", "nfe": 1, "fid": 0.27, "lpips": 0.14, "ca": 6.25, "psnr": 15.0, "ssim": 0.6,
         "sec_per_image": 0.0026, "images_per_sec": 388.2, "seed": 0},
        {"model": "teacher", "nfe": 4, "fid": None, "lpips": 0.09, "ca": None, "psnr": 14.3, "ssim": 0.27,
         "sec_per_image": 0.0119, "images_per_sec": 84.2, "seed": 0},
        {"model": "student", "nfe": 1, "fid": 0.26, "lpips": 0.13, "ca": 12.5, "psnr": 15.1, "ssim": 0.61,
         "sec_per_image": 0.0027, "images_per_sec": 363.5, "seed": 0,
         "speedup_vs_teacher": {"1": 0.94, "4": 4.32}},
    ],
    "task": "sr4x_bicubic",
    "corrupted_input": {"fid": 3.5, "lpips": 0.3, "ca": None, "psnr": 12.0, "ssim": 0.4},
    "classifier": {"ceiling": 90.0, "floor": 10.0, "reason": None, "clean_test_accuracy": 90.0},
    "notes": ["text is not a metric"],
}


# ---------------------------------------------------------------- the tracking block


def test_shipped_block_is_off_and_points_at_the_data_root():
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    for env, root in (("base", "data"), ("test", "data/test"), ("imagenet256", "data/imagenet256")):
        # env "base" is base alone (conf/local is machine-local and may enable tracking)
        loader = OmegaConfigLoader(conf_source=str(CONF), env=env, **CONFIG_LOADER_ARGS)
        config = parse_tracking_config(loader["parameters"]["tracking"])
        assert config == TrackingConfig(uri=f"{root}/09_tracking/mlruns")
        assert config.enabled is False


def test_missing_block_means_tracking_off():
    assert parse_tracking_config(None) == TrackingConfig()
    assert parse_tracking_config({"enabled": True}).enabled is True


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"enabled": "yes"}, "tracking.enabled"),
        ({"uri": "  "}, "tracking.uri"),
        ({"experiment": ""}, "tracking.experiment"),
        ({"run_name": 3}, "tracking.run_name"),
        ({"log_artifact": False}, "tracking.log_artifact"),
    ],
)
def test_bad_settings_name_their_key(block, key):
    with pytest.raises(ConfigError) as err:
        parse_tracking_config(block)
    assert err.value.key == key


def test_folders_become_file_uris_from_the_project_root(tmp_path):
    assert resolve_tracking_uri("data/mlruns", tmp_path) == (tmp_path / "data" / "mlruns").as_uri()
    assert resolve_tracking_uri(str(tmp_path / "abs"), Path("/elsewhere")) == (tmp_path / "abs").as_uri()
    for uri in ("file:///srv/mlruns", "sqlite:///mlflow.db", "http://tracker:5000", "databricks"):
        expected = uri if ":" in uri else (tmp_path / uri).as_uri()  # a bare word is a folder name
        assert resolve_tracking_uri(uri, tmp_path) == expected
    assert not (tmp_path / "data").exists()  # resolving creates nothing


# ---------------------------------------------------------------- parameters


def test_flatten_params_gives_dotted_keys_and_json_values():
    params = {
        "seed": 0,
        "teacher": {
            "train": {"lr": 1e-3, "bf16": False},
            "sampler": {"grid_nfe": [1, 4, 16]},
            "workdir": None,
        },
        "task": {"kind": "sr4x_pool"},
        "distill": {"validation": {}},
        "tracking": {"enabled": True},
    }
    assert flatten_params(params, exclude=("tracking",)) == {
        "seed": "0",
        "teacher.train.lr": "0.001",
        "teacher.train.bf16": "false",
        "teacher.sampler.grid_nfe": "[1, 4, 16]",
        "teacher.workdir": "null",
        "task.kind": "sr4x_pool",
        "distill.validation": "{}",
    }


def test_flatten_params_cuts_values_mlflow_would_refuse_and_says_so():
    long_list = list(range(3000))
    flat = flatten_params({"data": {"ids": long_list, "name": "x" * PARAM_VALUE_LIMIT}})
    assert len(flat["data.ids"]) == PARAM_VALUE_LIMIT
    assert flat["data.ids"].startswith("[0, 1, 2") and flat["data.ids"].endswith(
        f"[{len(json.dumps(long_list))} characters, cut]"
    )
    assert flat["data.name"] == "x" * PARAM_VALUE_LIMIT  # exactly at the limit: kept whole


# ---------------------------------------------------------------- metrics


def test_evaluation_metrics_are_named_by_model_nfe_and_measure():
    metrics = evaluation_metrics(REPORT)
    assert metrics["teacher_nfe1/fid"] == 0.27
    assert metrics["student_nfe1/lpips"] == 0.13
    assert metrics["student_nfe1/sec_per_image"] == 0.0027
    assert metrics["student_nfe1/speedup_vs_teacher_nfe4"] == 4.32
    assert metrics["corrupted_input/psnr"] == 12.0
    assert metrics["classifier/ceiling"] == 90.0
    # null metrics, identities and text are not metrics
    assert "teacher_nfe4/fid" not in metrics and "teacher_nfe4/ca" not in metrics
    assert "corrupted_input/ca" not in metrics and "classifier/reason" not in metrics
    assert not any(name.endswith(("/seed", "/nfe", "/model")) for name in metrics)
    per_record = {"teacher_nfe1": 7, "teacher_nfe4": 5, "student_nfe1": 9}  # numbers left per record
    for prefix, count in per_record.items():
        assert sum(name.startswith(prefix + "/") for name in metrics) == count
    assert len(metrics) == sum(per_record.values()) + 4 + 3


def test_history_becomes_stepped_metrics_under_a_prefix():
    history = [
        {"step": 0.0, "val/gap/teacher_nfe1": 0.5},
        {"step": 2.0, "loss/generator": 1.5, "lr/generator": 1e-4, "skipped": 0.0},
        {"step": 4.0, "loss/generator": float("nan"), "val/gap/teacher_nfe1": 0.25},
        {"loss/generator": 9.0},  # no step: not a point of a curve
    ]
    assert history_metrics(history, "distill") == [
        SteppedMetric("distill/val/gap/teacher_nfe1", 0.5, 0),
        SteppedMetric("distill/loss/generator", 1.5, 2),
        SteppedMetric("distill/lr/generator", 1e-4, 2),
        SteppedMetric("distill/skipped", 0.0, 2),
        SteppedMetric("distill/val/gap/teacher_nfe1", 0.25, 4),
    ]


def test_airflow_context_groups_the_runs_of_one_dag_run():
    environ = {"AIRFLOW_CTX_DAG_ID": "distill", "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-01-02",
               "AIRFLOW_CTX_TASK_ID": "distill-student", "HOME": "/root"}
    assert airflow_tags(environ) == {
        "airflow.dag_id": "distill",
        "airflow.dag_run_id": "scheduled__2026-01-02",
        "airflow.task_id": "distill-student",
    }
    assert airflow_tags({"HOME": "/root"}) == {}


def test_run_names_and_artifact_files():
    assert default_run_name(None, None) == "__default__"
    assert default_run_name(["degrade", "teacher"], None) == "degrade+teacher"
    assert default_run_name(["distill"], ["distill_student"]) == "distill:distill_student"
    catalog = (CONF / "base" / "catalog.yml").read_text()
    for dataset, artifact in ARTIFACT_FILES.items():
        assert f"\n{dataset}:" in catalog  # every tracked output is a catalog entry
        assert Path(artifact).suffix in {".png", ".json", ".md"}
