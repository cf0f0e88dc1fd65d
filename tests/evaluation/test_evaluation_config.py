"""``params:evaluate`` parsing: defaults, errors that name the key, the student's NFE."""

import dataclasses
import json
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
    assert config.teacher_nfe == (1, 10, 100) and config.student_nfe is None and config.num_images == 300
    assert config.fid.dims == 2048 and config.fid.enabled and config.lpips.enabled and config.ca.enabled
    assert (config.fid.reference, config.fid.reference_images, config.fid.num_images) == (
        "disjoint",
        300,
        200,
    )
    assert config.ca.classifier == ClassifierConfig() and config.lpips.min_size == 64
    assert config.seeds == (0,) and config.draw_seeds == (0, 1, 2, 3) and config.closeness_nfe == 100
    assert config.bootstrap.resamples == 300 and config.bootstrap.confidence == 0.95
    assert config.teacher_modes == () and config.teacher_max_images == {}
    assert config.distributed.nproc_per_node == 1  # one process unless asked
    # round trip through the plain dict stored in the report
    assert parse_evaluate_config(config_to_dict(config)) == config


def test_nested_values_are_typed():
    config = tiny_config(
        student_nfe=[4, 1], ca={"enabled": False}, num_seeds=3, teacher_modes=["deterministic"]
    )
    assert config.teacher_nfe == (1, 3) and config.student_nfe == (4, 1)
    assert config.ca.classifier.channels == (4, 8) and not config.ca.enabled
    assert config.seeds == (0, 1, 2) and config.draw_seeds == (0, 1, 2, 3) and config.closeness_nfe == 3
    assert config.teacher_modes == ("deterministic",)
    with pytest.raises(AttributeError):
        config.num_images = 3  # frozen


def test_slow_nfe_caps_take_integer_keys_from_yaml_and_strings_from_json():
    assert tiny_config(teacher_max_images={3: 5}).teacher_max_images == {3: 5}
    assert tiny_config(teacher_max_images={"3": 5}).teacher_max_images == {3: 5}
    # null lifts a cap, e.g. a benchmark row's {999: 100} in a run without NFE 999
    assert tiny_config(teacher_max_images={999: None, 3: 5}).teacher_max_images == {3: 5}
    # the report's own config (JSON: string keys) parses back to the same settings
    config = tiny_config(teacher_max_images={3: 5})
    assert parse_evaluate_config(json.loads(json.dumps(config_to_dict(config)))) == config


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"fid": {"dims": 100}}, "evaluate.fid.dims", "allowed values: 64, 192, 768, 2048"),
        ({"teacher_nfe": [1, 0]}, "evaluate.teacher_nfe[1]", ">= 1"),
        ({"teacher_nfe": []}, "evaluate.teacher_nfe", "at least one"),
        ({"teacher_nfe": [10, 10]}, "evaluate.teacher_nfe", "twice"),
        ({"student_nfe": [0]}, "evaluate.student_nfe[0]", ">= 1"),
        ({"num_images": 3}, "evaluate.num_images", ">= 4"),
        ({"sampler": "euler"}, "evaluate.sampler", "allowed values"),
        ({"teacher_modes": ["ancestral"]}, "evaluate.teacher_modes", "main sampler"),
        ({"teacher_modes": ["heun"]}, "evaluate.teacher_modes[0]", "allowed values"),
        ({"teacher_max_images": {999: 10}}, "evaluate.teacher_max_images.999", "not in teacher_nfe"),
        ({"teacher_max_images": {100: 2}}, "evaluate.teacher_max_images.100", ">= 4"),
        ({"teacher_max_images": {"x": 2}}, "evaluate", "keys are teacher NFE"),
        ({"num_seeds": 0}, "evaluate.num_seeds", ">= 1"),
        ({"fid": {"reference": "train"}}, "evaluate.fid.reference", "allowed values"),
        ({"fid": {"num_images": 2}}, "evaluate.fid.num_images", ">= 4 or null"),
        ({"fid": {"seeds": 2}}, "evaluate.fid.seeds", "at most num_seeds"),
        ({"kid": {"subset_size": 1}}, "evaluate.kid.subset_size", ">= 2"),
        ({"lpips": {"min_size": 16}}, "evaluate.lpips.min_size", ">= 31"),
        ({"closeness": {"draws": 1}}, "evaluate.closeness.draws", ">= 2"),
        ({"closeness": {"teacher_nfe": 50}}, "evaluate.closeness.teacher_nfe", "must be one of teacher_nfe"),
        ({"bootstrap": {"resamples": 5}}, "evaluate.bootstrap.resamples", ">= 20"),
        ({"bootstrap": {"confidence": 1.0}}, "evaluate.bootstrap.confidence", r"\[0.5, 1\)"),
        ({"ca": {"classifier": {"epochs": 0}}}, "evaluate.ca.classifier.epochs", ">= 1"),
        ({"ca": {"classifier": {"embedding_dim": 0}}}, "evaluate.ca.classifier.embedding_dim", ">= 1"),
        ({"speed": {"repeats": 0}}, "evaluate.speed.repeats", ">= 1"),
        ({"speed": {"min_seconds": -1}}, "evaluate.speed.min_seconds", ">= 0"),
        ({"speed": {"threads": -1}}, "evaluate.speed.threads", ">= 0"),
        ({"lpips": {"net": "vgg"}}, "evaluate.lpips.net", "allowed keys: enabled, min_size"),
        ({"images": 10}, "evaluate.images", "unknown setting"),
        ({"distributed": {"nproc_per_node": 0}}, "evaluate.distributed.nproc_per_node", ">= 1"),
        ({"distributed": {"backend": "mpi"}}, "evaluate.distributed.backend", "allowed values"),
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
    # the file documents the defaults (the classifier trains 2 epochs by default runs, 5 in the library)
    assert dataclasses.replace(default, ca=EvaluateConfig().ca) == EvaluateConfig()
    tiny = parse_evaluate_config(_merged(base, test))
    assert tiny.num_images == 16 and tiny.fid.dims == 64 and tiny.teacher_nfe == (1, 4)
    assert tiny.ca.classifier.epochs == 1 and tiny.ca.classifier.lr == default.ca.classifier.lr
    assert tiny.closeness_nfe == 4 and tiny.fid.reference_images == 32
    paper = yaml.safe_load((root / "imagenet256" / "parameters_evaluate.yml").read_text())["evaluate"]
    assert parse_evaluate_config(_merged(base, paper)).fid.num_images is None
