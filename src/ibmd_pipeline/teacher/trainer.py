"""Training a diffusion-bridge teacher with the bridge-matching loss (IBMD eq. (7); docs/method.md sec. 3).

    min_phi  E_{(x0, xT), t, x_t ~ q(x_t | x0, xT)}  lambda(t) || x0_hat_phi(x_t, t [, xT]) - x0 ||^2

with each schedule's own weighting ``lambda(t) = 1 / c_out(t)^2`` (``bridges.losses``); a
conditional (DDBM) network also sees ``xT``; for inpainting the error is taken over the hole.

:func:`train_teacher` runs in one process, in local DDP workers or under torchrun/srun
(``engine.launch.run_data_parallel`` decides); every process runs the same training function:
the configured batch is per rank, each rank reads its shard of every global batch, gradients are
averaged by DDP, logged losses are averaged over ranks, and only rank 0 validates, shows
progress and exports. With ``train.global_batch_size`` the global batch is fixed instead: each
rank feeds its shard in micro-batches of ``batch_size`` (gradient accumulation), and the times
and noise of a step are drawn for the whole global batch from the step's own generator
(:class:`GlobalDraws`), so every split of the batch over processes and micro-batches trains
the same step. The loop itself (AdamW, EMA, clipping, LR warm-up and schedule, NaN guard,
atomic resumable working checkpoints, one per run however many ranks) is
``engine.loop.run_training``.

Devices: the network trains in ``channels_last`` on CUDA (``engine.devices.place_module``) and
is compiled in place when ``train.compile.enabled`` (after placement and the EMA copy, before
DDP). An in-memory training set is copied to the device once, so steps gather their batches
on the device and make no host-to-device copies; a streamed one (``data.stream``, a manifest
bundle) is read batch by batch by ``data.stream.StepBatches``, whose workers decode and degrade
the images of the coming steps while the device trains.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.bridges.schedules import BridgeSchedule, make_schedule
from ibmd_pipeline.data.stream import StepBatches, StreamedPairs, is_streamed, loader_options, materialise
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, config_to_dict, parse_config
from ibmd_pipeline.engine.devices import autocast_context, compile_module, describe_device
from ibmd_pipeline.engine.distributed import (
    DistContext,
    all_reduce_mean,
    seed_for_rank,
    split_global_batch,
    wrap_ddp,
)
from ibmd_pipeline.engine.launch import launch_mode, run_data_parallel
from ibmd_pipeline.engine.loop import run_training
from ibmd_pipeline.engine.resume import config_differences, run_folder_name
from ibmd_pipeline.engine.training import (
    NonFiniteLossError,
    TrainingState,
    accumulated_update,
    create_training_state,
    epoch_batch_indices,
    export_checkpoint,
    plan_batches,
    seed_everything,
    step_generator,
)
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.networks.unet import UNet
from ibmd_pipeline.teacher.config import TeacherConfig
from ibmd_pipeline.teacher.model import (
    CheckpointMismatchError,
    ResolvedTeacher,
    check_checkpoint_matches,
    resolve_teacher,
)

__all__ = [
    "GlobalDraws",
    "PairTensors",
    "TeacherPlan",
    "FixedValidationBatch",
    "bundle_pairs",
    "check_teacher_checkpoint",
    "plan_teacher",
    "task_from_params",
    "train_teacher",
]

logger = logging.getLogger(__name__)

#: Offset of the validation batch's random stream from the training seed (times and noise).
_VALIDATION_STREAM = 7_919
History = list[dict[str, float]]


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class TeacherPlan:
    """A teacher run with every ``auto`` decided: the bridge, network and its schedule."""

    task: TaskConfig
    image_size: int
    channels: int
    resolved: ResolvedTeacher
    schedule: BridgeSchedule

    def checkpoint_config(self, config: TeacherConfig) -> dict[str, Any]:
        """The ``config`` entry of the teacher checkpoint (``teacher.model`` docstring format)."""
        return {
            "bridge": config_to_dict(self.resolved.bridge),
            "unet": config_to_dict(self.resolved.unet),
            "conditional": self.resolved.conditional,
            "task": config_to_dict(self.task),
            "image_size": self.image_size,
            "channels": self.channels,
            "teacher": config_to_dict(config),
        }


def task_from_params(task: Mapping[str, Any] | TaskConfig, key: str = "task") -> TaskConfig:
    """``params:task`` as a validated :class:`TaskConfig`."""
    return task if isinstance(task, TaskConfig) else parse_config(TaskConfig, task, key)


def plan_teacher(
    config: TeacherConfig, task: TaskConfig, *, image_size: int, channels: int, key: str = "teacher"
) -> TeacherPlan:
    """Resolve the teacher for ``task`` and check every setting that depends on it.

    Raises :class:`ConfigError` naming the key: e.g. an OT-ODE DDBM, a network that does not
    fit the image size, or a grid NFE the schedule cannot take (I2SB: at most n_timesteps - 1).
    """
    resolved = resolve_teacher(
        config.model, task_kind=task.kind, image_size=image_size, channels=channels, key=f"{key}.model"
    )
    schedule = make_schedule(resolved.bridge)
    for i, nfe in enumerate(config.sampler.grid_nfe):
        try:
            schedule.grid(nfe)
        except ValueError as err:
            raise ConfigError(f"{key}.sampler.grid_nfe[{i}]", str(err)) from None
    return TeacherPlan(
        task=task, image_size=image_size, channels=channels, resolved=resolved, schedule=schedule
    )


def check_teacher_checkpoint(checkpoint: Mapping[str, Any], plan: TeacherPlan) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` is the teacher ``plan`` describes.

    Checks the task, image size and channels (``check_checkpoint_matches``), then the bridge,
    network and conditioning that the current ``teacher.model`` parameters resolve to.
    """
    if checkpoint.get("kind") != "teacher":
        raise CheckpointMismatchError(f"expected a teacher checkpoint, got kind {checkpoint.get('kind')!r}")
    stored = checkpoint.get("config", {})
    check_checkpoint_matches(
        stored, what="teacher", task_kind=plan.task.kind, image_size=plan.image_size, channels=plan.channels
    )
    requested = {
        "bridge": config_to_dict(plan.resolved.bridge),
        "unet": config_to_dict(plan.resolved.unet),
        "conditional": plan.resolved.conditional,
    }
    differences = config_differences({k: stored.get(k) for k in requested}, requested)
    if differences:
        raise CheckpointMismatchError(
            "the teacher checkpoint was built with another bridge or network than the teacher.model "
            f"parameters ask for ({'; '.join(differences[:6])}{' ...' if len(differences) > 6 else ''}); "
            "retrain the teacher or restore the parameters it was trained with"
        )


@dataclass(frozen=True)
class PairTensors:
    """Clean/corrupted pairs (and the inpainting mask) of one split, in torch's default dtype.

    That is float32 unless the caller set another (the data-parallel parity tests train in
    float64, where the sum order of a reduction no longer shows).
    """

    clean: Tensor
    corrupted: Tensor
    mask: Tensor | None

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def to(self, device: torch.device) -> PairTensors:
        mask = None if self.mask is None else self.mask.to(device)
        return PairTensors(self.clean.to(device), self.corrupted.to(device), mask)

    def head(self, n: int) -> PairTensors:
        """The first ``n`` pairs."""
        mask = None if self.mask is None else self.mask[:n]
        return PairTensors(self.clean[:n], self.corrupted[:n], mask)

    def fingerprint(self) -> str:
        """A short content hash, so a working checkpoint is never resumed on other data."""
        digest = hashlib.sha256()
        for tensor in (self.clean, self.corrupted, self.mask):
            if tensor is not None:
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def _same_task(stored: Mapping[str, Any], task: TaskConfig) -> bool:
    if stored.get("kind") != task.kind:
        return False
    if task.kind == "jpeg":
        return stored.get("jpeg_quality") == task.jpeg_quality
    if task.kind == "sketch":
        return stored.get("sketch_sigma") == task.sketch_sigma
    return True


def _check_task(bundle: Mapping[str, Any], task: TaskConfig, name: str) -> None:
    stored = bundle.get("task")
    if isinstance(stored, Mapping) and not _same_task(stored, task):
        raise ConfigError(
            "task",
            f"the {name} pairs were degraded for task {dict(stored)}, but the parameters say "
            f"{config_to_dict(task)}; re-run the degrade pipeline with this task",
        )


def streamed_head(bundle: Mapping[str, Any], task: TaskConfig, name: str, n: int) -> PairTensors:
    """The first ``n`` pairs of a streamed bundle, read into memory (a validation batch)."""
    _check_task(bundle, task, name)
    dataset = StreamedPairs(bundle)
    batch = materialise(dataset, range(min(n, len(dataset))))
    return PairTensors(batch["clean"], batch["corrupted"], batch.get("mask"))


def bundle_pairs(bundle: Mapping[str, Any], task: TaskConfig, name: str) -> PairTensors:
    """The pairs of a degrade bundle, checked against ``task``.

    The bundle must hold ``clean`` and ``corrupted`` images of one shape (and ``mask`` for
    inpainting), degraded for the same task as the parameters say.
    """
    if is_streamed(bundle):
        raise ValueError(f"the {name} bundle is streamed: read it with data.stream.StreamedPairs")
    missing = [k for k in ("clean", "corrupted") if k not in bundle]
    if task.has_mask and "mask" not in bundle:
        missing.append("mask")
    if missing:
        raise ValueError(f"the {name} bundle lacks {missing}; it must come from the degrade pipeline")
    _check_task(bundle, task, name)
    dtype = torch.get_default_dtype()
    clean = torch.as_tensor(bundle["clean"]).to(dtype)
    corrupted = torch.as_tensor(bundle["corrupted"]).to(dtype)
    if clean.ndim != 4 or clean.shape != corrupted.shape or clean.shape[0] == 0:
        raise ValueError(
            f"the {name} bundle needs clean and corrupted images of one shape (N, C, H, W), N >= 1; "
            f"got {tuple(clean.shape)} and {tuple(corrupted.shape)}"
        )
    if clean.shape[-1] != clean.shape[-2]:
        raise ValueError(f"the {name} images must be square, got {tuple(clean.shape[-2:])}")
    mask = None
    if task.has_mask:
        mask = torch.as_tensor(bundle["mask"]).to(dtype)
        if mask.shape != (clean.shape[0], 1, *clean.shape[2:]):
            raise ValueError(f"the {name} mask has shape {tuple(mask.shape)}, expected (N, 1, H, W)")
    return PairTensors(clean.contiguous(), corrupted.contiguous(), mask)


# --------------------------------------------------------------------------- validation


class FixedValidationBatch:
    """The validation loss on one fixed batch: fixed images, times and noise.

    With everything random drawn once, the value moves only with the weights, so a curve of
    it is smooth even for a small batch. Evaluated in chunks of ``chunk`` images, in float32.
    """

    def __init__(
        self, pairs: PairTensors, schedule: BridgeSchedule, *, seed: int, device: torch.device, chunk: int
    ):
        generator = torch.Generator().manual_seed(seed + _VALIDATION_STREAM)
        self.pairs = pairs.to(device)
        self.schedule = schedule
        self.chunk = max(1, chunk)
        self.t = schedule.sample_time(len(pairs), generator=generator).to(device)
        self.noise = (
            None
            if schedule.deterministic
            else torch.randn(pairs.clean.shape, generator=generator).to(device)
        )

    @torch.no_grad()
    def loss(self, predictor: X0Predictor) -> float:
        """Mean bridge-matching loss of ``predictor`` on the batch."""
        losses = []
        for start in range(0, len(self.pairs), self.chunk):
            part = slice(start, start + self.chunk)
            losses.append(
                bridge_matching_loss(
                    predictor,
                    self.pairs.clean[part],
                    self.pairs.corrupted[part],
                    self.schedule,
                    t=self.t[part],
                    noise=None if self.noise is None else self.noise[part],
                    mask=None if self.pairs.mask is None else self.pairs.mask[part],
                    reduction="none",
                )
            )
        return float(torch.cat(losses).float().mean())


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class GlobalDraws:
    """The random inputs of one step with ``train.global_batch_size``: hole fill (inpainting),
    times and noise (None for OT-ODE), this rank's rows of draws made for the whole global batch
    from the step's own generator (``engine.training.step_generator``), so that every split of
    the global batch over processes and micro-batches trains on the same draws."""

    fill: Tensor | None
    t: Tensor
    noise: Tensor | None


def _working_dir(workdir: str | None, run_folder: str) -> Path | None:
    """``workdir/<run folder>``, the folder of the run's one working checkpoint ``last.pt``.

    Every rank gets the same folder: rank 0 writes ``last.pt`` with all ranks' random states,
    and every rank resumes from it (``engine.loop.run_training``). One folder per
    configuration (:func:`run_folder_name`): changing a setting starts afresh instead of
    failing to resume a run of other settings.
    """
    return None if workdir is None else Path(workdir) / run_folder


def train_teacher(
    config: TeacherConfig,
    train_bundle: Mapping[str, Any],
    val_bundle: Mapping[str, Any],
    *,
    task: Mapping[str, Any] | TaskConfig,
    device: torch.device | str = "auto",
    progress: bool = True,
) -> tuple[dict[str, Any], History]:
    """Train a bridge teacher on ``train_bundle``; returns ``(checkpoint, history)``.

    config: the run (``TeacherConfig``). train_bundle / val_bundle: degrade bundles
        (``clean``, ``corrupted``, ``mask`` for inpainting). task: ``params:task``.
    device: ``engine.device`` (``auto``/``cpu``/``cuda[:N]``) or a device.
    progress: show a tqdm bar (rank 0 only) with the loss and it/s.

    Runs in this process, in ``config.distributed.nproc_per_node`` local DDP workers (rank 0's
    checkpoint comes back), or as this process's rank of a torchrun/srun job, as
    :func:`~ibmd_pipeline.engine.launch.run_data_parallel` decides.

    The checkpoint follows ``teacher.model``: ``{"kind": "teacher", "config", "models":
    {"model"}, "ema": {"model"}, "step", "history"}`` with CPU tensors. ``history`` holds one
    record per ``train.log_every`` steps (window means of ``loss``, the gradient norm, the
    learning rate, ``sec_per_step``) plus ``val_loss`` (the EMA model on the fixed validation
    batch) where validated; only rank 0's records carry ``val_loss``.

    With ``workdir`` set, a working checkpoint is written every ``train.checkpoint_every``
    steps and at the end (by rank 0 only, one file for all ranks), and an interrupted run
    re-started with the same settings, data and number of processes continues from it, bit for
    bit on the CPU. With ``train.global_batch_size`` it also continues on another number of
    processes that divides the global batch, equal up to float rounding (``engine.resume``).
    """
    if launch_mode(config.distributed) == "local_workers":
        # Every worker would stop at once on this; refuse before spawning them.
        plan_batches(config.train, config.distributed.nproc_per_node, key="teacher.train")
    return run_data_parallel(
        _train_teacher_rank, config, train_bundle, val_bundle, task, progress,
        device=device, key="teacher.distributed",
    )


def _train_teacher_rank(
    ctx: DistContext,
    config: TeacherConfig,
    train_bundle: Mapping[str, Any],
    val_bundle: Mapping[str, Any],
    task: Mapping[str, Any] | TaskConfig,
    progress: bool,
) -> tuple[dict[str, Any], History]:
    """This process's part of :func:`train_teacher`, at its place ``ctx`` in the job."""
    # Before any work: the global batch must split over this many processes.
    batches = plan_batches(config.train, ctx.world_size, key="teacher.train")
    device = ctx.device
    task_config = task_from_params(task)
    if is_streamed(train_bundle):
        _check_task(train_bundle, task_config, "training")
        train_pairs: PairTensors | StreamedPairs = StreamedPairs(train_bundle)
        val_pairs = streamed_head(val_bundle, task_config, "validation", config.validation.batch_size)
        shape = (train_pairs.manifest.channels, *(2 * (train_pairs.manifest.image_size,)))
        fingerprint = train_pairs.fingerprint()
    else:
        train_pairs = bundle_pairs(train_bundle, task_config, "training")
        val_pairs = bundle_pairs(val_bundle, task_config, "validation")
        shape, fingerprint = tuple(train_pairs.clean.shape[1:]), train_pairs.fingerprint()
    if shape != tuple(val_pairs.clean.shape[1:]):
        raise ValueError(
            f"training images {shape} and validation images {tuple(val_pairs.clean.shape[1:])} "
            "differ in shape"
        )
    channels, image_size = int(shape[0]), int(shape[-1])
    plan = plan_teacher(config, task_config, image_size=image_size, channels=channels)
    schedule, resolved = plan.schedule, plan.resolved
    use_bf16 = config.autocast_bf16(device)

    if ctx.is_main:
        logger.info(
            "teacher for %s: %s bridge, %s network, %d training pairs, %s%s, global batch %d = "
            "%d process(es) x %d micro-batch(es) of %d",
            task_config.kind,
            resolved.bridge.kind + (" OT-ODE" if resolved.bridge.ot_ode else ""),
            "conditional" if resolved.conditional else "unconditional",
            len(train_pairs),
            describe_device(device),
            ", bf16 autocast" if use_bf16 else "",
            batches.global_batch,
            ctx.world_size,
            batches.accumulation,
            batches.micro_batch,
        )
    # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
    seed_everything(config.train.seed)
    net = UNet(resolved.unet)
    # Each rank draws its own times and noise; the data order uses the shared seed.
    # The run's config stays shared (it is what a resume compares); only the streams differ.
    state = create_training_state(
        {"model": net}, config.train, device=device, stream_seed=seed_for_rank(config.train.seed, ctx)
    )
    # Compiled in place after placement and the EMA copy, then wrapped: DDP around the compiled
    # module, as PyTorch recommends; checkpoints keep the plain module's state_dict keys.
    compile_module(state.models["model"], config.train.compile)
    train_predictor = X0Predictor(wrap_ddp(state.models["model"], ctx), schedule, resolved.conditional)
    ema_predictor = X0Predictor(state.emas["model"].shadow, schedule, resolved.conditional)

    def batch_indices(step: int) -> Tensor:
        indices = epoch_batch_indices(len(train_pairs), batches.global_batch, step, config.train.seed)
        return split_global_batch(indices, ctx)

    # Batches are gathered into these buffers (this rank's rows of the global batch, all of its
    # micro-batches): no per-step allocation of the inputs.
    x0 = torch.empty((batches.per_rank, *shape), device=device)
    xT = torch.empty_like(x0)
    mask = torch.empty((x0.shape[0], 1, *shape[1:]), device=device) if task_config.has_mask else None
    if isinstance(train_pairs, StreamedPairs):
        reader = StepBatches(
            train_pairs,
            lambda step: [batch_indices(step)],
            config.train.steps,
            **loader_options(train_pairs, device),
        )

        def fill_batch(step: int) -> None:
            batch = reader.get(step)
            for buffer, key in ((x0, "clean"), (xT, "corrupted"), (mask, "mask")):
                if buffer is not None:
                    buffer.copy_(batch[key], non_blocking=True)
    else:
        data = train_pairs.to(device)

        def fill_batch(step: int) -> None:
            indices = batch_indices(step).to(device)
            torch.index_select(data.clean, 0, indices, out=x0)
            torch.index_select(data.corrupted, 0, indices, out=xT)
            if mask is not None:
                torch.index_select(data.mask, 0, indices, out=mask)

    def global_draws(step: int) -> GlobalDraws:
        """This rank's rows of the hole fill, times and noise drawn for the whole global batch."""
        generator = step_generator(config.train.seed, step, device)

        def normal() -> Tensor:
            size = (batches.global_batch, *shape)
            return torch.randn(size, generator=generator, device=device, dtype=xT.dtype)

        fill = None if mask is None else normal()
        t = schedule.sample_time(batches.global_batch, generator=generator, device=device)
        noise = None if schedule.deterministic else normal()
        return GlobalDraws(
            fill=None if fill is None else split_global_batch(fill, ctx),
            t=split_global_batch(t, ctx),
            noise=None if noise is None else split_global_batch(noise, ctx),
        )

    logged: list[float] = []  # the rank-averaged loss of each micro-batch of the step

    def micro_loss(step: int, rows: slice, draws: GlobalDraws | None) -> Tensor:
        part_mask = None if mask is None else mask[rows]
        # CUDA autocast comes from run_training; on the CPU it is opt-in (config.cpu_bf16).
        with autocast_context(device, use_bf16, allow_cpu=True):
            if draws is None:
                loss = bridge_matching_loss(
                    train_predictor, x0[rows], xT[rows], schedule, mask=part_mask,
                    generator=state.device_generator,
                )
            else:
                loss = bridge_matching_loss(
                    train_predictor, x0[rows], xT[rows], schedule, mask=part_mask,
                    t=draws.t[rows], noise=None if draws.noise is None else draws.noise[rows],
                )
        # Decide on the rank-averaged value so that every rank stops (or skips) together.
        mean_loss = all_reduce_mean(loss, ctx)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(step, "loss", mean_loss)
        logged.append(mean_loss)
        return loss

    def step_fn(state: TrainingState, step: int) -> dict[str, float]:
        fill_batch(step)
        # Without global_batch_size each rank draws from its own stream, as it always has; with
        # it the draws belong to the global batch, so any split of it sees the same ones.
        draws = None if config.train.global_batch_size is None else global_draws(step)
        if mask is not None:
            # The hole is refilled with fresh N(0, 1) noise every batch, as I2SB's training
            # corrupts every batch anew and as the distillation draws its xT: the degrade-time
            # fill is one draw, and a teacher trained on it alone would see another xT
            # distribution than its student (docs/method.md sec. 7.6).
            fill = (
                torch.randn(xT.shape, generator=state.device_generator, device=device, dtype=xT.dtype)
                if draws is None
                else draws.fill
            )
            xT.copy_(torch.where(mask > 0, fill, xT))
        logged.clear()
        accumulated_update(
            state,
            "model",
            [functools.partial(micro_loss, step, rows, draws) for rows in batches.micro_batches()],
            module=train_predictor.net,
        )
        return {"loss": sum(logged) / len(logged)}

    validation = (
        FixedValidationBatch(
            val_pairs.head(config.validation.batch_size),
            schedule,
            seed=config.train.seed,
            device=device,
            chunk=config.train.batch_size,
        )
        if ctx.is_main
        else None
    )

    def on_log(state: TrainingState, record: dict[str, float]) -> None:
        every = config.validation.every
        due = state.step == config.train.steps or (every > 0 and state.step % every == 0)
        if validation is not None and due:
            # ``record`` is the history entry just appended: the value travels with it.
            record["val_loss"] = validation.loss(ema_predictor)

    run_config = {
        "kind": "teacher",
        **{k: v for k, v in plan.checkpoint_config(config).items() if k != "teacher"},
        "data": {"train_pairs": len(train_pairs), "fingerprint": fingerprint},
        # Not the process count: a changed one finds this run's checkpoint and resumes it (with
        # train.global_batch_size) or says why it cannot (engine.resume).
        "autocast_bf16": use_bf16,
    }
    run_training(
        state,
        step_fn,
        workdir=_working_dir(config.workdir, run_folder_name(run_config, config_to_dict(config.train))),
        run_config=run_config,
        progress_desc=f"teacher ({task_config.kind})",
        on_log=on_log,
        progress=progress and ctx.is_main,
        ctx=ctx,
    )
    checkpoint = export_checkpoint(
        state, plan.checkpoint_config(config), extra={"kind": "teacher", "autocast_bf16": use_bf16}
    )
    return checkpoint, checkpoint["history"]
