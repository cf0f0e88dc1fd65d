"""The pure half of tracking: the ``tracking`` block, kedro-mlflow's ``mlflow.yml``, metric names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.hooks import ARTIFACT_FILES, default_run_name
from ibmd_pipeline.tracking import (
    SteppedMetric,
    TrackingConfig,
    airflow_tags,
    evaluation_metrics,
    history_metrics,
    offline_mlflow_environment,
    parse_tracking_config,
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
    "models": {
        "teacher": {"bridge": "i2sb", "trained_bf16": True, "trained_steps": 1025},
        "student": {"trained_nfe": 1, "trained_bf16": False, "trained_steps": None},
    },
    "notes": ["text is not a metric"],
}


# ---------------------------------------------------------------- the tracking block


def _loader(env: str):
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    # env "base" is base alone (conf/local is machine-local and may enable tracking)
    loader = OmegaConfigLoader(conf_source=str(CONF), env=env, **CONFIG_LOADER_ARGS)
    loader.config_patterns["mlflow"] = ["mlflow*", "mlflow*/**", "**/mlflow*"]  # as kedro-mlflow adds it
    return loader


@pytest.mark.parametrize(
    ("env", "root"), [("base", "data"), ("test", "data/test"), ("imagenet256", "data/imagenet256")]
)
def test_shipped_block_is_off_and_the_store_is_under_the_data_root(env, root):
    loader = _loader(env)
    config = parse_tracking_config(loader["parameters"]["tracking"])
    assert config == TrackingConfig() and config.enabled is False
    mlflow_yml = loader["mlflow"]
    assert mlflow_yml["server"]["mlflow_tracking_uri"] == f"{root}/09_tracking/mlruns"
    assert mlflow_yml["tracking"]["experiment"]["name"] == "ibmd"
    params = mlflow_yml["tracking"]["params"]
    assert params["dict_params"]["flatten"] is True and params["long_params_strategy"] == "truncate"


def test_shipped_mlflow_yml_is_a_valid_kedro_mlflow_configuration():
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig

    config = KedroMlflowConfig.model_validate(_loader("test")["mlflow"])  # extra keys are refused
    assert config.tracking.run.name is None and config.tracking.disable_tracking.pipelines == []


def test_missing_block_means_tracking_off():
    assert parse_tracking_config(None) == TrackingConfig()
    assert parse_tracking_config({"enabled": True}).enabled is True


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"enabled": "yes"}, "tracking.enabled"),
        ({"uri": "data/mlruns"}, "tracking.uri"),  # moved to mlflow.yml: refused, not ignored
        ({"log_artifact": False}, "tracking.log_artifact"),
    ],
)
def test_bad_settings_name_their_key(block, key):
    with pytest.raises(ConfigError) as err:
        parse_tracking_config(block)
    assert err.value.key == key


def test_a_tracked_run_stays_offline_unless_told_otherwise():
    environ = {"MLFLOW_DISABLE_TELEMETRY": "false"}
    offline_mlflow_environment(environ)
    assert environ == {"MLFLOW_DISABLE_TELEMETRY": "false", "MLFLOW_ALLOW_FILE_STORE": "true"}
    environ = {}
    offline_mlflow_environment(environ)
    assert environ == {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}


# ---------------------------------------------------------------- metrics


def test_evaluation_metrics_are_named_by_model_nfe_and_measure():
    metrics = evaluation_metrics(REPORT)
    assert metrics["teacher_nfe1/fid"] == 0.27
    assert metrics["student_nfe1/lpips"] == 0.13
    assert metrics["student_nfe1/sec_per_image"] == 0.0027
    assert metrics["student_nfe1/speedup_vs_teacher_nfe4"] == 4.32
    assert metrics["corrupted_input/psnr"] == 12.0
    assert metrics["classifier/ceiling"] == 90.0
    # the steps that ran (a time budget may plan fewer than the parameters say); unknown ones are left out
    assert metrics["teacher/trained_steps"] == 1025 and "student/trained_steps" not in metrics
    assert "teacher/trained_bf16" not in metrics
    # null metrics, identities and text are not metrics
    assert "teacher_nfe4/fid" not in metrics and "teacher_nfe4/ca" not in metrics
    assert "corrupted_input/ca" not in metrics and "classifier/reason" not in metrics
    assert not any(name.endswith(("/seed", "/nfe", "/model")) for name in metrics)
    per_record = {"teacher_nfe1": 7, "teacher_nfe4": 5, "student_nfe1": 9}  # numbers left per record
    for prefix, count in per_record.items():
        assert sum(name.startswith(prefix + "/") for name in metrics) == count
    assert len(metrics) == sum(per_record.values()) + 4 + 3 + 1


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
