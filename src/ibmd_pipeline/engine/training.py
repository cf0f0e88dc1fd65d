"""Training state and updates shared by the teacher and the IBMD trainers.

The engine's training loop (:func:`~ibmd_pipeline.engine.loop.run_training`) knows nothing about
bridges or losses. A trainer supplies

- a :class:`TrainingState` (from :func:`create_training_state`): the trained modules by name,
  one AdamW per module, EMAs for the modules that want one, the step counter, the logged
  history and the random generators whose states travel in every working checkpoint;
- ``step_fn(state, step) -> {name: loss}``: one training step, which does its own forward
  passes and calls :func:`optimizer_step` once per update (the IBMD trainer calls it L times
  for the auxiliary model and once for the generator within one step).

The learning rate is a pure function of the loop step (:func:`lr_factor`), not of how many
times an optimizer stepped, so optimizers that update several times per step (IBMD's
auxiliary model) follow the same schedule and nothing about it needs checkpointing. Batches are
a pure function of the step too (:func:`epoch_batch_indices`). The final artefact of a run is
:func:`export_checkpoint`; the working checkpoint for resuming is ``engine.resume``'s.

Gradient accumulation (``train.global_batch_size``): :func:`plan_batches` splits each step's
global batch into ``world size x accumulation`` micro-batches of ``batch_size`` images; a
trainer back-propagates each micro-batch's loss with :func:`accumulate_gradients` (weight
``1 / accumulation``: the rank's loss is the mean of its micro-batch means) and then applies
one update with :func:`apply_update`. :func:`optimizer_step` is the two in one, for one batch.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ibmd_pipeline.engine.config import ConfigError, require
from ibmd_pipeline.engine.devices import CompileConfig, place_module
from ibmd_pipeline.engine.distributed import gradient_sync
from ibmd_pipeline.engine.ema import EMA

__all__ = [
    "BatchPlan",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingState",
    "accumulate_gradients",
    "accumulated_update",
    "apply_update",
    "check_finite_parameters",
    "create_training_state",
    "epoch_batch_indices",
    "export_checkpoint",
    "lr_factor",
    "optimizer_step",
    "plan_batches",
    "seed_everything",
    "set_learning_rates",
    "step_generator",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the teacher and the distillation trainers.

    steps: training steps (calls of the step function).
    batch_size: images per batch and process (read by the step function; the loop itself does
        not batch). With ``global_batch_size`` set it is the micro-batch: the images of one
        forward pass.
    global_batch_size: images per optimizer step over all processes; null = ``batch_size x
        world size`` (no accumulation). When set, a multiple of ``batch_size``: each step
        accumulates ``global_batch_size / (batch_size x world size)`` micro-batches per process
        (:func:`plan_batches`), so the step sees the same images and the same noise on any
        number of processes that divides it, and a working checkpoint resumes on another number
        of processes. A trainer that honours it draws its batches and noise for the global batch
        (from generators every rank holds alike, or seeded by the step) and splits them.
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
    global_batch_size: int | None = None
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
        if self.global_batch_size is not None:
            require(
                self.global_batch_size >= 1 and self.global_batch_size % self.batch_size == 0,
                f"{prefix}global_batch_size",
                f"must be null or a positive multiple of batch_size={self.batch_size} "
                f"(batch_size x processes x accumulation steps), got {self.global_batch_size}",
            )
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


def _check_loss(state: TrainingState, name: str, loss: Tensor) -> None:
    if not _is_finite(loss.detach()):
        raise NonFiniteLossError(state.step, f"loss of '{name}'", float(loss.detach().float().mean()))


def _backward(state: TrainingState, loss: Tensor, params: list[Tensor]) -> None:
    with torch.autocast(state.device.type, enabled=False):
        loss.backward(inputs=params)


def _trained_parameters(state: TrainingState, name: str, parameters: Sequence[Tensor] | None) -> list[Tensor]:
    optimizer = state.optimizers[name]
    if parameters is not None:
        return list(parameters)
    return [p for group in optimizer.param_groups for p in group["params"]]


def accumulate_gradients(
    state: TrainingState,
    name: str,
    loss: Tensor,
    *,
    weight: float = 1.0,
    parameters: Sequence[Tensor] | None = None,
) -> None:
    """Add the gradient of ``weight * loss`` to the ``.grad`` of optimizer ``name``'s parameters.

    One micro-batch of an accumulated update: with micro-batch losses that are means over equal
    micro-batches, ``weight = 1 / micro-batches`` makes the sum the gradient of the whole batch's
    mean. Checks the loss is finite first (:class:`NonFiniteLossError`, nothing added) and
    back-propagates into ``parameters`` only (default: the optimizer's own), outside autocast.
    Under DDP, wrap every micro-batch but the last, forward included, in
    :func:`~ibmd_pipeline.engine.distributed.gradient_sync` ``(module, False)``, so that only the
    last backward averages over ranks. :func:`apply_update` then takes the update;
    :func:`accumulated_update` does all of it.
    """
    _check_loss(state, name, loss)
    _backward(state, loss if weight == 1.0 else loss * weight, _trained_parameters(state, name, parameters))


def apply_update(state: TrainingState, name: str, parameters: Sequence[Tensor] | None = None) -> float:
    """One update of optimizer ``name`` from the gradients accumulated since the last one.

    Checks the gradient norm is finite, clips it to ``grad_clip``, steps, clears the gradients
    and updates the model's EMA if it has one; returns the norm before clipping. Raises
    :class:`NonFiniteLossError` (gradients cleared, the update not applied).
    """
    config = state.config
    optimizer = state.optimizers[name]
    params = _trained_parameters(state, name, parameters)
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


def optimizer_step(
    state: TrainingState, name: str, loss: Tensor, parameters: Sequence[Tensor] | None = None
) -> float:
    """One update of optimizer ``name`` from ``loss``; returns the gradient norm before clipping.

    Checks the loss is finite before touching anything, back-propagates into ``parameters``
    only (default: the optimizer's own; gradients of other networks the loss went through,
    such as IBMD's teacher and auxiliary model, are not accumulated), checks the gradient
    norm is finite, clips it to ``grad_clip``, steps, and updates the model's EMA if it has
    one. The backward pass runs outside autocast. bfloat16 needs no gradient scaling.
    Raises :class:`NonFiniteLossError` (the update is not applied). It is
    :func:`accumulate_gradients` on cleared gradients followed by :func:`apply_update`.
    """
    _check_loss(state, name, loss)
    params = _trained_parameters(state, name, parameters)
    state.optimizers[name].zero_grad(set_to_none=True)
    _backward(state, loss, params)
    return apply_update(state, name, params)


def accumulated_update(
    state: TrainingState,
    name: str,
    micro_losses: Sequence[Callable[[], Tensor]],
    *,
    module: nn.Module | None = None,
) -> tuple[float, list[Tensor]]:
    """One update of optimizer ``name`` from the micro-batch losses ``micro_losses`` computes.

    Each entry runs the forward pass of one micro-batch and returns its loss, a mean over the
    micro-batch (micro-batches of equal size). The gradients start cleared, each loss is
    back-propagated with weight ``1 / len(micro_losses)`` as soon as it is computed (so only
    one micro-batch's activations are alive at a time), then one :func:`apply_update` follows:
    the update of the mean loss over the whole batch. ``module``: the DDP wrapper of the trained
    network; its gradients are averaged over ranks in the last micro-batch's backward only
    (``no_sync`` for the others). With one entry it is :func:`optimizer_step`, to the bit.
    Returns the gradient norm before clipping and the detached micro-batch losses.
    """
    weight = 1.0 / len(micro_losses)
    state.optimizers[name].zero_grad(set_to_none=True)
    losses = []
    for i, compute in enumerate(micro_losses):
        with gradient_sync(module, i == len(micro_losses) - 1):
            loss = compute()
            accumulate_gradients(state, name, loss, weight=weight)
        losses.append(loss.detach())
    return apply_update(state, name), losses


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


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over processes and micro-batches.

    Rank ``r`` takes rows ``[r * per_rank, (r + 1) * per_rank)`` of the global batch (the order of
    :func:`epoch_batch_indices` and of global noise draws) and feeds them in ``accumulation``
    micro-batches of ``micro_batch`` rows (:meth:`micro_batches`).
    """

    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def per_rank(self) -> int:
        """Rows of the global batch one process handles per step."""
        return self.micro_batch * self.accumulation

    def micro_batches(self) -> list[slice]:
        """The rows of each micro-batch within this rank's part, in order."""
        return [slice(i * self.micro_batch, (i + 1) * self.micro_batch) for i in range(self.accumulation)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(config: TrainConfig, world_size: int, key: str = "train") -> BatchPlan:
    """The :class:`BatchPlan` of ``config`` on ``world_size`` processes.

    Without ``global_batch_size`` the global batch is ``batch_size x world_size``, one micro-batch
    per process (no accumulation). With it, each process accumulates
    ``global_batch_size / (batch_size x world_size)`` micro-batches; when that is not a whole
    number the global batch cannot be kept, and a :class:`ConfigError` names
    ``<key>.global_batch_size`` with the process counts and batch sizes that would keep it.
    """
    size = config.batch_size
    if config.global_batch_size is None:
        return BatchPlan(size * world_size, size, 1, world_size)
    total = config.global_batch_size
    accumulation, rest = divmod(total, size * world_size)
    if rest == 0:
        return BatchPlan(total, size, accumulation, world_size)
    counts = ", ".join(str(d) for d in _divisors(total // size))
    if total % world_size == 0:
        sizes = ", ".join(str(d) for d in _divisors(total // world_size))
        other_sizes = f"or keep {world_size} processes and set {key}.batch_size to one of {sizes}"
    else:
        other_sizes = f"no {key}.batch_size splits it over {world_size} processes"
    raise ConfigError(
        f"{key}.global_batch_size",
        f"a global batch of {total} images cannot be kept on {world_size} process(es) with "
        f"{key}.batch_size {size}: each process must accumulate global_batch_size / (batch_size x "
        f"processes) = {total / (size * world_size):g} micro-batches, a whole number. Run on a process "
        f"count that divides {total // size} ({counts}), {other_sizes} (the micro-batch size does "
        "not change the result beyond float rounding, and a working checkpoint resumes with it), "
        f"or change {key}.global_batch_size, which starts another run",
    )


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for the draws of loop step ``step``, the same on every rank.

    Its seed mixes ``seed`` and ``step`` (NumPy's ``SeedSequence``), so draws made from it are a
    function of the step alone: no state to checkpoint, the same whatever the world size.
    """
    mixed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed) % 2**63)


def check_finite_parameters(state: TrainingState) -> None:
    """Raise :class:`NonFiniteLossError` naming the first parameter (or EMA parameter) that is NaN/inf."""
    modules = [(f"parameters of '{n}'", m) for n, m in state.models.items()]
    modules += [(f"EMA parameters of '{n}'", e.shadow) for n, e in state.emas.items()]
    for label, module in modules:
        for pname, param in module.named_parameters():
            if not _is_finite(param.detach()):
                raise NonFiniteLossError(state.step, f"{label} ({pname})", float("nan"))


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
