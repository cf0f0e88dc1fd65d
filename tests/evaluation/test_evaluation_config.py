"""``params:evaluate`` parsing: defaults, errors that name the key, the student's NFE."""

from pathlib import Path

import pytest
import yaml
from evaluation_fakes import tiny_config

from ibmd_pipeline.engine.config import ConfigError, config_to_dict
from ibmd_pipeline.evaluation import EvaluateConfig, parse_evaluate_config, resolve_student_nfe
from ibmd_pipeline.metrics.classifier import ClassifierConfig


def test_defaults_are_the_documented_evaluation():
    config = parse_evaluate_config(None)
    assert config == EvaluateConfig()
    assert config.teacher_nfe == (1, 10, 100) and config.student_nfe is None
    assert config.fid.dims == 2048 and config.fid.enabled and config.lpips.enabled and config.ca.enabled
    assert config.ca.classifier == ClassifierConfig()
    # round trip through the plain dict stored in the report
    assert parse_evaluate_config(config_to_dict(config)) == config


def test_nested_values_are_typed():
    config = tiny_config(student_nfe=[4, 1], ca={"enabled": False})
    assert config.teacher_nfe == (1, 3) and config.student_nfe == (4, 1)
    assert config.ca.classifier.channels == (4, 8) and not config.ca.enabled
    with pytest.raises(AttributeError):
        config.num_images = 3  # frozen


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"fid": {"dims": 100}}, "evaluate.fid.dims", "allowed values: 64, 192, 768, 2048"),
        ({"teacher_nfe": [1, 0]}, "evaluate.teacher_nfe[1]", ">= 1"),
        ({"teacher_nfe": []}, "evaluate.teacher_nfe", "at least one"),
        ({"teacher_nfe": [10, 10]}, "evaluate.teacher_nfe", "twice"),
        ({"student_nfe": [0]}, "evaluate.student_nfe[0]", ">= 1"),
        ({"num_images": 1}, "evaluate.num_images", ">= 2"),
        ({"sampler": "euler"}, "evaluate.sampler", "allowed values"),
        ({"fid": {"reference": "train"}}, "evaluate.fid.reference", "allowed values"),
        ({"ca": {"classifier": {"epochs": 0}}}, "evaluate.ca.classifier.epochs", ">= 1"),
        ({"speed": {"repeats": 0}}, "evaluate.speed.repeats", ">= 1"),
        ({"speed": {"min_seconds": -1}}, "evaluate.speed.min_seconds", ">= 0"),
        ({"lpips": {"net": "vgg"}}, "evaluate.lpips.net", "allowed keys: enabled"),
        ({"images": 10}, "evaluate.images", "unknown setting"),
    ],
)
def test_bad_values_fail_naming_the_key(settings, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_evaluate_config(settings)
    assert err.value.key == key


@pytest.mark.parametrize(("trained", "expected"), [(1, (1,)), (2, (1, 2)), (4, (1, 2, 4)), (3, (1, 2, 3))])
def test_student_nfe_auto_covers_one_two_four_up_to_the_trained_steps(trained, expected):
    assert resolve_student_nfe(tiny_config(), trained) == expected


def test_student_nfe_listed_above_the_trained_steps_is_an_error():
    assert resolve_student_nfe(tiny_config(student_nfe=[2, 1]), 4) == (1, 2)
    with pytest.raises(ConfigError, match="trained with 2 step") as err:
        resolve_student_nfe(tiny_config(student_nfe=[1, 4]), 2)
    assert err.value.key == "evaluate.student_nfe"


def _merged(base: dict, over: dict) -> dict:
    """Kedro's soft merge of parameters: nested mappings merged key by key."""
    merged = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if nested else value
    return merged


def test_the_project_parameter_files_parse():
    root = Path(__file__).resolve().parents[2] / "conf"
    base = yaml.safe_load((root / "base" / "parameters_evaluate.yml").read_text())["evaluate"]
    test = yaml.safe_load((root / "test" / "parameters_evaluate.yml").read_text())["evaluate"]
    default = parse_evaluate_config(base)
    assert default.num_images == EvaluateConfig().num_images and default.fid.dims == 2048
    assert default.teacher_nfe == (1, 10, 100) and default.ca.classifier.epochs == 2
    tiny = parse_evaluate_config(_merged(base, test))
    assert tiny.num_images == 16 and tiny.fid.dims == 64 and tiny.teacher_nfe == (1, 4)
    assert tiny.ca.classifier.epochs == 1 and tiny.ca.classifier.lr == default.ca.classifier.lr
