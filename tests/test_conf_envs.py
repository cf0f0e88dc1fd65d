"""Every committed configuration environment parses and passes each pipeline's validation.

Loads ``conf/`` with the project's own config-loader settings (``settings.py``: ``base`` merged
key by key under the env) and validates every section as a run does before its first node
(``ibmd_pipeline.parameters``), so a typo or an out-of-range value in ``conf/test`` or
``conf/imagenet256`` fails here in a second instead of on a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kedro.config import OmegaConfigLoader

from ibmd_pipeline.data import DataConfig
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.parameters import SECTION_PARSERS, validate_parameters
from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[1] / "conf"
ENVS = ["base", "test", "imagenet256"]


def load_params(env: str, **overrides: Any) -> dict[str, Any]:
    """The parameters a ``kedro run --env <env>`` would see (``base`` alone for ``base``)."""
    args = {**CONFIG_LOADER_ARGS, "runtime_params": overrides}
    loader = OmegaConfigLoader(conf_source=str(CONF), env=None if env == "base" else env, **args)
    if env == "base":
        loader = OmegaConfigLoader(conf_source=str(CONF), **{**args, "default_run_env": "base"})
    return dict(loader["parameters"])


def _parse_all(params: dict[str, Any]) -> dict[str, Any]:
    """Every section validated, with the teacher planned and the evaluated NFEs checked on it.

    ``teacher_import`` is left out: it names a file only a user has, and is checked when the
    ``import_teacher`` pipeline runs (see the test below)."""
    return validate_parameters(params, set(SECTION_PARSERS) - {"teacher_import"})


@pytest.mark.parametrize("env", ENVS)
def test_the_import_section_asks_for_the_official_file_only_when_it_is_used(env: str) -> None:
    params = load_params(env)
    with pytest.raises(ConfigError, match=r"teacher_import\.checkpoint.*required"):
        validate_parameters(params, {"teacher_import"})


@pytest.mark.parametrize("env", ["base", "test"])
def test_shipped_envs_parse_for_every_pipeline(env: str) -> None:
    parsed = _parse_all(load_params(env))
    assert parsed["data"].source == "embedded"


def test_imagenet256_requires_the_image_folder_and_names_the_key() -> None:
    params = load_params("imagenet256")
    with pytest.raises(ConfigError, match=r"data\.path.*required for source 'folder'"):
        parse_config(DataConfig, params["data"], "data")


def test_imagenet256_is_the_paper_scale_setting_once_the_folder_is_given(tmp_path) -> None:
    params = load_params("imagenet256", data={"path": str(tmp_path)})
    parsed = _parse_all(params)
    data, teacher, distill, evaluate = (parsed[k] for k in ("data", "teacher", "distill", "evaluate"))
    assert (data.source, data.path, data.image_size, data.channels) == ("folder", str(tmp_path), 256, 3)
    assert teacher.model.network.preset == "adm256" and teacher.model.network.use_checkpoint is True
    for config in (teacher, distill):
        assert config.train.batch_size * config.distributed.nproc_per_node == 256
        assert config.train.ema_decay == 0.99
    assert teacher.train.lr == 5e-5
    assert list(teacher.sampler.grid_nfe) == [1, 10, 100, 999]
    assert distill.aux_steps == 5
    assert (evaluate.num_images, evaluate.fid.dims) == (10000, 2048)
    assert list(evaluate.teacher_nfe) == [1, 10, 100, 999]
    # The env writes under its own data root (globals merged over base).
    assert teacher.workdir.startswith("data/imagenet256/")


#: The kedro-viz layer of each data folder (the data engineering convention's numbering).
FOLDER_LAYERS = {"05_model_input": "model_input", "06_models": "models", "07_model_output": "model_output",
                 "08_reporting": "reporting"}


def test_every_catalog_entry_has_the_kedro_viz_layer_of_its_folder() -> None:
    loader = OmegaConfigLoader(conf_source=str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"})
    catalog = loader["catalog"]
    assert catalog
    for name, entry in catalog.items():
        folder = entry["filepath"].split("/")[-2]
        assert entry["metadata"]["kedro-viz"]["layer"] == FOLDER_LAYERS[folder], name
