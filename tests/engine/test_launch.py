"""How a stage's processes come to be: the one decision, and torch's launcher behind launch_local.

The workers sit at module level because spawned processes import them by reference.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import signal
import time

import pytest
import torch

from ibmd_pipeline.engine import launch
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.distributed import DistContext, DistributedConfig, barrier, init_distributed
from ibmd_pipeline.engine.launch import WorkerError, launch_local, launch_mode, run_data_parallel

LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"
)
# Short enough that a broken rendezvous fails the test instead of hanging CI.
TEST_CONFIG = DistributedConfig(nproc_per_node=2, backend="gloo", timeout_s=60.0)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage's settings as the trainers have them: a frozen dataclass with ``distributed``."""

    steps: int = 3
    distributed: DistributedConfig = DistributedConfig()


def _stage(nproc: int) -> Stage:
    return Stage(distributed=DistributedConfig(nproc_per_node=nproc, backend="gloo", timeout_s=60.0))


def _record(ctx: DistContext, config, *args):
    """A training function that reports where it ran and what it got."""
    return ctx, config, args


# --- the decision (no process is spawned) -----------------------------------------------------


def test_launch_mode_follows_the_environment_then_nproc(no_launcher: pytest.MonkeyPatch) -> None:
    assert launch_mode(DistributedConfig(nproc_per_node=1)) == "in_process"
    assert launch_mode(DistributedConfig(nproc_per_node=4)) == "local_workers"
    no_launcher.setenv("SLURM_PROCID", "0")
    no_launcher.setenv("SLURM_NTASKS", "8")
    assert launch_mode(DistributedConfig(nproc_per_node=4)) == "launcher"
    no_launcher.setenv("RANK", "3")
    no_launcher.setenv("WORLD_SIZE", "8")
    assert launch_mode(DistributedConfig(nproc_per_node=1)) == "launcher"


def test_one_process_trains_here_as_rank_0_of_1(no_launcher: pytest.MonkeyPatch) -> None:
    config = _stage(1)
    ctx, seen, args = run_data_parallel(_record, config, "data", 7, device="cpu", key="stage.distributed")
    assert ctx == DistContext.single_process("cpu")
    assert seen is config and args == ("data", 7)


def test_under_a_launcher_the_process_joins_it_and_spawns_nothing(
    no_launcher: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "1")  # a world of one: nothing to rendezvous with
    no_launcher.setattr(launch, "launch_local", pytest.fail)
    with caplog.at_level(logging.INFO, logger="ibmd_pipeline.engine.launch"):
        ctx, seen, _ = run_data_parallel(_record, _stage(4), device="cpu", key="stage.distributed")
    assert (ctx.rank, ctx.world_size) == (0, 1)
    # The launcher made the processes: the stage records that it spawned none.
    assert seen.distributed.nproc_per_node == 1 and seen.steps == 3
    assert "stage.distributed.nproc_per_node=4 is ignored" in caplog.text


def test_several_processes_per_node_are_spawned_and_each_joins(no_launcher: pytest.MonkeyPatch) -> None:
    spawned = []

    def spy(fn, nproc, args, config):
        spawned.append((fn, nproc, args, config))
        return "rank 0's result"

    no_launcher.setattr(launch, "launch_local", spy)
    config = _stage(3)
    result = run_data_parallel(_record, config, "data", device="cpu", key="stage.distributed")
    assert result == "rank 0's result"
    ((worker, nproc, args, distributed),) = spawned
    assert nproc == 3 and distributed == config.distributed
    # What each worker runs: it joins the group the launcher set up and trains with the job's settings.
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "1")
    ctx, seen, train_args = worker(*args)
    assert (ctx.rank, ctx.world_size) == (0, 1) and seen is config and train_args == ("data",)


def test_one_gpu_for_several_processes_is_refused_before_any_spawn(no_launcher: pytest.MonkeyPatch) -> None:
    no_launcher.setattr(launch, "launch_local", pytest.fail)
    with pytest.raises(ConfigError) as err:
        run_data_parallel(_record, _stage(2), device="cuda:1", key="teacher.distributed")
    assert err.value.key == "engine.device" and "teacher.distributed.nproc_per_node" in str(err.value)


def test_launch_local_with_one_process_runs_here() -> None:
    assert launch_local(divmod, 1, (7, 2)) == (3, 1)
    with pytest.raises(ValueError, match="nproc"):
        launch_local(divmod, 0, (7, 2))


class _NotATensor:
    pass


def test_a_result_that_is_not_weights_only_is_rejected() -> None:
    payload = io.BytesIO()
    torch.save({"model": _NotATensor()}, payload)
    with pytest.raises(TypeError, match="weights_only"):
        launch._read_rank0_result(payload.getvalue())


# --- spawned processes (each launch starts two interpreters: a few seconds) -------------------


def _failing_worker(config: DistributedConfig) -> str:
    ctx = init_distributed(config, "cpu")
    if ctx.rank == 1:
        raise ValueError("rank 1 cannot continue")
    barrier(ctx)  # rank 0 waits for a peer that has gone
    return "unreachable"


def _killed_worker() -> str:
    if int(os.environ["RANK"]) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # stopped by the launcher once rank 1 is gone
    return "unreachable"


def test_a_failing_worker_names_its_rank_and_traceback_and_the_caller_keeps_its_handlers() -> None:
    handler = signal.getsignal(signal.SIGINT)
    variable = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    with pytest.raises(WorkerError) as err:
        launch_local(_failing_worker, 2, (TEST_CONFIG,), TEST_CONFIG)
    assert err.value.rank == 1
    assert "rank 1 failed" in str(err.value)
    assert "ValueError: rank 1 cannot continue" in str(err.value)
    assert "_failing_worker" in err.value.details  # the worker's own traceback text
    # torch's launcher handles Ctrl-C only while its workers run.
    assert signal.getsignal(signal.SIGINT) is handler
    assert os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE") == variable


def test_a_worker_killed_without_a_traceback_is_named_with_its_signal() -> None:
    with pytest.raises(WorkerError) as err:
        launch_local(_killed_worker, 2, (), TEST_CONFIG)
    assert err.value.rank == 1 and "SIGKILL" in err.value.details
