"""A small, generic training loop shared by the teacher and the IBMD trainers.

The loop knows nothing about bridges or losses. A trainer supplies

- a :class:`TrainingState` (from :func:`create_training_state`): the trained modules by name,
  one AdamW per module, EMAs for the modules that want one, the step counter, the logged
  history and the random generators whose states travel in every checkpoint;
- ``step_fn(state, step) -> {name: loss}``: one training step, which does its own forward
  passes and calls :func:`optimizer_step` once per update (the IBMD trainer calls it L times
  for the auxiliary model and once for the generator within one step).

:func:`run_training` then seeds, resumes from ``workdir/last.pt`` when it belongs to the same
run configuration, shows a tqdm bar, logs window means, calls the sampling callback, writes
atomic working checkpoints, and stops (or skips the batch) on a non-finite loss without ever
overwriting the last good checkpoint. Resuming after a crash reproduces the uninterrupted run
exactly on the CPU: parameters, optimizer moments, EMAs, the step counter and every random
state (Python, NumPy, torch global and CUDA, and the state's own generators) are saved.

With several data-parallel ranks (``ctx``), exactly one working checkpoint exists: rank 0
writes it, holding every rank's random states (gathered at each save, entry ``r`` for rank
``r``), and on resume every rank reads that one file and restores its own streams. A file
written by another number of ranks is refused (:class:`ResumeMismatchError`): rank ``r``'s
streams have no counterpart then.

The learning rate is a pure function of the loop step (:func:`lr_factor`), not of how many
times an optimizer stepped, so optimizers that update several times per step (IBMD's
auxiliary model) follow the same schedule and nothing about it needs checkpointing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ibmd_pipeline.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.config import config_to_dict, require
from ibmd_pipeline.engine.devices import CompileConfig, autocast_context, is_compiled, place_module
from ibmd_pipeline.engine.distributed import DistContext, barrier, broadcast_object, gather_objects

logger = logging.getLogger(__name__)

#: Name of the working checkpoint inside a run's ``workdir``.
WORKING_CHECKPOINT = "last.pt"
#: Settings that change how a run is watched, saved or executed, not what it computes: a working
#: checkpoint may be resumed when only these differ (matched by the last part of the key).
RESUME_NEUTRAL_KEYS: tuple[str, ...] = ("resume", "log_every", "checkpoint_every", "sample_every", "compile")
#: /2: ``rng`` is a list of per-rank random states and ``world_size`` says how many ranks wrote
#: it; /1 files (one process, ``rng`` a single dict) are still read.
_FORMAT = "ibmd-training-state/2"
_READABLE_FORMATS = ("ibmd-training-state/1", _FORMAT)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the teacher and the distillation trainers.

    steps: training steps (calls of the step function).
    batch_size: images per batch (read by the step function; the loop itself does not batch).
    lr: peak learning rate of AdamW (paper: 5e-5 for I2SB teachers, 1e-5 / 3e-6 for DDBM).
    weight_decay: AdamW's decoupled weight decay.
    betas: AdamW's moment decay rates, each in [0, 1).
    ema_decay: decay of the weight EMA, in [0, 1) (paper: 0.99).
    ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` after n updates, so the EMA
        forgets its (random or teacher) starting point quickly in short runs.
    grad_clip: clip the global gradient norm of each update to this value; 0 = off.
    warmup_steps: linear learning-rate warm-up from lr/warmup_steps to lr, in [0, steps).
    lr_schedule: ``constant`` after warm-up, or ``cosine`` decay towards 0 at ``steps``.
    log_every: steps between history records (window means of the step function's losses).
    checkpoint_every: steps between working checkpoints; 0 = only at the end.
    sample_every: steps between ``on_sample`` callbacks; 0 = off.
    bf16: run the step function under bfloat16 autocast on CUDA (a no-op on the CPU).
    skip_nonfinite: skip (and count) a step whose loss or gradient is NaN/inf instead of
        stopping; more than ``max_skipped`` skips in a run stop it.
    max_skipped: the most skipped steps tolerated when ``skip_nonfinite`` is set.
    seed: seeds Python, NumPy and torch and the state's generators at the start of a run
        (unless the trainer gives this process its own stream seed, ``TrainingState.stream_seed``).
    resume: continue from ``workdir/last.pt`` when present (and built by the same run
        configuration); false starts afresh and overwrites it.
    compile: ``torch.compile`` of the trained networks (:class:`~ibmd_pipeline.engine.devices.
        CompileConfig`); applied by the trainers, resume-neutral.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.99
    ema_warmup: bool = False
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    log_every: int = 50
    checkpoint_every: int = 0
    sample_every: int = 0
    bf16: bool = False
    skip_nonfinite: bool = False
    max_skipped: int = 10
    seed: int = 0
    resume: bool = True
    compile: CompileConfig = field(default_factory=CompileConfig)

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(self.steps >= 1, f"{prefix}steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")
        require(0.0 < self.lr <= 1.0, f"{prefix}lr", f"must be in (0, 1], got {self.lr}")
        require(self.weight_decay >= 0.0, f"{prefix}weight_decay", f"must be >= 0, got {self.weight_decay}")
        for i, beta in enumerate(self.betas):
            require(0.0 <= beta < 1.0, f"{prefix}betas[{i}]", f"must be in [0, 1), got {beta}")
        require(0.0 <= self.ema_decay < 1.0, f"{prefix}ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.grad_clip >= 0.0, f"{prefix}grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        require(
            0 <= self.warmup_steps < self.steps,
            f"{prefix}warmup_steps",
            f"must be in [0, steps={self.steps}), got {self.warmup_steps}",
        )
        require(self.log_every >= 1, f"{prefix}log_every", f"must be >= 1, got {self.log_every}")
        require(
            self.checkpoint_every >= 0,
            f"{prefix}checkpoint_every",
            f"must be >= 0 (0 = only at the end), got {self.checkpoint_every}",
        )
        require(
            self.sample_every >= 0,
            f"{prefix}sample_every",
            f"must be >= 0 (0 = off), got {self.sample_every}",
        )
        require(self.max_skipped >= 0, f"{prefix}max_skipped", f"must be >= 0, got {self.max_skipped}")
        require(self.seed >= 0, f"{prefix}seed", f"must be >= 0, got {self.seed}")


class NonFiniteLossError(RuntimeError):
    """A loss, gradient norm or parameter became NaN/inf; names the step and the quantity.

    ``step`` is the index passed to the step function (= steps completed before it).
    """

    def __init__(self, step: int, name: str, value: float, note: str = ""):
        self.step = step
        self.name = name
        self.value = value
        self.note = note
        message = f"non-finite {name} = {value} at training step {step}"
        super().__init__(f"{message}; {note}" if note else message)

    def __reduce__(self) -> tuple[type, tuple[int, str, float, str]]:
        # Picklable with its fields, so it survives a process boundary (parallel runners).
        return (type(self), (self.step, self.name, self.value, self.note))


class ResumeMismatchError(CheckpointError):
    """The working checkpoint in ``workdir`` was written by a different run configuration."""


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of ``config.lr`` at loop step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then 1
    (``constant``) or ``0.5 (1 + cos(pi p))`` with ``p = (step - warmup) / (steps - warmup)``
    (``cosine``).
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included).

    Call it before building the networks so their initialisation is reproducible too.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of a module's parameters: ``s <- d s + (1 - d) p``.

    The shadow is a frozen deep copy of the module (in eval mode), so it can be evaluated
    directly (``ema.shadow(x, t)``). Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if is_compiled(model):
            # A deep copy of an in-place compiled module would still call the original's code.
            raise ValueError("create the EMA before compiling the model (engine.devices.compile_module)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (smaller at first when ``warmup`` is set)."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards ``model``'s current parameters."""
        weight = 1.0 - self.current_decay()
        shadow_params = dict(self.shadow.named_parameters())
        for name, param in model.named_parameters():
            # lerp: s + (1 - d)(p - s) = d s + (1 - d) p
            shadow_params[name].lerp_(param.detach(), weight)
        shadow_buffers = dict(self.shadow.named_buffers())
        for name, buffer in model.named_buffers():
            shadow_buffers[name].copy_(buffer)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


@dataclass
class TrainingState:
    """Everything a run changes, and everything a working checkpoint stores.

    models: the trained modules by name (frozen networks, such as IBMD's teacher, stay in the
        step function's closure: they are not checkpointed).
    optimizers: one AdamW per model, under the model's name.
    emas: EMAs by model name (a subset of ``models``).
    device: where the models live.
    generator: CPU generator for data order and CPU-side noise.
    device_generator: generator on ``device`` for noise drawn there (the same object on CPU).
    step: steps completed. history: one dict of floats per logged step. skipped: steps skipped
        for non-finite values.
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    emas: dict[str, EMA]
    device: torch.device
    generator: torch.Generator
    device_generator: torch.Generator
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0
    config: TrainConfig = field(default_factory=TrainConfig)
    #: per-step metrics that :func:`optimizer_step` adds (gradient norms); reset every step
    step_metrics: dict[str, float] = field(default_factory=dict)
    #: values logged since the last history record (checkpointed, so a resumed run's
    #: records equal the uninterrupted run's)
    log_window: dict[str, list[float]] = field(default_factory=dict)
    #: seed of this process's random streams (global generators, ``generator``,
    #: ``device_generator``); None = ``config.seed``. A data-parallel trainer whose ranks draw
    #: their own noise gives each rank its own while ``config`` (compared on resume) stays the
    #: run's.
    stream_seed: int | None = None

    @property
    def seed(self) -> int:
        """The seed of this process's random streams."""
        return self.config.seed if self.stream_seed is None else self.stream_seed


def create_training_state(
    models: Mapping[str, nn.Module],
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    ema: Iterable[str] | None = None,
    lr: Mapping[str, float] | None = None,
    stream_seed: int | None = None,
) -> TrainingState:
    """Place ``models`` on ``device`` and give each an AdamW (and an EMA if named in ``ema``).

    Placement is :func:`~ibmd_pipeline.engine.devices.place_module` (``channels_last`` on
    CUDA); the EMA shadows are copies of the placed models. Compile the models
    (``config.compile``) only after this, since the EMA copies must stay uncompiled.
    ema: names of the models that keep an EMA; default all of them.
    lr: per-model peak learning rates overriding ``config.lr``.
    stream_seed: seed of this process's random streams instead of ``config.seed`` (e.g.
        ``engine.distributed.seed_for_rank``); see :attr:`TrainingState.stream_seed`.
    Only parameters with ``requires_grad`` are optimised.
    """
    device = torch.device(device)
    unknown = sorted((set(ema or ()) | set(lr or {})) - set(models))
    if unknown:
        raise ValueError(f"unknown model name(s) {unknown}; models: {sorted(models)}")
    moved = {name: place_module(model, device).train() for name, model in models.items()}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name, model in moved.items():
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model '{name}' has no trainable parameters")
        peak = (lr or {}).get(name, config.lr)
        optimizer = torch.optim.AdamW(params, lr=peak, betas=config.betas, weight_decay=config.weight_decay)
        for group in optimizer.param_groups:
            group["base_lr"] = peak
        optimizers[name] = optimizer
    ema_names = list(moved) if ema is None else list(ema)
    emas = {name: EMA(moved[name], config.ema_decay, config.ema_warmup) for name in ema_names}
    seed = config.seed if stream_seed is None else stream_seed
    generator = torch.Generator().manual_seed(seed)
    device_generator = (
        generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed + 1)
    )
    return TrainingState(
        models=moved,
        optimizers=optimizers,
        emas=emas,
        device=device,
        generator=generator,
        device_generator=device_generator,
        config=config,
        stream_seed=stream_seed,
    )


def _is_finite(value: Tensor | float) -> bool:
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def optimizer_step(
    state: TrainingState, name: str, loss: Tensor, parameters: Sequence[Tensor] | None = None
) -> float:
    """One update of optimizer ``name`` from ``loss``; returns the gradient norm before clipping.

    Checks the loss is finite before touching anything, back-propagates into ``parameters``
    only (default: the optimizer's own; gradients of other networks the loss went through,
    such as IBMD's teacher and auxiliary model, are not accumulated), checks the gradient
    norm is finite, clips it to ``grad_clip``, steps, and updates the model's EMA if it has
    one. The backward pass runs outside autocast. bfloat16 needs no gradient scaling.
    Raises :class:`NonFiniteLossError` (the update is not applied).
    """
    config = state.config
    optimizer = state.optimizers[name]
    if not _is_finite(loss.detach()):
        raise NonFiniteLossError(state.step, f"loss of '{name}'", float(loss.detach().float().mean()))
    params = (
        list(parameters)
        if parameters is not None
        else [p for group in optimizer.param_groups for p in group["params"]]
    )
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(state.device.type, enabled=False):
        loss.backward(inputs=params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=state.device)
    if not _is_finite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(state.step, f"gradient norm of '{name}'", float(norm))
    if config.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, config.grad_clip, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if name in state.emas:
        state.emas[name].update(state.models[name])
    grad_norm = float(norm)
    state.step_metrics[f"grad_norm/{name}"] = grad_norm
    return grad_norm


def set_learning_rates(state: TrainingState, step: int) -> None:
    """Apply the schedule of :func:`lr_factor` to every optimizer's groups for ``step``."""
    factor = lr_factor(state.config, step)
    for optimizer in state.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


@functools.lru_cache(maxsize=4)
def _epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def epoch_batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of the batch for loop step ``step``: every epoch visits all items once, in an
    order fixed by ``(seed, epoch)``.

    A pure function of the step, so a resumed run draws exactly the batches the uninterrupted
    run would have drawn, with no sampler state to checkpoint.
    """
    if num_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(
            f"need num_items >= 1, batch_size >= 1, step >= 0; got {num_items}, {batch_size}, {step}"
        )
    start = step * batch_size
    pieces = []
    while batch_size > 0:
        epoch, offset = divmod(start, num_items)
        take = min(batch_size, num_items - offset)
        pieces.append(_epoch_order(num_items, seed, epoch)[offset : offset + take])
        start += take
        batch_size -= take
    return torch.cat(pieces)


# --------------------------------------------------------------------------- checkpoints


def _rng_states(state: TrainingState) -> dict[str, Any]:
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


def _restore_rng_states(state: TrainingState, states: Mapping[str, Any]) -> None:
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


def training_checkpoint(
    state: TrainingState,
    run_config: Mapping[str, Any],
    rank_rng_states: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The working checkpoint: everything needed to continue the run bit for bit.

    rank_rng_states: every rank's random states, entry ``r`` for rank ``r`` (gathered by
        :func:`run_training`); default: this process's alone, a world of one.
    """
    rng = [dict(s) for s in rank_rng_states] if rank_rng_states is not None else [_rng_states(state)]
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
    for its rank. Raises :class:`ResumeMismatchError` when the payload was written by another
    number of ranks.
    """
    if payload.get("format") not in _READABLE_FORMATS:
        raise CheckpointError(
            f"{source} is not a working training checkpoint (format {payload.get('format')!r})"
        )
    rank_rng = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
    if len(rank_rng) != world_size:
        raise ResumeMismatchError(
            f"{source} was written by a run of {len(rank_rng)} process(es), this run has {world_size}: "
            "each rank's random streams are saved for its own rank and have no counterpart in another "
            f"world size. Resume with {len(rank_rng)} process(es), or delete the file to start afresh."
        )
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
    _restore_rng_states(state, rank_rng[rank])


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


def _check_params_finite(state: TrainingState) -> None:
    modules = [(f"parameters of '{n}'", m) for n, m in state.models.items()]
    modules += [(f"EMA parameters of '{n}'", e.shadow) for n, e in state.emas.items()]
    for label, module in modules:
        for pname, param in module.named_parameters():
            if not _is_finite(param.detach()):
                raise NonFiniteLossError(state.step, f"{label} ({pname})", float("nan"))


def _save_working(state: TrainingState, run_config: Mapping[str, Any], path: Path, ctx: DistContext) -> None:
    """Rank 0 writes the one working checkpoint, with every rank's random states in it.

    Collective: every rank calls it at the same step. Every rank checks its (identical, under
    DDP) weights first, so a bad value stops all ranks together; rank 0 then tells the others
    whether the write succeeded, so a failed write fails every rank instead of leaving them
    waiting, and no rank runs ahead of a checkpoint that is not on disk yet.
    """
    # Never replace a good checkpoint with weights that already went bad.
    _check_params_finite(state)
    rank_rng = gather_objects(_rng_states(state), ctx)
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


def _check_ranks_agree(state: TrainingState, ctx: DistContext, path: Path | None) -> None:
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


# --------------------------------------------------------------------------- the loop

StepFn = Callable[[TrainingState, int], Mapping[str, "Tensor | float"]]


def run_training(
    state: TrainingState,
    step_fn: StepFn,
    *,
    workdir: Path | str | None = None,
    run_config: Mapping[str, Any] | None = None,
    progress_desc: str = "train",
    on_log: Callable[[TrainingState, dict[str, float]], None] | None = None,
    on_sample: Callable[[TrainingState, int], None] | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> TrainingState:
    """Run ``step_fn`` until ``state.config.steps`` steps are done; returns ``state``.

    step_fn(state, step): one training step (``step`` = steps completed so far); returns
        losses to log (floats or 0-d tensors), all of which must be finite.
    workdir: folder of the working checkpoint ``last.pt`` (None: no checkpoints, no resume).
    run_config: plain dict of everything that shapes the result (data, model, bridge and
        training settings). A working checkpoint is resumed only if its stored copy equals
        this one, keys in :data:`RESUME_NEUTRAL_KEYS` aside.
    on_log(state, record): after each history record. on_sample(state, step): every
        ``sample_every`` steps (models are put back in train mode after it).
    ctx: this process's place in a data-parallel run (default: one process). Every rank
        calls ``run_training`` with the same ``workdir``; only rank 0 writes ``last.pt`` (with
        all ranks' random states), every rank resumes from it. ``workdir`` must be on a file
        system every node sees.

    A NaN/inf loss or gradient raises :class:`NonFiniteLossError` naming the step and the
    quantity, leaving ``last.pt`` as it was (or, with ``skip_nonfinite``, skips that step's
    remaining work and counts it). Updates the step function made earlier in a skipped step
    stay applied.
    """
    config = state.config
    ctx = DistContext.single_process(state.device) if ctx is None else ctx
    run_config = dict(run_config or {})
    path = Path(workdir) / WORKING_CHECKPOINT if workdir is not None else None

    # Nobody reads before every rank got here (a writer of this group, e.g. an earlier run's
    # rank 0, is done; writes are atomic, so a file is never seen half written).
    barrier(ctx)
    if path is not None and config.resume and path.is_file():
        payload = load_checkpoint(path)
        differences = config_differences(
            {"run": payload.get("run_config", {}), "train": payload.get("train_config", {})},
            {"run": run_config, "train": config_to_dict(config)},
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
        logger.info("resumed from '%s' at step %d of %d", path, state.step, config.steps)
    else:
        seed_everything(state.seed)
        state.generator.manual_seed(state.seed)
        if state.device_generator is not state.generator:
            state.device_generator.manual_seed(state.seed + 1)
        state.step, state.skipped, state.history, state.log_window = 0, 0, [], {}
    _check_ranks_agree(state, ctx, path)

    if state.step >= config.steps:
        return state

    for model in state.models.values():
        model.train()
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(
        total=config.steps,
        initial=state.step,
        desc=progress_desc,
        disable=not progress,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    try:
        while state.step < config.steps:
            step = state.step
            set_learning_rates(state, step)
            state.step_metrics = {}
            try:
                with autocast_context(state.device, config.bf16):
                    returned = step_fn(state, step)
                values = {}
                for key, value in returned.items():
                    number = float(value.detach().float()) if isinstance(value, Tensor) else float(value)
                    if not math.isfinite(number):
                        raise NonFiniteLossError(step, f"'{key}'", number)
                    values[key] = number
            except NonFiniteLossError as err:
                note = (
                    f"the last good working checkpoint '{path}' is kept"
                    if path is not None and path.is_file()
                    else "no working checkpoint was written for this run yet"
                )
                if not config.skip_nonfinite:
                    raise NonFiniteLossError(err.step, err.name, err.value, note) from err
                state.skipped += 1
                if state.skipped > config.max_skipped:
                    raise NonFiniteLossError(
                        err.step,
                        err.name,
                        err.value,
                        f"{state.skipped} steps skipped (max_skipped {config.max_skipped}); {note}",
                    ) from err
                logger.warning("skipping step %d: %s (%d skipped so far)", step, err, state.skipped)
                values = {}
            values.update(state.step_metrics)
            state.step += 1
            window_steps += 1
            for key, number in values.items():
                state.log_window.setdefault(key, []).append(number)
            bar.update(1)
            if values:
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:3]}, refresh=False)

            if state.step % config.log_every == 0 or state.step == config.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": float(state.step)}
                record.update({key: sum(v) / len(v) for key, v in state.log_window.items()})
                for name, optimizer in state.optimizers.items():
                    record[f"lr/{name}"] = float(optimizer.param_groups[0]["lr"])
                record["skipped"] = float(state.skipped)
                record["sec_per_step"] = elapsed / max(window_steps, 1)
                state.history.append(record)
                logger.info(
                    "%s step %d/%d: %s",
                    progress_desc,
                    state.step,
                    config.steps,
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"),
                )
                if on_log is not None:
                    on_log(state, record)
                state.log_window, window_start, window_steps = {}, time.perf_counter(), 0

            if on_sample is not None and config.sample_every and state.step % config.sample_every == 0:
                on_sample(state, state.step)
                for model in state.models.values():
                    model.train()

            if (
                path is not None
                and config.checkpoint_every
                and state.step % config.checkpoint_every == 0
                and state.step < config.steps
            ):
                _save_working(state, run_config, path, ctx)
    finally:
        bar.close()

    if path is not None:
        _save_working(state, run_config, path, ctx)
    return state


def export_checkpoint(
    state: TrainingState, run_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The final artefact: ``{"config", "models", "ema", "step", "history", **extra}``.

    Plain dicts of contiguous CPU tensor copies (whatever memory format the models trained in)
    and plain values (``weights_only``-loadable); optimizer and RNG states are left out (they
    live in the working checkpoint).
    """

    def cpu(module: nn.Module) -> dict[str, Tensor]:
        return {
            k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()
        }

    payload: dict[str, Any] = {
        "config": dict(run_config),
        "models": {name: cpu(model) for name, model in state.models.items()},
        "ema": {name: cpu(ema.shadow) for name, ema in state.emas.items()},
        "step": state.step,
        "history": [dict(record) for record in state.history],
    }
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the checkpoint's own entries")
    payload.update(extra or {})
    return payload


def _without_neutral_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_neutral_keys(v) for k, v in value.items() if str(k) not in RESUME_NEUTRAL_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_neutral_keys(v) for v in value]
    return value


def run_folder_name(run_config: Mapping[str, Any], train_config: Mapping[str, Any]) -> str:
    """``run-<12 hex>``: one working-checkpoint folder per configuration that shapes the result.

    Settings that only watch the run (:data:`RESUME_NEUTRAL_KEYS`) do not change the name, so a
    changed configuration starts its own folder instead of failing to resume another's.
    """
    plain = _without_neutral_keys({"run": run_config, "train": train_config})
    text = json.dumps(plain, sort_keys=True, default=str)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:12]
