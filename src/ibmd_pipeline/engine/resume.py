"""Resume bookkeeping: the working checkpoint that lets a killed run continue bit for bit.

:func:`~ibmd_pipeline.engine.loop.run_training` keeps one working checkpoint per run,
``workdir/last.pt``, written atomically. It holds everything a run changes: parameters,
optimizer moments, EMAs, the step counter, the history, the open logging window and every random
state (Python, NumPy, torch global and CUDA, and the training state's own generators). Resuming
from it reproduces the uninterrupted run exactly on the CPU; the learning rate is a function of
the step, so nothing about the schedule needs saving.

With several data-parallel ranks exactly one working checkpoint exists: rank 0 writes it, holding
every rank's random states (gathered at each save, entry ``r`` for rank ``r``), and on resume every
rank reads that one file and restores its own streams.

Another number of ranks: without ``train.global_batch_size`` the global batch is
``batch_size x world size``, so it would change, and the file is refused
(:class:`ResumeMismatchError`, naming the process count that resumes it). With
``train.global_batch_size`` the trainers draw every batch and its noise for the global batch, from
generators that every rank holds in the same state or seeds derived from the step, so nothing
random belongs to a rank: every rank restores the generators rank 0 saved, and re-seeds its
process-wide streams (Python, NumPy, torch: dropout only) from its seed and the step. The run then
continues as the uninterrupted one would, up to float rounding (the sums run in other orders) and
dropout masks (0 in every preset); with the same number of ranks it continues bit for bit.

A working checkpoint is resumed only by the configuration that wrote it (:func:`config_differences`,
keys in :data:`RESUME_NEUTRAL_KEYS` aside, and ``batch_size`` when ``global_batch_size`` is set: the
micro-batch size changes float rounding only); :func:`run_folder_name` gives each configuration its
own folder, so a changed setting starts afresh instead of failing to resume. The process count is
not part of the folder name: a changed count finds the run's checkpoint and resumes it, or says why
it cannot.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ibmd_pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.engine.distributed import DistContext, broadcast_object, gather_objects
from ibmd_pipeline.engine.training import TrainingState, seed_everything

__all__ = [
    "RESUME_NEUTRAL_KEYS",
    "WORKING_CHECKPOINT",
    "ResumeMismatchError",
    "check_ranks_agree",
    "config_differences",
    "restore_shared_streams",
    "restore_training_state",
    "resume_training_state",
    "rng_states",
    "run_folder_name",
    "save_working_checkpoint",
    "training_checkpoint",
]

#: Name of the working checkpoint inside a run's ``workdir``.
WORKING_CHECKPOINT = "last.pt"
#: Settings that change how a run is watched, saved or executed, not what it computes: a working
#: checkpoint may be resumed when only these differ (matched by the last part of the key).
RESUME_NEUTRAL_KEYS: tuple[str, ...] = ("resume", "log_every", "checkpoint_every", "sample_every", "compile")
#: /2: ``rng`` is a list of per-rank random states and ``world_size`` says how many ranks wrote
#: it; /1 files (one process, ``rng`` a single dict) are still read.
_FORMAT = "ibmd-training-state/2"
_READABLE_FORMATS = ("ibmd-training-state/1", _FORMAT)


class ResumeMismatchError(CheckpointError):
    """The working checkpoint in ``workdir`` was written by a different run configuration."""


# --------------------------------------------------------------------------- configurations


def config_differences(stored: Any, current: Any, prefix: str = "", ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys where two plain config dicts differ (``key: stored -> current``).

    Keys whose last part is in ``ignore`` are skipped.
    """
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        lines = []
        for key in sorted(set(stored) | set(current), key=str):
            if str(key) in ignore:
                continue
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                lines.append(f"{dotted}: (absent) -> {current[key]!r}")
            elif key not in current:
                lines.append(f"{dotted}: {stored[key]!r} -> (absent)")
            else:
                lines.extend(config_differences(stored[key], current[key], dotted, ignore))
        return lines
    if (
        isinstance(stored, (list, tuple))
        and isinstance(current, (list, tuple))
        and len(stored) == len(current)
    ):
        lines = []
        for i, (a, b) in enumerate(zip(stored, current, strict=True)):
            lines.extend(config_differences(a, b, f"{prefix}[{i}]", ignore))
        return lines
    return [] if stored == current else [f"{prefix or '(root)'}: {stored!r} -> {current!r}"]


def _without_neutral_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_neutral_keys(v) for k, v in value.items() if str(k) not in RESUME_NEUTRAL_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_neutral_keys(v) for v in value]
    return value


def _shaping_train_config(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings that shape the result: ``batch_size`` is only the micro-batch (float
    rounding) when ``global_batch_size`` fixes the batch of each step."""
    plain = dict(train_config)
    if plain.get("global_batch_size") is not None:
        plain.pop("batch_size", None)
    return plain


def run_folder_name(run_config: Mapping[str, Any], train_config: Mapping[str, Any]) -> str:
    """``run-<12 hex>``: one working-checkpoint folder per configuration that shapes the result.

    Settings that only watch the run (:data:`RESUME_NEUTRAL_KEYS`) do not change the name, so a
    changed configuration starts its own folder instead of failing to resume another's. Neither
    does the micro-batch ``batch_size`` when ``global_batch_size`` is set.
    """
    plain = _without_neutral_keys({"run": run_config, "train": _shaping_train_config(train_config)})
    text = json.dumps(plain, sort_keys=True, default=str)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- random states


def rng_states(state: TrainingState) -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch, CUDA, the state's generators), weights-only."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": _plain(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "generator": state.generator.get_state(),
    }
    if state.device_generator is not state.generator:
        states["device_generator"] = state.device_generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (a weights_only-safe form of Python's RNG state)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def restore_rng_states(state: TrainingState, states: Mapping[str, Any]) -> None:
    """Set every random stream of this process back to ``states`` (from :func:`rng_states`)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    state.generator.set_state(states["generator"])
    if "device_generator" in states and state.device_generator is not state.generator:
        state.device_generator.set_state(states["device_generator"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# --------------------------------------------------------------------------- the working checkpoint


def training_checkpoint(
    state: TrainingState,
    run_config: Mapping[str, Any],
    rank_rng_states: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The working checkpoint: everything needed to continue the run bit for bit.

    rank_rng_states: every rank's random states, entry ``r`` for rank ``r`` (gathered by
        :func:`run_training`); default: this process's alone, a world of one.
    """
    rng = [dict(s) for s in rank_rng_states] if rank_rng_states is not None else [rng_states(state)]
    return {
        "format": _FORMAT,
        "run_config": dict(run_config),
        "train_config": config_to_dict(state.config),
        "step": state.step,
        "skipped": state.skipped,
        "history": [dict(record) for record in state.history],
        "log_window": {key: list(values) for key, values in state.log_window.items()},
        "models": {name: model.state_dict() for name, model in state.models.items()},
        "ema": {name: ema.state_dict() for name, ema in state.emas.items()},
        "optimizers": {name: opt.state_dict() for name, opt in state.optimizers.items()},
        "world_size": len(rng),
        "rng": rng,
    }


def restore_training_state(
    state: TrainingState,
    payload: Mapping[str, Any],
    source: str = "checkpoint",
    *,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Load a :func:`training_checkpoint` payload into ``state`` (built the same way).

    rank / world_size: this process's place in the run; it restores the random states saved
    for its rank. Another number of ranks than wrote the payload resumes only when
    ``global_batch_size`` fixes the global batch (module docstring); otherwise
    :class:`ResumeMismatchError` says which process count resumes it.
    """
    if payload.get("format") not in _READABLE_FORMATS:
        raise CheckpointError(
            f"{source} is not a working training checkpoint (format {payload.get('format')!r})"
        )
    rank_rng = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
    resized = len(rank_rng) != world_size
    if resized:
        _check_resizable(state, payload, source, len(rank_rng), world_size)
    for group, own in (("models", state.models), ("optimizers", state.optimizers), ("ema", state.emas)):
        if set(payload[group]) != set(own):
            raise CheckpointError(
                f"{source} holds {group} {sorted(payload[group])}, this run has {sorted(own)}"
            )
    loads = [(f"model '{n}'", m, payload["models"][n]) for n, m in state.models.items()]
    loads += [(f"EMA of '{n}'", e, payload["ema"][n]) for n, e in state.emas.items()]
    loads += [(f"optimizer of '{n}'", o, payload["optimizers"][n]) for n, o in state.optimizers.items()]
    for label, target, saved in loads:
        try:
            target.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{source} does not fit the {label} of this run: {err}") from err
    state.step = int(payload["step"])
    state.skipped = int(payload["skipped"])
    state.history = [dict(record) for record in payload["history"]]
    state.log_window = {key: list(values) for key, values in payload["log_window"].items()}
    if resized:
        restore_shared_streams(state, rank_rng[0])
    else:
        restore_rng_states(state, rank_rng[rank])


def _check_resizable(
    state: TrainingState, payload: Mapping[str, Any], source: str, saved: int, world_size: int
) -> None:
    """Refuse another number of ranks unless the global batch is fixed, by the same setting."""
    stored = payload.get("train_config", {})
    fixed = state.config.global_batch_size
    if fixed is not None and stored.get("global_batch_size") == fixed:
        return
    if stored.get("global_batch_size") is not None:
        raise ResumeMismatchError(
            f"{source} was written with train.global_batch_size {stored['global_batch_size']}, this run "
            f"has {fixed}: set train.global_batch_size: {stored['global_batch_size']} to resume it "
            "(on any process count that divides it), or delete the file to start afresh."
        )
    per_rank = stored.get("batch_size")
    was = f" of {per_rank * saved} images (train.batch_size {per_rank} x {saved})" if per_rank else ""
    raise ResumeMismatchError(
        f"{source} was written by a run of {saved} process(es), this run has {world_size}: the run "
        f"has no train.global_batch_size, so its global batch{was} is train.batch_size x processes "
        "and another process count would change it; each rank's random streams are also its own. "
        f"Resume with {saved} process(es) (the stage's distributed.nproc_per_node: {saved}, or a "
        f"launcher's --nnodes x --nproc-per-node = {saved}), or delete the file to start afresh. A run "
        "started with train.global_batch_size set"
        + (f" (e.g. {per_rank * saved})" if per_rank else "")
        + " keeps its global batch on fewer processes by accumulating micro-batches, and resumes on "
        "any process count that divides it."
    )


def restore_shared_streams(state: TrainingState, states: Mapping[str, Any]) -> None:
    """After a change of the number of ranks: the shared generators, and fresh process streams.

    ``state.generator`` and ``state.device_generator`` come from ``states``, rank 0's: under
    ``global_batch_size`` a trainer draws from them only what every rank draws alike (the
    distillation draws for the global batch) or nothing at all (the teacher draws from
    ``engine.training.step_generator``). Python's, NumPy's and torch's global streams, which no
    draw of a batch uses, are seeded from this process's seed and the step.
    """
    mixed = np.random.SeedSequence([state.seed, state.step]).generate_state(1, dtype=np.uint64)[0]
    seed_everything(int(mixed) % 2**63)
    state.generator.set_state(states["generator"])
    if "device_generator" in states and state.device_generator is not state.generator:
        state.device_generator.set_state(states["device_generator"])


def resume_training_state(
    state: TrainingState, path: Path, run_config: Mapping[str, Any], ctx: DistContext
) -> None:
    """Restore ``state`` from the working checkpoint ``path`` that this run configuration wrote.

    Raises :class:`ResumeMismatchError` naming the settings that differ (keys in
    :data:`RESUME_NEUTRAL_KEYS` aside) when another configuration wrote it, or another number of
    ranks that cannot keep its global batch.
    """
    payload = load_checkpoint(path)
    stored_train = _shaping_train_config(payload.get("train_config", {}))
    differences = config_differences(
        {"run": payload.get("run_config", {}), "train": stored_train},
        {"run": dict(run_config), "train": _shaping_train_config(config_to_dict(state.config))},
        ignore=RESUME_NEUTRAL_KEYS,
    )
    if differences:
        raise ResumeMismatchError(
            f"working checkpoint '{path}' belongs to another configuration "
            f"({'; '.join(differences[:8])}{' ...' if len(differences) > 8 else ''}). "
            f"Delete '{path.parent}' (or that file) to start afresh, or set resume: false "
            f"to overwrite it."
        )
    restore_training_state(
        state, payload, source=f"checkpoint '{path}'", rank=ctx.rank, world_size=ctx.world_size
    )


def save_working_checkpoint(
    state: TrainingState, run_config: Mapping[str, Any], path: Path, ctx: DistContext
) -> None:
    """Rank 0 writes the one working checkpoint, with every rank's random states in it.

    Collective: every rank calls it at the same step (after checking that its weights are
    finite: a good checkpoint is never replaced by weights that went bad). Rank 0 then tells the
    others whether the write succeeded, so a failed write fails every rank instead of leaving
    them waiting, and no rank runs ahead of a checkpoint that is not on disk yet.
    """
    rank_rng = gather_objects(rng_states(state), ctx)
    failure: Exception | None = None
    if ctx.is_main:
        try:
            save_checkpoint(path, training_checkpoint(state, run_config, rank_rng))
        except Exception as err:  # reported to the other ranks below, then raised here
            failure = err
    message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}", ctx)
    if failure is not None:
        raise failure
    if message is not None:
        raise CheckpointError(f"rank 0 could not write the working checkpoint '{path}': {message}")


def check_ranks_agree(state: TrainingState, ctx: DistContext, path: Path | None) -> None:
    """Fail on every rank (instead of hanging) when the ranks start from different steps."""
    if not ctx.distributed:
        return
    steps = torch.tensor([state.step, -state.step], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if steps[0] != -steps[1]:
        raise ResumeMismatchError(
            f"the ranks start from different steps ({int(-steps[1])} to {int(steps[0])}): they do not "
            f"all see the working checkpoint '{path}'; put the workdir on a file system that every "
            "node mounts"
        )
