"""Training engine: schedules, EMA, clipping, guards, atomic resumable checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ibmd_pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.ema import EMA
from ibmd_pipeline.engine.loop import run_training
from ibmd_pipeline.engine.resume import ResumeMismatchError, restore_training_state, training_checkpoint
from ibmd_pipeline.engine.training import (
    NonFiniteLossError,
    TrainConfig,
    TrainingState,
    create_training_state,
    epoch_batch_indices,
    export_checkpoint,
    lr_factor,
    optimizer_step,
    seed_everything,
)
from ibmd_pipeline.networks.unet import UNet, unet_preset

# A fixed linear-regression problem: y = x @ W_true.
_GEN = torch.Generator().manual_seed(123)
X = torch.randn(64, 4, generator=_GEN)
W_TRUE = torch.randn(4, 2, generator=_GEN)
Y = X @ W_TRUE


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout exercises the global torch RNG, which a resume must restore too.
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2))


def config(**changes) -> TrainConfig:
    base = TrainConfig(steps=12, batch_size=8, lr=1e-2, ema_decay=0.9, log_every=3, grad_clip=1.0, seed=7)
    return dataclasses.replace(base, **changes)


def regression_step(state: TrainingState, step: int) -> dict[str, torch.Tensor]:
    """Mini-batch regression using every random source the engine must checkpoint."""
    idx = epoch_batch_indices(len(X), state.config.batch_size, step, state.config.seed)
    noise = torch.randn(len(idx), 4, generator=state.generator) * 0.01
    jitter = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    pred = state.models["net"](X[idx] * jitter + noise)
    loss = (pred - Y[idx]).square().mean()
    optimizer_step(state, "net", loss)
    return {"loss": loss}


def snapshot(state: TrainingState) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.clone() for k, v in state.models["net"].state_dict().items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in state.emas["net"].shadow.state_dict().items()})
    for i, s in enumerate(state.optimizers["net"].state.values()):
        tensors.update({f"adam{i}.{k}": v.clone() for k, v in s.items()})
    return tensors


def timeless(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k != "sec_per_step"} for record in history]


# --------------------------------------------------------------------------- config


def test_train_config_parses_and_validates():
    parsed = parse_config(
        TrainConfig, {"steps": 10, "betas": [0.8, 0.95], "lr_schedule": "cosine"}, "teacher.train"
    )
    assert parsed.betas == (0.8, 0.95) and parsed.lr_schedule == "cosine"
    for bad, key in [
        ({"steps": 0}, "teacher.train.steps"),
        ({"ema_decay": 1.0}, "teacher.train.ema_decay"),
        ({"betas": [0.9, 1.0]}, "teacher.train.betas[1]"),
        ({"warmup_steps": 10, "steps": 10}, "teacher.train.warmup_steps"),
        ({"grad_clip": -1.0}, "teacher.train.grad_clip"),
        ({"lr": 0.0}, "teacher.train.lr"),
        ({"log_every": 0}, "teacher.train.log_every"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(TrainConfig, bad, "teacher.train")
        assert info.value.key == key
    with pytest.raises(ConfigError, match="'constant', 'cosine'"):
        parse_config(TrainConfig, {"lr_schedule": "linear"}, "teacher.train")


def test_lr_warmup_and_cosine_values():
    cfg = config(steps=14, warmup_steps=4, lr_schedule="cosine")
    assert [lr_factor(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 14):
        expected = 0.5 * (1 + math.cos(math.pi * (s - 4) / 10))
        assert lr_factor(cfg, s) == pytest.approx(expected, abs=1e-12)
    assert lr_factor(cfg, 9) == pytest.approx(0.5)
    constant = config(steps=10, warmup_steps=2)
    assert [lr_factor(constant, s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_history_records_the_scheduled_learning_rate():
    cfg = config(steps=8, log_every=1, warmup_steps=2, lr_schedule="cosine")
    state = run_training(create_training_state({"net": make_mlp()}, cfg), regression_step, progress=False)
    lrs = [record["lr/net"] for record in state.history]
    assert lrs == pytest.approx([cfg.lr * lr_factor(cfg, s) for s in range(8)])


# --------------------------------------------------------------------------- EMA


def test_ema_follows_the_formula():
    model = nn.Linear(3, 1)
    ema = EMA(model, decay=0.9)
    shadow = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(i + 1))
        ema.update(model)
        shadow = {k: 0.9 * shadow[k] + 0.1 * v for k, v in model.state_dict().items()}
    for k, v in ema.shadow.state_dict().items():
        torch.testing.assert_close(v, shadow[k], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.shadow.parameters())

    target = nn.Linear(3, 1)
    ema.copy_to(target)
    assert all(
        torch.equal(a, b)
        for a, b in zip(target.state_dict().values(), ema.shadow.state_dict().values(), strict=True)
    )

    restored = EMA(nn.Linear(3, 1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 5
    assert torch.equal(restored.shadow.weight, ema.shadow.weight)


def test_ema_warmup_decay_and_buffers():
    ema = EMA(nn.BatchNorm1d(2), decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    ema.num_updates = 90
    assert ema.current_decay() == pytest.approx(91 / 100)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.99
    model = nn.BatchNorm1d(2)
    model.running_mean.fill_(3.0)
    ema.update(model)
    assert torch.equal(ema.shadow.running_mean, torch.full((2,), 3.0))  # buffers are copied


# --------------------------------------------------------------------------- optimizer_step


def test_grad_clipping_scales_the_update_and_reports_the_raw_norm():
    model = nn.Linear(8, 1, bias=False)
    state = create_training_state({"net": model}, config(grad_clip=0.5))
    loss = 3.0 * model.weight.sum()  # gradient 3 everywhere: norm 3 * sqrt(8)
    norm = optimizer_step(state, "net", loss)
    assert norm == pytest.approx(3.0 * math.sqrt(8))
    exp_avg = state.optimizers["net"].state[model.weight]["exp_avg"]
    # Adam's first moment after one step is (1 - beta1) * g, g the clipped gradient.
    clipped = 3.0 * 0.5 / (3.0 * math.sqrt(8))
    torch.testing.assert_close(exp_avg, torch.full_like(exp_avg, 0.1 * clipped))
    assert state.step_metrics["grad_norm/net"] == pytest.approx(norm)
    assert model.weight.grad is None  # gradients are released after the update

    unclipped = create_training_state({"net": nn.Linear(8, 1, bias=False)}, config(grad_clip=0.0))
    weight = unclipped.models["net"].weight
    optimizer_step(unclipped, "net", 3.0 * weight.sum())
    torch.testing.assert_close(unclipped.optimizers["net"].state[weight]["exp_avg"], torch.full((1, 8), 0.3))


def test_backward_reaches_only_the_stepped_model():
    """IBMD's generator step back-propagates through other networks without touching them."""
    generator, critic = nn.Linear(2, 2), nn.Linear(2, 1)
    state = create_training_state({"generator": generator, "critic": critic}, config(), ema=["generator"])
    critic_before = critic.weight.detach().clone()
    loss = critic(generator(torch.randn(4, 2))).square().mean()
    optimizer_step(state, "generator", loss)
    assert critic.weight.grad is None and torch.equal(critic.weight, critic_before)
    assert set(state.emas) == {"generator"} and state.emas["generator"].num_updates == 1


def test_nonfinite_loss_and_gradient_are_refused_before_the_update():
    model = nn.Linear(2, 1)
    state = create_training_state({"net": model}, config())
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="loss of 'net' = nan at training step 0"):
        optimizer_step(state, "net", model.weight.sum() * float("nan"))
    param = nn.Parameter(torch.zeros(3))
    holder = nn.Module()
    holder.p = param
    sqrt_state = create_training_state({"sqrt": holder}, config())
    with pytest.raises(NonFiniteLossError, match="gradient norm of 'sqrt'"):
        optimizer_step(sqrt_state, "sqrt", param.sqrt().sum())  # d sqrt(x)/dx = inf at 0
    assert torch.equal(model.weight, before) and torch.equal(param, torch.zeros(3))


# --------------------------------------------------------------------------- the loop


def test_loss_falls_on_a_regression_problem():
    cfg = config(steps=150, log_every=10, lr=2e-2, batch_size=16)
    model = nn.Linear(4, 2)
    state = run_training(create_training_state({"net": model}, cfg), regression_step, progress=False)
    losses = [record["loss"] for record in state.history]
    assert losses[-1] < 0.05 * losses[0]
    assert state.step == 150 and len(state.history) == 15
    assert {"step", "loss", "grad_norm/net", "lr/net", "skipped", "sec_per_step"} <= set(state.history[0])


def test_fresh_runs_with_the_same_seed_are_identical():
    runs = []
    for _ in range(2):
        seed_everything(0)
        state = create_training_state({"net": make_mlp()}, config())
        runs.append(snapshot(run_training(state, regression_step, progress=False)))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path: Path):
    cfg = config(steps=12, checkpoint_every=4)
    straight = run_training(
        create_training_state({"net": make_mlp()}, cfg),
        regression_step,
        workdir=tmp_path / "a",
        progress=False,
    )

    def crashing(state: TrainingState, step: int):
        if step == 9:
            raise KeyboardInterrupt  # killed in the middle of the run, after the step-8 checkpoint
        return regression_step(state, step)

    with pytest.raises(KeyboardInterrupt):
        run_training(
            create_training_state({"net": make_mlp()}, cfg), crashing, workdir=tmp_path / "b", progress=False
        )
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 8

    # A new process: different initial weights and global RNG, everything restored from last.pt.
    torch.manual_seed(999)
    np.random.seed(999)
    resumed = run_training(
        create_training_state({"net": make_mlp(seed=5)}, cfg),
        regression_step,
        workdir=tmp_path / "b",
        progress=False,
    )
    a, b = snapshot(straight), snapshot(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert timeless(resumed.history) == timeless(straight.history)
    assert resumed.step == 12

    # A finished run is not trained again.
    again = run_training(
        create_training_state({"net": make_mlp()}, cfg), crashing, workdir=tmp_path / "b", progress=False
    )
    assert again.step == 12 and torch.equal(snapshot(again)["model.0.weight"], b["model.0.weight"])


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path: Path):
    cfg = config(steps=4)
    run_config = {"model": {"channels": 16}, "data": "digits"}
    run_training(
        create_training_state({"net": make_mlp()}, cfg),
        regression_step,
        workdir=tmp_path,
        run_config=run_config,
        progress=False,
    )
    other = {"model": {"channels": 32}, "data": "digits"}
    with pytest.raises(ResumeMismatchError) as info:
        run_training(
            create_training_state({"net": make_mlp()}, cfg),
            regression_step,
            workdir=tmp_path,
            run_config=other,
            progress=False,
        )
    message = str(info.value)
    assert (
        "run.model.channels: 16 -> 32" in message and "resume: false" in message and str(tmp_path) in message
    )
    with pytest.raises(ResumeMismatchError, match="train.lr: 0.01 -> 0.02"):
        run_training(
            create_training_state({"net": make_mlp()}, config(steps=4, lr=0.02)),
            regression_step,
            workdir=tmp_path,
            run_config=run_config,
            progress=False,
        )

    # Logging cadence does not change the result: that run resumes (here: is already done).
    calls = []
    done = run_training(
        create_training_state({"net": make_mlp()}, config(steps=4, log_every=1)),
        lambda s, k: calls.append(k) or regression_step(s, k),
        workdir=tmp_path,
        run_config=run_config,
        progress=False,
    )
    assert done.step == 4 and calls == []

    # resume: false starts afresh and overwrites the working checkpoint.
    fresh = run_training(
        create_training_state({"net": make_mlp()}, config(steps=4, resume=False)),
        regression_step,
        workdir=tmp_path,
        run_config=other,
        progress=False,
    )
    assert fresh.step == 4 and load_checkpoint(tmp_path / "last.pt")["run_config"] == other


def test_resume_checks_the_model_names(tmp_path: Path):
    cfg = config(steps=4)
    run_training(
        create_training_state({"net": make_mlp()}, cfg), regression_step, workdir=tmp_path, progress=False
    )
    payload = load_checkpoint(tmp_path / "last.pt")
    payload["step"] = 2
    save_checkpoint(tmp_path / "last.pt", payload)
    with pytest.raises(CheckpointError, match=r"holds models \['net'\], this run has \['other'\]"):
        run_training(
            create_training_state({"other": make_mlp()}, cfg),
            regression_step,
            workdir=tmp_path,
            progress=False,
        )


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    cfg = config(steps=12, checkpoint_every=5)

    def poisoned(state: TrainingState, step: int):
        if step == 7:
            loss = state.models["net"](X[:4]).sum() * float("inf")
            optimizer_step(state, "net", loss)
        return regression_step(state, step)

    with pytest.raises(NonFiniteLossError) as info:
        run_training(
            create_training_state({"net": make_mlp()}, cfg), poisoned, workdir=tmp_path, progress=False
        )
    assert (
        info.value.step == 7 and "training step 7" in str(info.value) and "loss of 'net'" in str(info.value)
    )
    assert "last good working checkpoint" in str(info.value)
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["step"] == 5
    assert all(torch.isfinite(v).all() for v in payload["models"]["net"].values())


def test_nonfinite_logged_value_is_caught_too():
    def bad(state: TrainingState, step: int):
        regression_step(state, step)
        return {"metric": float("nan")} if step == 2 else {"metric": 1.0}

    with pytest.raises(NonFiniteLossError, match="'metric' = nan at training step 2"):
        run_training(create_training_state({"net": make_mlp()}, config()), bad, progress=False)


def test_skip_nonfinite_counts_and_eventually_stops():
    def sometimes_nan(state: TrainingState, step: int):
        scale = float("nan") if step in (2, 5) else 1.0
        pred = state.models["net"](X[:8])
        loss = (pred - Y[:8]).square().mean() * scale
        optimizer_step(state, "net", loss)
        return {"loss": loss}

    state = run_training(
        create_training_state({"net": make_mlp()}, config(skip_nonfinite=True, max_skipped=2)),
        sometimes_nan,
        progress=False,
    )
    assert state.step == 12 and state.skipped == 2 and state.history[-1]["skipped"] == 2.0
    assert all(torch.isfinite(p).all() for p in state.models["net"].parameters())
    with pytest.raises(NonFiniteLossError, match="2 steps skipped"):
        run_training(
            create_training_state({"net": make_mlp()}, config(skip_nonfinite=True, max_skipped=1)),
            sometimes_nan,
            progress=False,
        )


def test_callbacks_fire_on_schedule():
    logged, sampled = [], []

    def on_sample(state: TrainingState, step: int) -> None:
        state.models["net"].eval()  # the loop puts models back in train mode
        sampled.append(step)

    state = run_training(
        create_training_state({"net": make_mlp()}, config(steps=10, log_every=4, sample_every=5)),
        regression_step,
        on_log=lambda s, record: logged.append(record["step"]),
        on_sample=on_sample,
        progress=False,
    )
    assert logged == [4.0, 8.0, 10.0] and sampled == [5, 10]
    assert state.models["net"].training


def test_export_checkpoint_is_plain_and_weights_only_loadable(tmp_path: Path):
    unet = UNet(unet_preset("tiny", image_size=16, in_channels=1, out_channels=1))
    state = create_training_state({"model": unet}, config(steps=2))

    def step(state: TrainingState, k: int):
        x = torch.randn(2, 1, 16, 16, generator=state.generator)
        loss = (state.models["model"](x, torch.tensor([1.0, 2.0])) - x).square().mean()
        optimizer_step(state, "model", loss)
        return {"loss": loss}

    run_training(state, step, progress=False)
    payload = export_checkpoint(state, {"model": {"preset": "tiny"}}, extra={"kind": "teacher"})
    assert set(payload) == {"config", "models", "ema", "step", "history", "kind"}
    path = save_checkpoint(tmp_path / "teacher.pt", payload)
    loaded = load_checkpoint(path)  # weights_only=True
    assert loaded["step"] == 2 and loaded["kind"] == "teacher"
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded["models"]["model"][key], value)
    # Copies: later changes to the live model do not leak into the payload.
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    assert not torch.equal(payload["models"]["model"]["time_embed.0.weight"], unet.time_embed[0].weight)
    with pytest.raises(ValueError, match="overwrite"):
        export_checkpoint(state, {}, extra={"step": 3})


def test_epoch_batch_indices_cover_each_epoch_once():
    n, batch = 10, 4
    indices = torch.cat([epoch_batch_indices(n, batch, step, seed=3) for step in range(5)])  # 2 epochs
    assert sorted(indices[:10].tolist()) == list(range(10))
    assert sorted(indices[10:20].tolist()) == list(range(10))
    assert not torch.equal(indices[:10], indices[10:20])  # a new order each epoch
    assert torch.equal(epoch_batch_indices(n, batch, 2, seed=3), indices[8:12])  # pure function of the step
    assert not torch.equal(epoch_batch_indices(n, batch, 0, seed=4), indices[:4])
    big = epoch_batch_indices(3, 7, 0, seed=0)
    assert len(big) == 7 and sorted(big[:3].tolist()) == [0, 1, 2]


def test_create_training_state_checks_names_and_per_model_lr():
    with pytest.raises(ValueError, match="unknown model name"):
        create_training_state({"net": make_mlp()}, config(), ema=["missing"])
    state = create_training_state({"a": make_mlp(), "b": make_mlp()}, config(), ema=[], lr={"b": 1e-3})
    assert state.emas == {}
    assert state.optimizers["a"].param_groups[0]["base_lr"] == 1e-2
    assert state.optimizers["b"].param_groups[0]["base_lr"] == 1e-3


def test_kill_and_resume_is_exact_for_a_unet_with_dropout(tmp_path: Path):
    cfg = config(steps=6, checkpoint_every=3, batch_size=2, lr=1e-3)
    unet_config = dataclasses.replace(
        unet_preset("tiny", image_size=16, in_channels=1, out_channels=1), dropout=0.1
    )

    crash_at: list[int] = []

    def unet_step(state: TrainingState, step: int):
        if step in crash_at:
            raise RuntimeError("simulated crash")
        x = torch.randn(2, 1, 16, 16, generator=state.generator)
        t = torch.rand(2, generator=state.generator) * 1000
        loss = (state.models["net"](x, t) - x.flip(-1)).square().mean()
        optimizer_step(state, "net", loss)
        return {"loss": loss}

    def fresh(seed: int) -> TrainingState:
        torch.manual_seed(seed)
        return create_training_state({"net": UNet(unet_config)}, cfg)

    straight = run_training(fresh(0), unet_step, workdir=tmp_path / "a", progress=False)
    crash_at.append(4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(fresh(0), unet_step, workdir=tmp_path / "b", progress=False)
    crash_at.clear()
    resumed = run_training(fresh(1), unet_step, workdir=tmp_path / "b", progress=False)
    a, b = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(NonFiniteLossError(3, "loss of 'g'", float("inf"), "kept x")))
    assert (error.step, error.name, error.value, error.note) == (3, "loss of 'g'", float("inf"), "kept x")
    assert "training step 3" in str(error)


# --------------------------------------------------------------------------- working-checkpoint format


def test_working_checkpoint_stores_one_random_state_per_rank_and_refuses_another_world_size(tmp_path: Path):
    cfg = config(steps=4)
    state = run_training(
        create_training_state({"net": make_mlp()}, cfg), regression_step, workdir=tmp_path, progress=False
    )
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["world_size"] == 1 and isinstance(payload["rng"], list) and len(payload["rng"]) == 1
    assert torch.equal(payload["rng"][0]["generator"], state.generator.get_state())

    # Rank 1 of 2 restores the second entry: here a generator state advanced by a few draws.
    other = torch.Generator().manual_seed(cfg.seed)
    torch.rand(5, generator=other)
    rank_states = [payload["rng"][0], {**payload["rng"][0], "generator": other.get_state()}]
    two_ranks = training_checkpoint(state, {}, rank_states)
    assert two_ranks["world_size"] == 2
    target = create_training_state({"net": make_mlp(seed=3)}, cfg)
    restore_training_state(target, two_ranks, rank=1, world_size=2)
    assert torch.equal(target.generator.get_state(), other.get_state())
    for world_size in (1, 3):
        expected = rf"run of 2 process\(es\), this run has {world_size}.*distributed.nproc_per_node: 2"
        with pytest.raises(ResumeMismatchError, match=expected):
            restore_training_state(target, two_ranks, world_size=world_size)


def test_a_single_process_working_checkpoint_of_the_previous_format_still_resumes(tmp_path: Path):
    cfg = config(steps=6, checkpoint_every=3)
    straight = run_training(create_training_state({"net": make_mlp()}, cfg), regression_step, progress=False)

    def crashing(state: TrainingState, step: int):
        if step == 4:
            raise RuntimeError("simulated crash")
        return regression_step(state, step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(
            create_training_state({"net": make_mlp()}, cfg), crashing, workdir=tmp_path, progress=False
        )
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["step"] == 3
    # The format before per-rank states: one dict of random states, no world size.
    payload.update(format="ibmd-training-state/1", rng=payload["rng"][0])
    del payload["world_size"]
    save_checkpoint(tmp_path / "last.pt", payload)
    resumed = run_training(
        create_training_state({"net": make_mlp(seed=4)}, cfg),
        regression_step,
        workdir=tmp_path,
        progress=False,
    )
    a, b = snapshot(straight), snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
