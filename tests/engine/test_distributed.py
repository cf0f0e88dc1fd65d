"""Data-parallel layer: launch environments, collectives, sharding and DDP equivalence, on CPU with Gloo.

The workers below sit at module level because spawned processes import them by reference.
Run as a script under torchrun, this module is also the example of a plain Python entry
point (see the bottom of the file and ``test_torchrun_runs_a_plain_entry_point``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ibmd_pipeline.engine.checkpoint import save_checkpoint
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.distributed import (
    DistContext,
    DistributedConfig,
    DistributedError,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    is_main,
    progress_enabled,
    read_launch_environment,
    resolve_backend,
    seed_for_rank,
    shard_indices,
    split_global_batch,
    unwrap,
    wrap_ddp,
)
from ibmd_pipeline.engine.launch import launch_local

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_NNODES",
)

# Short enough that a broken rendezvous fails the test instead of hanging CI.
TEST_CONFIG = DistributedConfig(nproc_per_node=2, backend="gloo", timeout_s=60.0)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _context(rank: int, world_size: int) -> DistContext:
    """A context for the pure helpers, which read only rank and world size."""
    return DistContext(rank, rank, world_size, torch.device("cpu"), rank == 0)


# --- workers (run in spawned processes) --------------------------------------------------------


def _collectives_worker(config: DistributedConfig, tag: str) -> object:
    ctx = init_distributed(config, "cpu")
    seen = {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "world_size": ctx.world_size,
        "is_main": is_main(ctx),
        "progress": progress_enabled(ctx),
        "group": dist.is_initialized(),
        "backend": str(dist.get_backend()),
        "port": int(os.environ["MASTER_PORT"]),
        "seed": seed_for_rank(11, ctx),
        "mean_of_numbers": all_reduce_mean(float(ctx.rank + 1), ctx),
        # a loss-like tensor with a graph: the mean must detach it
        "mean_of_tensors": all_reduce_mean(torch.tensor(10.0, requires_grad=True) * ctx.rank, ctx),
    }
    seen["gathered"] = gather_objects((ctx.rank, f"rank {ctx.rank}", torch.tensor([ctx.rank + 0.5])), ctx)
    seen["from_main"] = broadcast_object({"tag": tag} if ctx.is_main else None, ctx)
    peer = broadcast_object(seen, ctx, src=1)
    barrier(ctx)
    if ctx.is_main:
        return {"main": seen, "peer": peer}
    return "the value of rank 1, which launch_local must not return"


def _regression_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]])) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def _train_mlp(
    ctx: DistContext, seed: int, batches: list[torch.Tensor], lr: float
) -> dict[str, object]:
    """SGD on a small MLP over the given index batches; identical code for every world size."""
    x, y = _regression_data(seed, 64)
    torch.manual_seed(seed)
    model = wrap_ddp(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for idx in batches:
        loss = F.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(all_reduce_mean(loss, ctx))
    return {"state": unwrap(model).state_dict(), "losses": losses}


def _batches(order: torch.Tensor, batch: int, steps: int) -> list[torch.Tensor]:
    return [order[k * batch : (k + 1) * batch] for k in range(steps)]


def _ddp_regression_worker(config: DistributedConfig, seed: int, per_rank_batch: int, steps: int, lr: float):
    ctx = init_distributed(config, "cpu")
    order = shard_indices(64, ctx, seed, epoch=0)
    result = _train_mlp(ctx, seed, _batches(order, per_rank_batch, steps), lr)
    used = torch.cat(_batches(order, per_rank_batch, steps))
    result["indices"] = {ctx.rank: used, **broadcast_object({ctx.rank: used}, ctx, src=1)}
    result["wrapped"] = type(wrap_ddp(nn.Linear(1, 1), ctx)).__name__
    return result


# --- configuration and environment -------------------------------------------------------------


def test_config_defaults_are_one_local_process_with_a_free_port() -> None:
    config = parse_config(DistributedConfig, {}, "distributed")
    assert config == DistributedConfig(1, "auto", "127.0.0.1", 0, 1800.0)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"nproc_per_node": 0}, "distributed.nproc_per_node"),
        ({"backend": "mpi"}, "distributed.backend"),
        ({"master_port": 70000}, "distributed.master_port"),
        ({"timeout_s": 0}, "distributed.timeout_s"),
        ({"master_addr": " "}, "distributed.master_addr"),
        ({"world_size": 2}, "distributed.world_size"),
    ],
)
def test_config_errors_name_the_key(setting: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(DistributedConfig, setting, "distributed")
    assert err.value.key == key


def test_launch_environment_from_torchrun_and_srun() -> None:
    assert read_launch_environment({}) is None
    torchrun = read_launch_environment(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.source) == (5, 1, 8, "torchrun")
    assert (torchrun.master_addr, torchrun.master_port) == ("node0", 29400)
    # The step's task count wins over the allocation's; torchrun variables win over SLURM's.
    slurm = read_launch_environment(
        {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3"}
    )
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.source) == (3, 3, 4, "slurm")
    assert slurm.master_addr is None and slurm.master_port is None
    both = read_launch_environment({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "9"})
    assert (both.rank, both.world_size, both.source) == (0, 2, "torchrun")


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"RANK": "0"}, "missing WORLD_SIZE"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent"),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK='zero'"),
    ],
)
def test_bad_launch_environment_is_a_clear_error(environ: dict, fragment: str) -> None:
    with pytest.raises(DistributedError, match=fragment):
        read_launch_environment(environ)


def test_no_environment_is_one_process_without_a_process_group(no_launcher: pytest.MonkeyPatch) -> None:
    ctx = init_distributed(DistributedConfig(), "auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 0, 1, True, False)
    assert ctx.device.type == expected
    assert not dist.is_initialized()
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "1")
    assert init_distributed(None, "cpu") == DistContext.single_process("cpu")
    assert not dist.is_initialized()
    cleanup_distributed()  # nothing to destroy: must not raise


def test_settings_that_cannot_work_fail_before_any_rendezvous(no_launcher: pytest.MonkeyPatch) -> None:
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", "1")
    with pytest.raises(DistributedError, match="nccl"):
        init_distributed(DistributedConfig(backend="nccl"), "cpu")
    with pytest.raises(DistributedError, match="not one of"):
        init_distributed(DistributedConfig(), "tpu")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        no_launcher.delenv(name)
    # srun without MASTER_PORT: the ranks cannot agree on a free port by themselves
    no_launcher.setenv("SLURM_PROCID", "1")
    no_launcher.setenv("SLURM_NTASKS", "2")
    with pytest.raises(DistributedError, match="MASTER_PORT"):
        init_distributed(DistributedConfig(backend="gloo"), "cpu")
    no_launcher.setenv("SLURM_NNODES", "2")
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        init_distributed(DistributedConfig(backend="gloo", master_port=29400), "cpu")
    assert not dist.is_initialized()


def test_backend_follows_the_device() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(DistributedError):
        resolve_backend("nccl", torch.device("cpu"))


def test_context_rejects_inconsistent_ranks() -> None:
    with pytest.raises(ValueError):
        DistContext(2, 0, 2, torch.device("cpu"), False)
    with pytest.raises(ValueError):
        DistContext(1, 1, 2, torch.device("cpu"), True)


# --- helpers in one process --------------------------------------------------------------------


def test_helpers_are_identities_in_one_process() -> None:
    ctx = DistContext.single_process()
    model = nn.Linear(2, 1)
    assert wrap_ddp(model, ctx) is model and unwrap(model) is model
    assert all_reduce_mean(torch.tensor(2.5, requires_grad=True), ctx) == 2.5
    assert all_reduce_mean(3, ctx) == 3.0
    with pytest.raises(ValueError, match="scalar"):
        all_reduce_mean(torch.ones(2), ctx)
    marker = object()
    assert broadcast_object(marker, ctx) is marker
    assert gather_objects(marker, ctx) == [marker] and gather_objects(marker, ctx)[0] is marker
    barrier(ctx)
    assert is_main(ctx) and progress_enabled(ctx)


def test_seed_for_rank_keeps_rank0_and_separates_ranks() -> None:
    seeds = [seed_for_rank(3, _context(r, 4)) for r in range(4)]
    assert seeds[0] == 3
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    # seeds that configs derive for other streams (seed + small k) do not collide with ranks
    assert not set(seeds[1:]) & set(range(0, 1000))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    world=st.integers(1, 5),
    batch=st.integers(1, 4),
    seed=st.integers(0, 10**6),
    epoch=st.integers(0, 3),
)
def test_shards_are_disjoint_and_each_chunk_set_is_one_global_batch(
    n: int, world: int, batch: int, seed: int, epoch: int
) -> None:
    shards = [shard_indices(n, _context(r, world), seed, epoch) for r in range(world)]
    single = shard_indices(n, _context(0, 1), seed, epoch)
    assert sorted(single.tolist()) == list(range(n))  # world 1: a permutation
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)  # equal steps on every rank
    if n % world == 0:
        together = torch.cat(shards).tolist()
        assert sorted(together) == list(range(n))  # disjoint and covering
    # chunk k of every rank together = the k-th global batch of the single-process permutation
    for k in range(n // (batch * world)):
        chunk = torch.cat([s[k * batch : (k + 1) * batch] for s in shards])
        assert sorted(chunk.tolist()) == sorted(single[k * batch * world : (k + 1) * batch * world].tolist())


def test_shard_padding_drop_last_and_epochs() -> None:
    shards = [shard_indices(7, _context(r, 3), seed=0) for r in range(3)]
    together = torch.cat(shards).tolist()
    assert len(together) == 9 and set(together) == set(range(7))  # 2 indices repeated as padding
    dropped = [shard_indices(7, _context(r, 3), seed=0, drop_last=True) for r in range(3)]
    kept = torch.cat(dropped).tolist()
    assert len(kept) == 6 and len(set(kept)) == 6
    assert not torch.equal(shard_indices(50, _context(0, 1), 0, 0), shard_indices(50, _context(0, 1), 0, 1))
    with pytest.raises(ValueError):
        shard_indices(0, _context(0, 1), seed=0)


def test_split_global_batch_is_contiguous_and_must_divide() -> None:
    batch = torch.arange(12).reshape(6, 2)
    parts = [split_global_batch(batch, _context(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="evenly"):
        split_global_batch(batch, _context(0, 4))


# --- spawned processes (each launch starts two interpreters: a few seconds) --------------------


def test_launch_local_returns_rank0_value_and_collectives_agree_twice_in_a_row() -> None:
    first = launch_local(_collectives_worker, 2, (TEST_CONFIG, "first"), TEST_CONFIG)
    second = launch_local(_collectives_worker, 2, (TEST_CONFIG, "second"), TEST_CONFIG)
    for result, tag in ((first, "first"), (second, "second")):
        main, peer = result["main"], result["peer"]
        assert (main["rank"], main["local_rank"], main["world_size"], main["is_main"]) == (0, 0, 2, True)
        assert (peer["rank"], peer["local_rank"], peer["world_size"], peer["is_main"]) == (1, 1, 2, False)
        assert main["group"] and peer["group"] and main["backend"] == "gloo"
        assert main["progress"] and not peer["progress"]
        assert main["seed"] == 11 and peer["seed"] != 11
        assert main["mean_of_numbers"] == peer["mean_of_numbers"] == 1.5
        assert main["mean_of_tensors"] == peer["mean_of_tensors"] == 5.0
        assert main["from_main"] == peer["from_main"] == {"tag": tag}
        for gathered in (main["gathered"], peer["gathered"]):  # every rank's value, in rank order
            assert [(r, text) for r, text, _ in gathered] == [(0, "rank 0"), (1, "rank 1")]
            assert [float(t) for _, _, t in gathered] == [0.5, 1.5]
        assert main["port"] == peer["port"] != 0  # picked at launch, shared by both ranks


def test_ddp_on_two_ranks_equals_one_process_on_the_global_batch() -> None:
    seed, per_rank_batch, steps, lr = 3, 4, 5, 0.2
    ddp = launch_local(_ddp_regression_worker, 2, (TEST_CONFIG, seed, per_rank_batch, steps, lr), TEST_CONFIG)

    single_order = shard_indices(64, _context(0, 1), seed)
    global_batches = _batches(single_order, 2 * per_rank_batch, steps)
    reference = _train_mlp(DistContext.single_process(), seed, global_batches, lr)
    assert ddp["wrapped"] == "DistributedDataParallel"
    assert set(ddp["state"]) == set(reference["state"])  # unwrap: no "module." prefixes
    for name, value in reference["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=0, atol=1e-5)
    assert ddp["losses"] == pytest.approx(reference["losses"], abs=1e-5)

    used0, used1 = ddp["indices"][0], ddp["indices"][1]
    assert not set(used0.tolist()) & set(used1.tolist())
    assert sorted(torch.cat([used0, used1]).tolist()) == sorted(torch.cat(global_batches).tolist())

    # Without gradient synchronisation rank 0 would have trained on its own shard only.
    alone = _train_mlp(DistContext.single_process(), seed, _batches(used0, per_rank_batch, steps), lr)
    drift = max((alone["state"][k] - reference["state"][k]).abs().max().item() for k in reference["state"])
    assert drift > 1e-3


def test_torchrun_runs_a_plain_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [__file__, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out, weights_only=True)
    assert result == {"world_size": 2, "mean_rank": 0.5, "ranks_seen": [0, 1]}


# --- example entry point: how `python -m <package>.train --config ...` uses this module --------


def _example_entry_point(argv: list[str] | None = None) -> None:
    """What a training entry point under torchrun/srun does: init, train, rank 0 writes, clean up."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    ctx = init_distributed(DistributedConfig(backend="gloo", timeout_s=60.0), "cpu")
    try:
        # stands for the training function a Kedro node would hand to launch_local
        mean_rank = all_reduce_mean(float(ctx.rank), ctx)
        ranks_seen = [broadcast_object(ctx.rank, ctx, src=r) for r in range(ctx.world_size)]
        if is_main(ctx):
            summary = {"world_size": ctx.world_size, "mean_rank": mean_rank, "ranks_seen": ranks_seen}
            save_checkpoint(args.out, summary)
        barrier(ctx)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    _example_entry_point()
