"""Teacher training: the loss falls, checkpoints round-trip, resume is exact, all task variants run."""

from __future__ import annotations

import pytest
import torch
from numerics import adam_weight_atol, default_dtype, loss_atol
from torch._dynamo.utils import counters

from ibmd_pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.launch import WorkerError, launch_local
from ibmd_pipeline.io.datasets import TorchCheckpointDataset
from ibmd_pipeline.teacher import (
    FixedValidationBatch,
    bundle_pairs,
    parse_teacher_config,
    plan_teacher,
    task_from_params,
    teacher_from_checkpoint,
    train_teacher,
)
from ibmd_pipeline.teacher import trainer as trainer_module

IMAGE_SIZE = 16  # tests/teacher/conftest.py


def train(params, bundles, kind="sr4x_pool", **kwargs):
    train_bundle, val_bundle = bundles
    config = parse_teacher_config(params, seed=0)
    return train_teacher(
        config, train_bundle, val_bundle, task={"kind": kind}, device="cpu", progress=False, **kwargs
    )


def comparable(history):
    """History records without the wall-clock field."""
    return [{k: v for k, v in record.items() if k != "sec_per_step"} for record in history]


def test_tiny_teacher_loss_falls_on_a_fixed_dataset(sr_bundles, tiny_params):
    params = tiny_params(train={"steps": 40, "log_every": 10, "lr": 3e-3}, validation={"every": 10})
    checkpoint, history = train(params, sr_bundles)
    losses = [record["loss"] for record in history]
    val_losses = [record["val_loss"] for record in history]
    assert [record["step"] for record in history] == [10, 20, 30, 40]
    assert losses[-1] < 0.7 * losses[0]
    assert val_losses[-1] < 0.7 * val_losses[0]
    assert checkpoint["step"] == 40 and checkpoint["history"] == history
    # The EMA moved away from the raw weights, but stays a blend of them.
    ema, raw = checkpoint["ema"]["model"], checkpoint["models"]["model"]
    assert any(not torch.equal(ema[name], raw[name]) for name in raw)


def test_checkpoint_follows_the_teacher_format_and_round_trips_bit_identically(sr_teacher, tmp_path):
    assert sr_teacher["kind"] == "teacher" and sr_teacher["step"] == 10
    config = sr_teacher["config"]
    assert {"bridge", "unet", "conditional", "task", "image_size", "channels", "teacher"} <= set(config)
    assert (config["task"]["kind"], config["image_size"], config["channels"]) == ("sr4x_pool", IMAGE_SIZE, 1)
    bridge = config["bridge"]
    assert (bridge["kind"], bridge["beta_max"], config["conditional"]) == ("i2sb", 0.3, False)
    assert config["teacher"]["model"]["network"]["preset"] == "tiny"

    save_checkpoint(tmp_path / "teacher.pt", sr_teacher)
    reloaded = load_checkpoint(tmp_path / "teacher.pt")  # weights_only=True
    dataset = TorchCheckpointDataset(filepath=str(tmp_path / "catalog" / "teacher.pt"))
    dataset.save(sr_teacher)
    from_catalog = dataset.load()
    x_t = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    outputs = []
    for payload in (sr_teacher, reloaded, from_catalog):
        teacher = teacher_from_checkpoint(payload, task_kind="sr4x_pool", image_size=IMAGE_SIZE, channels=1)
        outputs.append(teacher.predictor(x_t, t, xT=x_t))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    # The EMA weights are what the rebuilt teacher uses by default.
    teacher = teacher_from_checkpoint(reloaded)
    for name, value in teacher.predictor.net.state_dict().items():
        assert torch.equal(value, sr_teacher["ema"]["model"][name])


def test_an_interrupted_run_resumes_and_matches_the_uninterrupted_run(
    sr_bundles, tmp_path, monkeypatch, tiny_params
):
    params = tiny_params(train={"steps": 12, "checkpoint_every": 5, "log_every": 2})
    reference, reference_history = train({**params, "workdir": str(tmp_path / "a")}, sr_bundles)

    real_loss, calls = trainer_module.bridge_matching_loss, {"n": 0}

    def crash_at_step_eight(*args, **kwargs):
        if kwargs.get("t") is None:  # a training step (validation passes fixed times)
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    workdir = tmp_path / "b"
    monkeypatch.setattr(trainer_module, "bridge_matching_loss", crash_at_step_eight)
    with pytest.raises(KeyboardInterrupt):
        train({**params, "workdir": str(workdir)}, sr_bundles)
    (run_folder,) = workdir.glob("run-*")  # one working folder per configuration
    assert load_checkpoint(run_folder / "last.pt")["step"] == 5
    monkeypatch.setattr(trainer_module, "bridge_matching_loss", real_loss)

    resumed, resumed_history = train({**params, "workdir": str(workdir)}, sr_bundles)
    assert resumed["step"] == 12
    assert comparable(resumed_history) == comparable(reference_history)
    for group in ("models", "ema"):
        for name, value in reference[group]["model"].items():
            assert torch.equal(resumed[group]["model"][name], value), f"{group}: {name}"
    # Re-running a finished run trains nothing and returns the same weights.
    again, _ = train({**params, "workdir": str(workdir)}, sr_bundles)
    assert all(torch.equal(again["ema"]["model"][k], v) for k, v in resumed["ema"]["model"].items())


def test_a_working_checkpoint_of_other_data_is_not_resumed(sr_bundles, tmp_path, tiny_params, make_bundle):
    params = tiny_params(train={"steps": 2, "warmup_steps": 0}, workdir=str(tmp_path))
    train(params, sr_bundles)
    other = (make_bundle("sr4x_pool", 24, seed=5), sr_bundles[1])
    # Other data gets its own working folder and trains from scratch: same result as no workdir.
    fresh, _ = train(params, other)
    reference, _ = train({**params, "workdir": None}, other)
    assert len(list(tmp_path.glob("run-*"))) == 2
    assert all(torch.equal(fresh["models"]["model"][k], v) for k, v in reference["models"]["model"].items())


@pytest.mark.parametrize(
    ("kind", "schedule", "conditional", "beta_max", "ot_ode"),
    [
        ("inpaint_center", "i2sb", False, 1.0, True),
        ("sketch", "ddbm_vp", True, None, False),
        ("jpeg", "i2sb", False, 0.3, False),
    ],
)
def test_task_variants_train_with_the_papers_teacher(
    kind, schedule, conditional, beta_max, ot_ode, tiny_params, make_bundle
):
    bundles = (make_bundle(kind, 16, seed=0), make_bundle(kind, 6, seed=100))
    checkpoint, history = train(tiny_params(train={"steps": 4}), bundles, kind=kind)
    config = checkpoint["config"]
    assert config["bridge"]["kind"] == schedule and config["conditional"] is conditional
    assert config["bridge"]["ot_ode"] is ot_ode
    if beta_max is not None:
        assert config["bridge"]["beta_max"] == beta_max
    assert config["unet"]["in_channels"] == (2 if conditional else 1)
    assert all(torch.isfinite(torch.tensor([r["loss"], r.get("val_loss", 0.0)])).all() for r in history)
    teacher = teacher_from_checkpoint(checkpoint, task_kind=kind)
    assert teacher.conditional is conditional


def test_inpainting_loss_is_taken_over_the_hole_only(tiny_params, make_bundle, monkeypatch):
    bundle = make_bundle("inpaint_center", 8, seed=0)
    task = task_from_params({"kind": "inpaint_center"})
    plan = plan_teacher(parse_teacher_config(tiny_params()), task, image_size=IMAGE_SIZE, channels=1)
    pairs = bundle_pairs(bundle, task, "validation")
    validation = FixedValidationBatch(pairs, plan.schedule, seed=0, device=torch.device("cpu"), chunk=4)
    predictor = trainer_module.X0Predictor(trainer_module.UNet(plan.resolved.unet), plan.schedule, False)
    hole = pairs.mask[:1]  # every image has the same central hole

    def wrong_outside_the_hole(x_t, t, xT=None):
        return predictor(x_t, t, xT=xT) + 10.0 * (1.0 - hole)

    def wrong_inside_the_hole(x_t, t, xT=None):
        return predictor(x_t, t, xT=xT) + 10.0 * hole

    exact = validation.loss(predictor)
    assert validation.loss(wrong_outside_the_hole) == pytest.approx(exact, rel=1e-6)
    assert validation.loss(wrong_inside_the_hole) > 10 * exact

    # Training steps pass the batch's mask to the loss too.
    seen = []
    real_loss = trainer_module.bridge_matching_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mask"))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "bridge_matching_loss", spy)
    train(tiny_params(train={"steps": 2, "warmup_steps": 0}), (bundle, bundle), kind="inpaint_center")
    assert len(seen) >= 2 and all(m is not None and torch.equal(m, pairs.mask[: len(m)]) for m in seen)


def test_inpainting_teacher_refills_the_hole_of_every_batch(tiny_params, make_bundle, monkeypatch):
    """As I2SB's training and the distillation do: fresh N(0, 1) in the hole, xT untouched outside."""
    bundle = make_bundle("inpaint_center", 8, seed=0)
    task = task_from_params({"kind": "inpaint_center"})
    pairs = bundle_pairs(bundle, task, "training")
    seen = []
    real_loss = trainer_module.bridge_matching_loss

    def spy(predictor, x0, xT, schedule, mask=None, **kwargs):
        if "t" not in kwargs:  # training batches, not the fixed validation batch
            seen.append((x0.clone(), xT.clone(), mask.clone()))
        return real_loss(predictor, x0, xT, schedule, mask=mask, **kwargs)

    monkeypatch.setattr(trainer_module, "bridge_matching_loss", spy)
    params = tiny_params(train={"steps": 3, "batch_size": 8, "warmup_steps": 0})
    train(params, (bundle, bundle), kind="inpaint_center")
    assert len(seen) == 3
    fills = []
    for x0, xT, mask in seen:
        order = [next(i for i in range(len(pairs)) if torch.equal(pairs.clean[i], image)) for image in x0]
        stored = pairs.corrupted[order]
        known = mask == 0
        assert torch.equal(xT[known.expand_as(xT)], stored[known.expand_as(xT)])  # known pixels as degraded
        hole = xT[(~known).expand_as(xT)]
        assert not torch.equal(hole, stored[(~known).expand_as(xT)])  # not the degrade-time fill
        assert abs(float(hole.mean())) < 0.2 and abs(float(hole.std()) - 1.0) < 0.2  # N(0, 1)
        fills.append(xT[0][(~known[0]).expand_as(xT[0])])
    assert not torch.equal(fills[0], fills[1])  # drawn anew for every batch


def test_validation_loss_is_recorded_at_its_interval_and_at_the_end(sr_bundles, tiny_params):
    _, history = train(tiny_params(train={"steps": 10, "log_every": 2}, validation={"every": 4}), sr_bundles)
    assert [r["step"] for r in history if "val_loss" in r] == [4, 8, 10]
    task = task_from_params({"kind": "sr4x_pool"})
    plan = plan_teacher(parse_teacher_config(tiny_params()), task, image_size=IMAGE_SIZE, channels=1)
    pairs = bundle_pairs(sr_bundles[1], task, "validation")
    batch = FixedValidationBatch(pairs, plan.schedule, seed=3, device=torch.device("cpu"), chunk=3)
    predictor = trainer_module.X0Predictor(trainer_module.UNet(plan.resolved.unet), plan.schedule, False)
    assert batch.loss(predictor) == batch.loss(predictor)  # fixed times and noise


def test_bundles_for_another_task_are_refused(sr_bundles, tiny_params):
    from ibmd_pipeline.engine.config import ConfigError

    with pytest.raises(ConfigError) as err:
        train(tiny_params(), sr_bundles, kind="sr4x_bicubic")
    assert err.value.key == "task" and "re-run the degrade pipeline" in str(err.value)


def _crash_at_training_step(crash_step: int):
    """A ``bridge_matching_loss`` that raises at training step ``crash_step`` (0-based), like a kill.

    Training calls pass ``generator=``; the validation loss passes fixed ``t``/``noise`` and is
    not counted.
    """
    original = trainer_module.bridge_matching_loss
    calls = []

    def loss(*args, **kwargs):
        if "generator" in kwargs:
            calls.append(None)
            if len(calls) == crash_step + 1:
                raise RuntimeError(f"simulated crash at step {crash_step}")
        return original(*args, **kwargs)

    return loss


def _crashing_teacher_worker(config, train_bundle, val_bundle, task, crash_step):
    """A DDP worker whose every rank dies at the same training step (module level: spawned)."""
    trainer_module.bridge_matching_loss = _crash_at_training_step(crash_step)
    return train_teacher(config, train_bundle, val_bundle, task=task, device="cpu", progress=False)


def test_compiled_training_matches_eager_and_resumes_with_compile_off(
    sr_bundles, tiny_params, tmp_path, monkeypatch
):
    """torch.compile (aot_eager: traced forward and backward graphs, PyTorch's kernels) computes the
    same losses; the working checkpoint written while compiled holds the plain state_dict keys and
    resumes in an uncompiled run, which ends where the eager run ends.

    The traced backward may sum in another order than eager autograd, and AdamW amplifies that
    rounding up to the learning rate in float32, so the runs train in float64 and are compared
    within the bounds of ``tests/numerics.py``."""

    def params(workdir, **compile_settings):
        train = {"steps": 4, "log_every": 1, "checkpoint_every": 2, "compile": compile_settings}
        return tiny_params(train=train, validation={"every": 0}, workdir=str(workdir))

    with default_dtype(torch.float64):
        _compare_compiled_with_eager(params, sr_bundles, tmp_path, monkeypatch)


def _compare_compiled_with_eager(params, sr_bundles, tmp_path, monkeypatch) -> None:
    eager, eager_history = train(params(tmp_path / "eager", enabled=False), sr_bundles)
    monkeypatch.setattr(trainer_module, "bridge_matching_loss", _crash_at_training_step(2))
    graphs = counters["stats"]["unique_graphs"]
    with pytest.raises(RuntimeError, match="simulated crash at step 2"):
        train(params(tmp_path / "compiled", enabled=True, backend="aot_eager"), sr_bundles)
    monkeypatch.undo()
    assert counters["stats"]["unique_graphs"] > graphs  # the network really ran compiled

    (folder,) = (tmp_path / "compiled").glob("run-*")
    assert [p.name for p in folder.iterdir()] == ["last.pt"]  # compile does not change the run folder
    assert folder.name == next((tmp_path / "eager").glob("run-*")).name
    working = load_checkpoint(folder / "last.pt")
    assert working["step"] == 2
    assert list(working["models"]["model"]) == list(eager["models"]["model"])  # no _orig_mod. prefix
    assert list(working["ema"]["model"]["shadow"]) == list(eager["ema"]["model"])
    resumed, resumed_history = train(params(tmp_path / "compiled", enabled=False), sr_bundles)
    assert resumed["step"] == 4
    config = parse_teacher_config(params(tmp_path, enabled=False), seed=0).train
    terms = config.batch_size * IMAGE_SIZE * IMAGE_SIZE  # a convolution's weight gradient
    weights = eager["models"]["model"]
    atol = adam_weight_atol(4, config.lr, terms, torch.float64, grad_bound=config.grad_clip)
    parameters = sum(value.numel() for value in weights.values())
    for history in (working["history"], resumed_history):
        for ours, theirs in zip(history, eager_history, strict=False):
            gradient = theirs["grad_norm/model"]
            bound = loss_atol(theirs["loss"], gradient, parameters, atol, terms, torch.float64)
            assert abs(ours["loss"] - theirs["loss"]) <= bound, (ours, theirs, bound)
    for key, value in weights.items():
        assert value.dtype == torch.float64, key
        torch.testing.assert_close(resumed["models"]["model"][key], value, rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_two_gloo_processes_train_one_teacher_write_one_checkpoint_and_resume_exactly(
    sr_bundles, tiny_params, tmp_path
):
    def config_in(workdir):
        params = tiny_params(train={"steps": 4, "batch_size": 4, "checkpoint_every": 2}, workdir=str(workdir))
        distributed = {"nproc_per_node": 2, "timeout_s": 120}
        return parse_teacher_config({**params, "distributed": distributed}, seed=0)

    task = {"kind": "sr4x_pool"}
    config = config_in(tmp_path / "straight")
    # nproc_per_node = 2: train_teacher spawns the two workers itself and returns rank 0's result.
    checkpoint, history = train_teacher(config, *sr_bundles, task=task, device="cpu", progress=False)
    assert checkpoint["step"] == 4 and history[-1]["step"] == 4 and "val_loss" in history[-1]
    # Exactly one working checkpoint for the two ranks, written by rank 0 ...
    (run_folder,) = (tmp_path / "straight").glob("run-*")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "straight").rglob("*") if p.is_file()) == [
        (run_folder / "last.pt").relative_to(tmp_path)
    ]
    working = load_checkpoint(run_folder / "last.pt")
    assert working["world_size"] == 2 and len(working["rng"]) == 2
    # ... holding each rank's own random streams (the ranks draw different times and noise).
    assert not torch.equal(working["rng"][0]["generator"], working["rng"][1]["generator"])
    final = checkpoint["models"]["model"]
    assert all(torch.equal(working["models"]["model"][k], v) for k, v in final.items())
    teacher = teacher_from_checkpoint(checkpoint, task_kind="sr4x_pool")
    assert teacher.config["teacher"]["distributed"]["nproc_per_node"] == 2

    # Killed at step 3 on both ranks after the step-2 checkpoint, then restarted: every rank
    # reads the one file, restores its own streams, and the run ends bit for bit where the
    # uninterrupted one did.
    crashed = config_in(tmp_path / "crashed")
    with pytest.raises(WorkerError, match="simulated crash at step 3"):
        launch_local(
            _crashing_teacher_worker, 2, args=(crashed, *sr_bundles, task, 3), config=crashed.distributed
        )
    (crashed_folder,) = (tmp_path / "crashed").glob("run-*")
    assert [p.name for p in crashed_folder.iterdir()] == ["last.pt"]
    assert load_checkpoint(crashed_folder / "last.pt")["step"] == 2
    resumed, resumed_history = train_teacher(crashed, *sr_bundles, task=task, device="cpu", progress=False)
    for group in ("models", "ema"):
        for key, value in checkpoint[group]["model"].items():
            assert torch.equal(resumed[group]["model"][key], value), (group, key)
    assert comparable(resumed_history) == comparable(history)
