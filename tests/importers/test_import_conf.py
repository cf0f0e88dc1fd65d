"""The shipped ``teacher_import`` parameters: they parse, and the README's override forms reach the import."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from ibmd_pipeline.data import DataConfig, check_data_and_task
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.settings import CONFIG_LOADER_ARGS
from ibmd_pipeline.teacher.importers import parse_import_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def _params(env: str | None, **overrides) -> dict:
    args = {**CONFIG_LOADER_ARGS, "runtime_params": overrides}
    if env is None:
        args["default_run_env"] = "base"
    return dict(OmegaConfigLoader(conf_source=str(CONF), env=env, **args)["parameters"])


def test_base_asks_for_the_checkpoint_by_name():
    with pytest.raises(ConfigError) as err:
        parse_import_config(_params(None)["teacher_import"])
    assert err.value.key == "teacher_import.checkpoint"
    config = parse_import_config(_params(None, teacher_import={"checkpoint": "latest.pt"})["teacher_import"])
    assert (config.format, config.architecture, config.num_head_channels) == ("i2sb", "auto", 64)


def test_imagenet256_is_wired_to_the_published_i2sb_teacher_and_its_inputs(tmp_path):
    params = _params(
        "imagenet256", data={"path": str(tmp_path)}, teacher_import={"checkpoint": "x/latest.pt"}
    )
    config = parse_import_config(params["teacher_import"])
    assert (config.format, config.architecture, config.checkpoint) == ("i2sb", "i2sb_adm256", "x/latest.pt")
    task = parse_config(TaskConfig, params["task"], "task")
    data = parse_config(DataConfig, params["data"], "data")
    assert (task.operators, data.resize, data.image_size, data.channels) == ("i2sb", "i2sb", 256, 3)
    check_data_and_task(data, task)
    # the README's DDBM DIODE command on the same env
    params = _params(
        "imagenet256",
        data=dict(source="paired_suffix", path=str(tmp_path), resize="ddbm", corrupted_resample="nearest"),
        task={"kind": "paired", "operators": "project"},
        teacher_import={"format": "ddbm", "architecture": "ddbm_diode256", "checkpoint": "d.pt"},
    )
    data = parse_config(DataConfig, params["data"], "data")
    check_data_and_task(data, parse_config(TaskConfig, params["task"], "task"))
    assert parse_import_config(params["teacher_import"]).architecture == "ddbm_diode256"
