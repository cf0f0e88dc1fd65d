"""Teacher parameters: parsed once, bad values fail early naming the key, mismatched checkpoints refused."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.pipelines.teacher import nodes
from ibmd_pipeline.teacher import (
    CheckpointMismatchError,
    TeacherConfig,
    check_teacher_checkpoint,
    parse_teacher_config,
    plan_teacher,
    task_from_params,
)
from ibmd_pipeline.teacher import config as config_module

ENGINE = {"device": "cpu", "num_threads": 1}


def test_defaults_and_the_global_seed():
    config = parse_teacher_config({}, seed=11)
    assert isinstance(config, TeacherConfig)
    assert config.train.seed == 11 and config.train.ema_decay == 0.99
    assert config.sampler.grid_nfe == (1, 10, 100) and config.workdir is None
    # The teacher's own seed wins over the global one.
    assert parse_teacher_config({"train": {"seed": 3}}, seed=11).train.seed == 3


@pytest.mark.parametrize(
    ("teacher", "task", "engine", "key"),
    [
        ({"model": {"schedule": "ddim"}}, {}, ENGINE, "teacher.model.schedule"),
        ({"model": {"network": {"preset": "huge"}}}, {}, ENGINE, "teacher.model.network.preset"),
        ({"model": {"schedule": "ddbm_vp", "ot_ode": True}}, {}, ENGINE, "teacher.model.ot_ode"),
        ({"model": {"beta_max": 0.0}}, {}, ENGINE, "teacher.model.beta_max"),
        ({"sampler": {"grid_nfe": [1, 0, 100]}}, {}, ENGINE, "teacher.sampler.grid_nfe[1]"),
        ({"sampler": {"grid_nfe": [1, 1000]}}, {}, ENGINE, "teacher.sampler.grid_nfe[1]"),  # I2SB: <= 999
        ({"sampler": {"grid_nfe": []}}, {}, ENGINE, "teacher.sampler.grid_nfe"),
        ({"sampler": {"mode": "ode"}}, {}, ENGINE, "teacher.sampler.mode"),
        ({"train": {"lr": -1.0}}, {}, ENGINE, "teacher.train.lr"),
        ({"train": {"steps": 10, "warmup_steps": 10}}, {}, ENGINE, "teacher.train.warmup_steps"),
        ({"train": {"log_every": 5}, "validation": {"every": 12}}, {}, ENGINE, "teacher.validation.every"),
        ({"distributed": {"nproc_per_node": 0}}, {}, ENGINE, "teacher.distributed.nproc_per_node"),
        ({"cpu_bf16": True}, {}, ENGINE, "teacher.cpu_bf16"),
        ({"optimiser": "sgd"}, {}, ENGINE, "teacher.optimiser"),
        (
            {"model": {"network": {"channel_mult": [1, 2, 2, 2, 2, 2]}}},  # 5 halvings of 16x16
            {},
            ENGINE,
            "teacher.model.network.image_size",
        ),
        ({}, {"kind": "denoise"}, ENGINE, "task.kind"),
        ({}, {}, {"device": "tpu"}, "engine.device"),
        ({}, {}, {"num_threads": -1}, "engine.num_threads"),
    ],
)
def test_bad_parameters_fail_before_training(monkeypatch, make_bundle, teacher, task, engine, key):
    def must_not_train(*args, **kwargs):
        pytest.fail("training started despite a bad parameter")

    monkeypatch.setattr(nodes, "train_teacher", must_not_train)
    bundle = make_bundle("sr4x_pool", 4, seed=0)  # 16x16: three levels at most
    with pytest.raises(ConfigError) as err:
        nodes.train_teacher_node(bundle, bundle, teacher, {"kind": "sr4x_pool", **task}, engine, 0)
    assert err.value.key == key, str(err.value)


def test_a_bad_seed_is_refused(make_bundle):
    bundle = make_bundle("sr4x_pool", 4, seed=0)
    with pytest.raises(ConfigError) as err:
        nodes.train_teacher_node(bundle, bundle, {}, {"kind": "sr4x_pool"}, ENGINE, "zero")
    assert err.value.key == "seed"


def test_cpu_bf16_follows_the_setting_and_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    off = parse_teacher_config({"train": {"bf16": False}, "cpu_bf16": "always"})
    assert not off.autocast_bf16(cpu) and not off.autocast_bf16(cuda)
    assert parse_teacher_config({"train": {"bf16": True}, "cpu_bf16": "always"}).autocast_bf16(cpu)
    assert not parse_teacher_config({"train": {"bf16": True}, "cpu_bf16": "never"}).autocast_bf16(cpu)
    assert parse_teacher_config({"train": {"bf16": True}, "cpu_bf16": "never"}).autocast_bf16(cuda)
    auto = parse_teacher_config({"train": {"bf16": True}})
    for native in (True, False):
        monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda native=native: native)
        assert auto.autocast_bf16(cpu) is native


def test_the_papers_teacher_per_task():
    config = parse_teacher_config({})
    plans = {
        kind: plan_teacher(config, task_from_params({"kind": kind}), image_size=32, channels=1)
        for kind in ("sr4x_bicubic", "jpeg", "inpaint_center", "sketch")
    }
    sr = plans["sr4x_bicubic"].resolved.bridge
    assert (sr.kind, sr.beta_max, sr.ot_ode) == ("i2sb", 0.3, False)
    inpaint = plans["inpaint_center"].resolved.bridge
    assert (inpaint.kind, inpaint.beta_max, inpaint.ot_ode) == ("i2sb", 1.0, True)
    assert plans["sketch"].resolved.bridge.kind == "ddbm_vp" and plans["sketch"].resolved.conditional
    assert plans["sketch"].resolved.unet.in_channels == 2 and plans["jpeg"].resolved.unet.in_channels == 1


@pytest.mark.parametrize(
    ("teacher", "kind", "image_size", "channels", "message"),
    [
        ({"model": {"network": {"preset": "cpu"}}}, "sr4x_pool", 16, 1, "unet.channel_mult"),
        ({"model": {"network": {"preset": "tiny"}, "beta_max": 0.5}}, "sr4x_pool", 16, 1, "bridge.beta_max"),
        ({"model": {"network": {"preset": "tiny"}, "conditional": True}}, "sr4x_pool", 16, 1, "conditional"),
        ({"model": {"network": {"preset": "tiny"}}}, "jpeg", 16, 1, "task 'sr4x_pool'"),
        ({"model": {"network": {"preset": "tiny"}}}, "sr4x_pool", 32, 1, "image_size 16"),
        ({"model": {"network": {"preset": "tiny"}}}, "sr4x_pool", 16, 3, "1 channels"),
    ],
)
def test_a_checkpoint_of_another_teacher_is_refused(sr_teacher, teacher, kind, image_size, channels, message):
    plan = plan_teacher(
        parse_teacher_config(teacher),
        task_from_params({"kind": kind}),
        image_size=image_size,
        channels=channels,
    )
    with pytest.raises(CheckpointMismatchError, match=message):
        check_teacher_checkpoint(sr_teacher, plan)


def test_the_matching_checkpoint_is_accepted_and_other_kinds_refused(sr_teacher, tiny_params):
    plan = plan_teacher(
        parse_teacher_config(tiny_params()),
        task_from_params({"kind": "sr4x_pool"}),
        image_size=16,
        channels=1,
    )
    check_teacher_checkpoint(sr_teacher, plan)
    with pytest.raises(CheckpointMismatchError, match="kind 'student'"):
        check_teacher_checkpoint({**sr_teacher, "kind": "student"}, plan)
