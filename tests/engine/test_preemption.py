"""Preemption: a signal stops training at a step boundary, saves it, and the same command resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ibmd_pipeline.degradations import TaskConfig, degrade
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.engine.distributed import DistributedConfig, gather_objects, init_distributed
from ibmd_pipeline.engine.launch import launch_local
from ibmd_pipeline.engine.loop import run_training
from ibmd_pipeline.engine.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from ibmd_pipeline.engine.training import TrainConfig, TrainingState, create_training_state, optimizer_step

_GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=_GEN)
Y = X @ torch.randn(4, 2, generator=_GEN)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 2))


def config(**changes) -> TrainConfig:
    base = TrainConfig(steps=10, batch_size=8, lr=1e-2, log_every=2, seed=3)
    return dataclasses.replace(base, **changes)


def regression_step(state: TrainingState, step: int) -> dict[str, torch.Tensor]:
    idx = torch.randint(0, len(X), (state.config.batch_size,), generator=state.generator)
    loss = (state.models["net"](X[idx]) - Y[idx]).square().mean()
    optimizer_step(state, "net", loss)
    return {"loss": loss}


def signalling_step(signum: int, at_step: int):
    def step_fn(state: TrainingState, step: int):
        if step == at_step:
            os.kill(os.getpid(), signum)  # delivered now, in the middle of the step
        return regression_step(state, step)

    return step_fn


def weights(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.models["net"].state_dict().items()}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_at_the_step_boundary_and_the_rerun_resumes_exactly(tmp_path: Path, signum: int):
    handler_before = signal.getsignal(signum)
    straight = run_training(
        create_training_state({"net": make_mlp()}, config()), regression_step, progress=False
    )

    with pytest.raises(TrainingPreempted) as stopped:
        run_training(
            create_training_state({"net": make_mlp()}, config()),
            signalling_step(signum, at_step=4),
            workdir=tmp_path,
            progress=False,
        )
    # The step in which the signal came is finished, then saved: 5 steps done, none lost.
    assert stopped.value.step == 5 and stopped.value.checkpoint == tmp_path / "last.pt"
    assert signal.Signals(signum).name in str(stopped.value)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert signal.getsignal(signum) is handler_before  # the run's handlers are gone again

    torch.manual_seed(123)
    np.random.seed(123)
    resumed = run_training(
        create_training_state({"net": make_mlp(seed=9)}, config()),
        regression_step,
        workdir=tmp_path,
        progress=False,
    )
    assert resumed.step == 10
    a, b = weights(straight), weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_without_a_workdir_the_signal_still_stops_and_says_nothing_was_saved():
    with pytest.raises(TrainingPreempted, match="nothing was saved") as stopped:
        run_training(
            create_training_state({"net": make_mlp()}, config()),
            signalling_step(signal.SIGTERM, at_step=0),
            progress=False,
        )
    assert stopped.value.step == 1 and stopped.value.checkpoint is None


def test_a_signal_in_the_last_step_finishes_the_run_normally(tmp_path: Path):
    state = run_training(
        create_training_state({"net": make_mlp()}, config()),
        signalling_step(signal.SIGTERM, at_step=9),
        workdir=tmp_path,
        progress=False,
    )
    assert state.step == 10 and load_checkpoint(tmp_path / "last.pt")["step"] == 10


def _signalled_rank_worker(dist_config: DistributedConfig, workdir: str) -> object:
    """Two gloo ranks; only rank 1 gets SIGUSR1, in its step 2."""
    ctx = init_distributed(dist_config, "cpu")
    state = create_training_state({"net": make_mlp()}, config(steps=8))
    step_fn = signalling_step(signal.SIGUSR1, at_step=2) if ctx.rank == 1 else regression_step
    try:
        run_training(state, step_fn, workdir=workdir, progress=False, ctx=ctx)
        outcome: tuple = ("finished", state.step, None)
    except TrainingPreempted as stopped:
        outcome = ("stopped", stopped.step, stopped.signal_name)
    return {"outcomes": gather_objects(outcome, ctx)}


def test_one_signalled_rank_stops_every_rank_at_the_same_step(tmp_path: Path):
    dist_config = DistributedConfig(nproc_per_node=2, backend="gloo", timeout_s=60.0)
    result = launch_local(_signalled_rank_worker, 2, (dist_config, str(tmp_path)), dist_config)
    assert result["outcomes"] == [("stopped", 3, "a signal to another rank"), ("stopped", 3, "SIGUSR1")]
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 3 and saved["world_size"] == 2


# --------------------------------------------------------------------------- the command, for real

SIZE, STEPS = 16, 60
TASK = {"kind": "sr4x_bicubic"}


def _write_pairs(path: Path, n: int, seed: int) -> None:
    from ibmd_pipeline.io.datasets import TensorBundleDataset

    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 1, SIZE, SIZE, generator=generator) * 2 - 1
    task = TaskConfig(**TASK)
    degraded = degrade(clean, task, torch.Generator().manual_seed(seed + 1))
    bundle = {"clean": clean, "corrupted": degraded.corrupted, "task": config_to_dict(task)}
    TensorBundleDataset(filepath=str(path)).save(bundle)


def _params(workdir: Path | None) -> dict:
    return {
        "teacher": {
            "model": {"network": {"preset": "tiny"}},
            "train": {
                "steps": STEPS, "batch_size": 2, "lr": 1e-3, "log_every": 10, "warmup_steps": 0,
                "bf16": False, "checkpoint_every": 2,
            },
            "sampler": {"grid_nfe": [1], "n_examples": 1},
            "validation": {"every": 0, "batch_size": 2},
            "workdir": None if workdir is None else str(workdir),
        },
        "task": TASK,
        "seed": 0,
        "engine": {"device": "cpu", "num_threads": 1},
    }


def _command(tmp_path: Path, name: str, workdir: Path | None, launcher: tuple[str, ...] = ()) -> list[str]:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(_params(workdir)))
    return [
        sys.executable, *(launcher or ("-m",)), "ibmd_pipeline.commands.train", "--stage", "teacher",
        "--config", str(config), "--data", str(tmp_path / "pairs.npz"),
        "--output", str(tmp_path / f"{name}.pt"), "--no-progress",
    ]


def _wait_for_checkpoint(workdir: Path, process: subprocess.Popen) -> None:
    """Until training is under way: its first working checkpoint is on disk."""
    deadline = time.monotonic() + 240
    while not list(workdir.glob("run-*/last.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    for group in ("models", "ema"):
        for name, tensors in a[group].items():
            for key, value in tensors.items():
                assert torch.equal(value, b[group][name][key]), f"{group}.{name}.{key}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's worker through /proc")
def test_sigterm_to_the_command_exits_75_and_the_restart_ends_where_an_uninterrupted_run_does(tmp_path: Path):
    _write_pairs(tmp_path / "pairs.npz", 8, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workdir = tmp_path / "work"
    interrupted = subprocess.Popen(
        _command(tmp_path, "resumed", workdir), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    # Signal it once training is under way (its first working checkpoint is on disk).
    deadline = time.monotonic() + 240
    def started() -> bool:
        return bool(list(workdir.glob("run-*/last.pt")))

    while not started() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGTERM)
    log, _ = interrupted.communicate(timeout=240)
    assert interrupted.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    assert "stopped by SIGTERM" in log
    [saved] = workdir.glob("run-*/last.pt")
    stopped_at = load_checkpoint(saved)["step"]
    assert 0 < stopped_at < STEPS
    assert not (tmp_path / "resumed.pt").exists()  # no final checkpoint from a run cut short

    restarted = subprocess.run(_command(tmp_path, "resumed", workdir), env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from '{saved}' at step {stopped_at}" in restarted.stderr
    straight = subprocess.run(_command(tmp_path, "straight", None), env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    _same_weights(tmp_path / "straight.pt", tmp_path / "resumed.pt")

    # torchrun --max-restarts: the worker stopped by SIGTERM exits 75, torchrun starts it again,
    # and the new worker resumes from the working checkpoint.
    workdir = tmp_path / "work-torchrun"
    launcher = (
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "--max-restarts", "1", "-m",
    )
    torchrun = subprocess.Popen(
        _command(tmp_path, "torchrun", workdir, launcher), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    _wait_for_checkpoint(workdir, torchrun)
    [worker] = [
        pid for pid in _children(torchrun.pid) if "commands.train" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    os.kill(worker, signal.SIGTERM)
    log, _ = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, log[-3000:]
    assert "stopped by SIGTERM" in log and "resumed from" in log
    _same_weights(tmp_path / "straight.pt", tmp_path / "torchrun.pt")
