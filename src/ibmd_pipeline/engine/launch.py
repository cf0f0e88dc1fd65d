"""How the processes of a training job come to be: the one place that decides it.

A stage (teacher training, distillation) runs its per-process training function through
:func:`run_data_parallel`, whichever entry point started it (a Kedro node, ``python -m
ibmd_pipeline.commands.train``, a test). :func:`launch_mode` tells which of three cases holds:

- ``"launcher"``: torchrun or srun started this process (``RANK``/``WORLD_SIZE`` or ``SLURM_*``
  in the environment); it joins the launcher's process group, and ``nproc_per_node`` is ignored
  since the launcher made the processes;
- ``"local_workers"``: ``nproc_per_node > 1``; :func:`launch_local` spawns that many workers on
  this machine, each joins the group, and rank 0's result comes back;
- ``"in_process"``: otherwise; the function runs here as rank 0 of a world of 1.

:func:`launch_local` starts and watches the workers with torch's own launcher
(``torch.distributed.launcher.api.elastic_launch``, what ``torchrun --standalone`` uses): it runs
the rendezvous (a free port when ``master_port`` is 0), sets each worker's ``RANK``/
``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, and stops every worker when one
fails. On top of it, this module adds what the trainers need and torch leaves out: rank 0's return
value comes back as a weights-only ``torch.save`` payload (tensors and plain values, never a
pickled class), and a failure names the rank that failed *first* with its Python traceback.
(torch reports whichever failed process it notices first, and a peer that lost its partner in a
collective often dies within the same millisecond; each worker therefore records the time of its
own failure.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ibmd_pipeline.engine.checkpoint import atomic_write
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.devices import select_device
from ibmd_pipeline.engine.distributed import (
    DistContext,
    DistributedConfig,
    cleanup_distributed,
    init_distributed,
    read_launch_environment,
)

__all__ = [
    "LaunchMode",
    "WorkerError",
    "is_main_process",
    "launch_local",
    "launch_mode",
    "run_data_parallel",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")
LaunchMode = Literal["in_process", "local_workers", "launcher"]

#: Signals for which torch's launcher installs its own handlers in the launching process.
_LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
#: The environment variable torch's launcher sets in the launching process to name them.
_LAUNCHER_SIGNALS_VARIABLE = "TORCHELASTIC_SIGNALS_TO_HANDLE"


class WorkerError(RuntimeError):
    """A worker process of :func:`launch_local` failed.

    ``rank`` is the first rank that failed; ``details`` is its Python traceback (or how it
    exited when it died without one); ``later_failures`` lists the ranks that failed after it,
    usually because a peer disappeared from a collective.
    """

    def __init__(self, rank: int, details: str, later_failures: tuple[int, ...] = ()):
        self.rank = rank
        self.details = details
        self.later_failures = later_failures
        message = f"distributed worker rank {rank} failed:\n{details.rstrip()}"
        if later_failures:
            ranks = ", ".join(str(r) for r in later_failures)
            message += f"\n(rank(s) {ranks} failed afterwards, most likely as a consequence)"
        super().__init__(message)


# --------------------------------------------------------------------------- the decision


def launch_mode(config: DistributedConfig) -> LaunchMode:
    """How a stage with these ``distributed`` settings runs, given this process's environment."""
    if read_launch_environment() is not None:
        return "launcher"
    return "local_workers" if config.nproc_per_node > 1 else "in_process"


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (the one that writes files): true unless a
    launcher made it another rank."""
    launch = read_launch_environment()
    return launch is None or launch.rank == 0


def run_data_parallel(
    train: Callable[..., R], config: Any, *args: Any, device: str | torch.device, key: str
) -> R:
    """Run ``train(ctx, config, *args)`` on every process of the job, as :func:`launch_mode` says.

    train: the per-process training function; it gets this process's
        :class:`~ibmd_pipeline.engine.distributed.DistContext` first. Spawned workers import it, so
        it must be defined at module level, and its result must be tensors and plain values.
    config: the stage's settings, a frozen dataclass whose ``distributed`` field is a
        :class:`DistributedConfig`. Under a launcher it reaches ``train`` with
        ``nproc_per_node = 1``, as this process spawns nothing.
    device: ``engine.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``cuda:N`` only in one
        process) or a device.
    key: the dotted key of ``config.distributed`` (e.g. ``teacher.distributed``) for messages.

    Returns this process's result: rank 0's when local workers were spawned.
    """
    device = str(device)
    distributed: DistributedConfig = config.distributed
    mode = launch_mode(distributed)
    if mode == "launcher":
        if distributed.nproc_per_node > 1:
            logger.info(
                "%s.nproc_per_node=%d is ignored: the launcher started the processes",
                key,
                distributed.nproc_per_node,
            )
            distributed = dataclasses.replace(distributed, nproc_per_node=1)
            config = dataclasses.replace(config, distributed=distributed)
        return train(init_distributed(distributed, device), config, *args)
    if mode == "local_workers":
        nproc = distributed.nproc_per_node
        if device.strip().lower().startswith("cuda:"):
            raise ConfigError(
                "engine.device",
                f"{device!r} pins all {nproc} processes ({key}.nproc_per_node) to one GPU; use 'cuda' "
                "or 'auto' (each process takes the GPU of its local rank)",
            )
        return launch_local(_join_and_train, nproc, (train, config, args, device), distributed)
    return train(DistContext.single_process(select_device(device)), config, *args)


def _join_and_train(train: Callable[..., R], config: Any, args: tuple[Any, ...], device: str) -> R:
    """Body of a spawned worker of :func:`run_data_parallel`: join the group, then train."""
    return train(init_distributed(config.distributed, device), config, *args)


# --------------------------------------------------------------------------- local workers


def launch_local(
    fn: Callable[..., R],
    nproc: int,
    args: tuple[Any, ...] = (),
    config: DistributedConfig | None = None,
) -> R:
    """Run ``fn(*args)`` in ``nproc`` local processes and return rank 0's return value.

    ``fn`` must be importable at module level (workers are spawned, so it is pickled by
    reference) and should start with ``init_distributed(...)``: each worker finds ``RANK`` =
    ``LOCAL_RANK`` = its index, ``WORLD_SIZE`` = ``nproc`` and ``MASTER_ADDR``/``MASTER_PORT``
    set by torch's launcher, whose rendezvous listens on ``config.master_addr`` and
    ``config.master_port`` (a free port when it is 0). Rank 0's value comes back through
    ``torch.save`` and is read with ``weights_only=True``, so it must be tensors and plain values
    (state_dicts, numbers, lists/dicts); tensors come back on the CPU. If any worker fails, the
    others are stopped and :class:`WorkerError` names the first failing rank with its traceback.
    With ``nproc == 1``, ``fn`` runs in this process.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return fn(*args)
    config = DistributedConfig(nproc_per_node=nproc) if config is None else config
    host = f"[{config.master_addr}]" if ":" in config.master_addr else config.master_addr
    with tempfile.TemporaryDirectory(prefix="ibmd-launch-") as exchange:
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"ibmd-{uuid.uuid4().hex}",
            rdzv_backend="c10d",
            rdzv_endpoint=f"{host}:{config.master_port}",
            max_restarts=0,
            start_method="spawn",
            local_addr=config.master_addr,
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(exchange) / "logs")),
        )
        try:
            with _launcher_side_effects_undone():
                results = elastic_launch(launch, _worker_main)(fn, args, nproc, exchange)
        except ChildFailedError as err:
            raise _first_failure(err, Path(exchange)) from None
    return _read_rank0_result(results[0])


def _worker_main(fn: Callable[..., Any], args: tuple[Any, ...], nproc: int, exchange: str) -> bytes | None:
    """Body of one worker: run ``fn``, report a failure with its time, return rank 0's value."""
    if "OMP_NUM_THREADS" not in os.environ:
        # Like torchrun: N workers each using every core would oversubscribe the CPU N times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    rank = int(os.environ["RANK"])
    try:
        result = fn(*args)
    except Exception:
        # The time stamp lets the parent tell the first failure from its consequences.
        report = f"{time.time_ns()}\n{traceback.format_exc()}"
        atomic_write(Path(exchange) / f"rank{rank}.error", lambda handle: handle.write(report.encode()))
        raise
    cleanup_distributed()
    if rank != 0:
        return None
    payload = io.BytesIO()
    # Bytes, not tensors: tensors would travel through shared memory (/dev/shm), which containers
    # often keep small, and bytes keep the weights-only contract of checkpoints.
    torch.save(result, payload)
    return payload.getvalue()


def _first_failure(err: ChildFailedError, exchange_dir: Path) -> WorkerError:
    """The earliest worker traceback, or how the failing process exited if it left none."""
    reports = []
    for path in exchange_dir.glob("rank*.error"):
        stamp, _, text = path.read_text().partition("\n")
        reports.append((int(stamp), int(path.stem.removeprefix("rank")), text))
    if reports:
        reports.sort()
        _, rank, text = reports[0]
        return WorkerError(rank, text, tuple(r for _, r, _ in reports[1:]))
    rank, failure = err.get_first_failure()
    how = f"exit code {failure.exitcode}"
    if failure.exitcode < 0:
        how = f"{failure.signal_name()} ({how})"
    return WorkerError(rank, f"the process ended without a Python traceback: {how}")


def _read_rank0_result(payload: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for values outside the safe set
        raise TypeError(
            "the value returned by rank 0 must be tensors and plain values (state_dicts, numbers, "
            f"strings, lists, dicts) loadable with weights_only=True: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err


@contextlib.contextmanager
def _launcher_side_effects_undone() -> Iterator[None]:
    """Give back the signal handlers and the environment variable torch's launcher takes over.

    While the workers run, the launcher's handlers stop them on Ctrl-C or SIGTERM; afterwards
    the calling process (a Kedro run, a test session) gets its own handlers back.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in _LAUNCHER_SIGNALS}
    variable = os.environ.get(_LAUNCHER_SIGNALS_VARIABLE)
    try:
        yield
    finally:
        if in_main_thread:
            for name, handler in handlers.items():
                if handler is not None:  # None: a handler not installed from Python
                    signal.signal(getattr(signal, name), handler)
        if variable is None:
            os.environ.pop(_LAUNCHER_SIGNALS_VARIABLE, None)
        else:
            os.environ[_LAUNCHER_SIGNALS_VARIABLE] = variable
