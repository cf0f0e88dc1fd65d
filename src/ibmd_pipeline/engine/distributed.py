"""Data-parallel training with ``torch.distributed`` and DDP, defaulting to one CPU process.

One training function serves every launcher. It calls :func:`init_distributed` first, then
works through a :class:`DistContext` (rank, world size, device); the launcher only decides how
many copies of it run and sets the standard environment variables (``engine.launch`` decides
which launcher applies):

- no launcher (plain ``python``, a Kedro node with ``nproc_per_node = 1``, the tests): no
  ``RANK``/``WORLD_SIZE`` in the environment, so the context is rank 0 of 1 and no process
  group exists; every helper below is then a no-op or the identity;
- ``engine.launch.launch_local``: a stage with ``nproc_per_node > 1`` spawns that many local
  workers through torch's launcher, each with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
  ``MASTER_ADDR``/``MASTER_PORT`` set, and gets rank 0's return value back;
- ``torchrun`` (one or many nodes) or ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/
  ``SLURM_LOCALID`` when the torchrun variables are absent) around a plain Python entry point.

Batches: the configured batch size is *per rank*; one optimiser step sees the global batch
``batch_size * world_size``, or ``train.global_batch_size`` when set (each rank then
accumulates several micro-batches, ``engine.training.plan_batches``). DDP averages gradients
over ranks, and each rank's loss is a mean over its own shard, so the update equals a
single-process step on the global batch (:func:`shard_indices` gives disjoint shards that
together form each global batch).

Rules for a training loop running on several ranks (all are free with one process):

- wrap each *trained* network with :func:`wrap_ddp` and call the wrapper only in the forward
  pass whose backward updates that network; a network that merely feeds another network's
  loss (a frozen teacher, IBMD's fake model during the generator step) is called through
  :func:`unwrap`, otherwise DDP waits for gradients that never come;
- EMA, checkpoints and exported state_dicts use ``unwrap(model)`` (no ``module.`` prefixes);
- every rank takes the same control-flow decisions: test NaN/inf on the value returned by
  :func:`all_reduce_mean`, not on the local loss, or one rank stops while the others hang;
- only the main rank logs, shows progress (:func:`progress_enabled`) and writes files; the
  others wait at :func:`barrier` where they must not run ahead (e.g. before a resume read);
- random streams that must differ per rank (time steps, noise) are seeded with
  :func:`seed_for_rank`; the data permutation uses the same seed on every rank;
- with gradient accumulation (``train.global_batch_size``), run every micro-batch but the last
  inside :func:`gradient_sync` ``(wrapper, False)``, so that DDP averages once per update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ibmd_pipeline.engine.config import require

Backend = Literal["auto", "gloo", "nccl"]

# Added to the seed once per rank: rank 0 keeps the single-process seed, other ranks land far
# from the small seeds (seed + 1, seed + 2, ...) that configs use for other streams.
_RANK_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**63


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How many processes train together and how they meet (``<stage>.distributed``).

    ``nproc_per_node``: local worker processes a stage spawns (``engine.launch.launch_local``);
    1 trains in the calling process. ``backend``: ``"auto"`` is NCCL on CUDA and Gloo on the
    CPU. ``master_addr``/``master_port``: the rendezvous of local launches and the fallback
    under ``srun`` when ``MASTER_ADDR``/``MASTER_PORT`` are not exported; port 0 picks a free
    port at launch time. ``timeout_s``: how long a collective waits for a missing rank before
    failing instead of hanging.
    """

    nproc_per_node: int = 1
    backend: Backend = "auto"
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    timeout_s: float = 1800.0

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.nproc_per_node >= 1, f"{prefix}nproc_per_node", f"must be >= 1, got {self.nproc_per_node}"
        )
        require(bool(self.master_addr.strip()), f"{prefix}master_addr", "must be a host name or address")
        require(
            0 <= self.master_port <= 65535,
            f"{prefix}master_port",
            f"must be 0 (pick a free port at launch) or a port in 1..65535, got {self.master_port}",
        )
        require(self.timeout_s > 0, f"{prefix}timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its ranks, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of size {self.world_size}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")
        if self.is_main != (self.rank == 0):
            raise ValueError(
                f"is_main must be True exactly on rank 0 (rank {self.rank}, is_main {self.is_main})"
            )

    @classmethod
    def single_process(cls, device: torch.device | str = "cpu") -> DistContext:
        """Rank 0 of a world of 1 on ``device``: what every helper treats as 'not distributed'."""
        return cls(rank=0, local_rank=0, world_size=1, device=torch.device(device), is_main=True)

    @property
    def distributed(self) -> bool:
        """True when other ranks exist, so collectives and DDP are needed."""
        return self.world_size > 1


@dataclasses.dataclass(frozen=True)
class LaunchEnvironment:
    """The ranks a launcher gave this process, read from its environment variables.

    ``master_addr``/``master_port`` are None when the launcher did not export them (``srun``
    without ``MASTER_ADDR``/``MASTER_PORT``); :func:`init_distributed` then falls back to the
    config.
    """

    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None
    source: Literal["torchrun", "slurm"]


class DistributedError(RuntimeError):
    """A launch environment or distributed setting that cannot work."""


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnvironment | None:
    """Ranks set by torchrun or ``launch_local`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or srun.

    Returns None when no launcher is present. The srun fallback reads ``SLURM_PROCID``,
    ``SLURM_LOCALID`` and the step's task count ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``:
    the step may be smaller than the allocation, and a world larger than the processes that
    exist would wait for ranks that never come). ``environ`` defaults to ``os.environ`` read now.
    """
    environ = os.environ if environ is None else environ
    master_addr = environ.get("MASTER_ADDR") or None
    master_port = _env_int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    if "RANK" in environ or "WORLD_SIZE" in environ:
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
        if missing:
            raise DistributedError(f"environment sets only one of RANK/WORLD_SIZE; missing {missing[0]}")
        rank = _env_int(environ, "RANK")
        local_rank = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        world_size, source = _env_int(environ, "WORLD_SIZE"), "torchrun"
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        rank = _env_int(environ, "SLURM_PROCID")
        local_rank = _env_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        world_size, source = _env_int(environ, tasks_var), "slurm"
    else:
        return None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(
            f"inconsistent {source} environment: rank {rank}, local rank {local_rank}, "
            f"world size {world_size}"
        )
    return LaunchEnvironment(rank, local_rank, world_size, master_addr, master_port, source)


def _resolve_device(preference: str, local_rank: int, world_size: int, source: str = "none") -> torch.device:
    """This process's device: on CUDA, the GPU of its local rank (one GPU per process)."""
    if preference not in ("auto", "cpu", "cuda") and not preference.startswith("cuda:"):
        raise DistributedError(f"device {preference!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError(f"device {preference!r} was requested but CUDA is not available")
    if preference.startswith("cuda:"):
        if world_size > 1:
            raise DistributedError(
                f"device {preference!r} pins every rank to one GPU; use 'cuda' or 'auto' so that "
                "each process takes the GPU of its local rank"
            )
        return torch.device(preference)
    count = torch.cuda.device_count()
    if source == "slurm" and count == 1:
        # srun --gpus-per-task shows each task only its own GPU, as cuda:0.
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise DistributedError(
            f"local rank {local_rank} has no GPU of its own ({count} visible on this node); start at "
            "most one process per GPU, or train on the CPU with device 'cpu'"
        )
    return torch.device("cuda", local_rank)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``"auto"`` gives NCCL for CUDA devices and Gloo otherwise; NCCL on a CPU is an error."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedError(f"backend 'nccl' needs CUDA devices, but this process runs on {device}")
    return backend


def init_distributed(config: DistributedConfig | None = None, device_preference: str = "auto") -> DistContext:
    """Join the process group the launcher set up, or run as a single process if there is none.

    Reads the environment (see :func:`read_launch_environment`) when called. Without launcher
    variables, or with a world size of 1, nothing is initialised and the context is rank 0 of
    1. Otherwise the process group is initialised with the configured backend and timeout, and
    on CUDA the current device becomes the GPU of the local rank. Calling it again in a process
    whose group already exists returns the same context.

    ``device_preference``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``
    (the GPU of the local rank) or ``"cuda:N"`` (single process only).
    """
    config = DistributedConfig() if config is None else config
    launch = read_launch_environment()
    if launch is None:
        return DistContext.single_process(_resolve_device(device_preference, local_rank=0, world_size=1))
    device = _resolve_device(device_preference, launch.local_rank, launch.world_size, launch.source)
    context = DistContext(
        rank=launch.rank,
        local_rank=launch.local_rank,
        world_size=launch.world_size,
        device=device,
        is_main=launch.rank == 0,
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size == 1:
        return context
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise DistributedError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists, "
                f"but the environment says rank {launch.rank} of {launch.world_size}"
            )
        return context

    backend = resolve_backend(config.backend, device)
    if launch.master_addr is not None and launch.master_port is not None:
        # env:// also honours torchrun's agent-hosted store (TORCHELASTIC_USE_AGENT_STORE).
        init_method = "env://"
    else:
        init_method = _tcp_init_method(launch, config)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(seconds=config.timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return context


def _tcp_init_method(launch: LaunchEnvironment, config: DistributedConfig) -> str:
    """Rendezvous address for srun jobs that did not export ``MASTER_ADDR``/``MASTER_PORT``."""
    address = launch.master_addr or config.master_addr
    port = launch.master_port or config.master_port
    if port == 0:
        raise DistributedError(
            "MASTER_PORT is not set and distributed.master_port is 0: the ranks of an srun job cannot "
            "agree on a free port; export MASTER_PORT or set distributed.master_port"
        )
    nodes = os.environ.get("SLURM_NNODES", "1")
    if launch.master_addr is None and address in ("127.0.0.1", "localhost") and nodes != "1":
        raise DistributedError(
            f"the job spans {nodes} nodes but MASTER_ADDR is not set and distributed.master_addr is "
            f"{address!r}; export MASTER_ADDR=<first node of the job>"
        )
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


def cleanup_distributed() -> None:
    """Destroy the process group if one exists (safe to call in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(
    n: int, ctx: DistContext, seed: int, epoch: int = 0, drop_last: bool = False
) -> torch.Tensor:
    """This rank's indices of one epoch over ``n`` examples (int64, CPU).

    Every rank draws the same permutation (seeded with ``seed + epoch``) and takes every
    ``world_size``-th entry starting at its rank, so the shards are disjoint. Reading the shard
    in chunks of the per-rank batch ``B``, chunk ``k`` of all ranks together is the window
    ``k*B*W .. (k+1)*B*W`` of the permutation: exactly the ``k``-th global batch a single
    process would read with batch ``B*W``. With ``n`` not a multiple of the world size, the
    permutation is padded by wrapping around (ranks must run the same number of steps, or DDP
    waits forever), or truncated when ``drop_last``.
    """
    if n < 1:
        raise ValueError(f"cannot shard {n} examples")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator)
    world = ctx.world_size
    if drop_last:
        if n < world:
            raise ValueError(f"drop_last with {n} examples leaves nothing for {world} ranks")
        order = order[: n - n % world]
    elif n % world:
        total = -(-n // world) * world
        order = order.repeat(-(-total // n))[:total]
    return order[ctx.rank :: world]


def split_global_batch(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous part of a global batch (dim 0) that every rank holds identically.

    For loops that draw each global batch from a generator seeded the same on every rank; the
    size must be a multiple of the world size.
    """
    size = batch.shape[0]
    if size % ctx.world_size:
        raise ValueError(f"global batch of {size} does not split evenly over {ctx.world_size} ranks")
    per_rank = size // ctx.world_size
    return batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]


def all_reduce_mean(value: torch.Tensor | float, ctx: DistContext) -> float:
    """Mean of a scalar over all ranks (e.g. a logged loss); the value itself in one process.

    Every rank gets the same number back, so decisions taken on it (NaN guard, early stop)
    agree across ranks. No gradient flows through it.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"all_reduce_mean takes a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach()
    if not ctx.distributed:
        return float(value)
    total = torch.as_tensor(value, dtype=torch.float64, device=ctx.device).reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=ctx.device if ctx.device.type == "cuda" else None)
    return holder[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable ``obj``, entry ``r`` from rank ``r``, on every rank (``[obj]`` alone).

    For small per-rank values such as random-generator states, e.g. so that rank 0 can store
    them all in one checkpoint. Tensors come back on the CPU.
    """
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    # all_gather rather than gather: it works on every backend (NCCL included).
    dist.all_gather_object(gathered, obj)
    return [_to_cpu(value) for value in gathered]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if not ctx.distributed:
        return
    if ctx.device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def is_main(ctx: DistContext) -> bool:
    """True on rank 0: the rank that logs, shows progress and writes files."""
    return ctx.is_main


def progress_enabled(ctx: DistContext) -> bool:
    """Whether this rank shows progress bars: only the main rank, so N bars do not interleave.

    Use as ``tqdm(..., disable=not progress_enabled(ctx))``.
    """
    return ctx.is_main


def seed_for_rank(seed: int, ctx: DistContext) -> int:
    """A seed for this rank's own random stream (noise, time steps); rank 0 keeps ``seed``.

    Ranks must draw different noise, or the extra ranks add no new samples to the global batch.
    """
    return (seed + ctx.rank * _RANK_SEED_STRIDE) % _SEED_MODULUS


def wrap_ddp(module: nn.Module, ctx: DistContext, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(module)`` when several ranks train, else ``module`` itself.

    ``module`` must already be on ``ctx.device``. Wrapping copies rank 0's parameters and
    buffers to every rank, and backward averages gradients over ranks. A module without
    trainable parameters (a frozen teacher) is returned as is: DDP has nothing to synchronise.
    ``ddp_options`` go to DDP (e.g. ``find_unused_parameters=True``).
    """
    if not ctx.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **ddp_options)


def gradient_sync(module: nn.Module | None, enabled: bool) -> contextlib.AbstractContextManager:
    """A context in which ``module``'s backward averages gradients over ranks, or does not.

    ``enabled=False`` on a DDP wrapper is its ``no_sync()``: gradients accumulate locally, for
    every micro-batch of an accumulated update but the last, whose backward then averages the
    sum. Put the forward pass inside the context too (DDP prepares its reducer there). Anything
    else (a plain module, None, one process) needs no synchronisation: a null context.
    """
    if enabled or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the module itself otherwise), for EMA and state_dicts."""
    return module.module if isinstance(module, DistributedDataParallel) else module
