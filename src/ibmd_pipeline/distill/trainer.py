"""The IBMD training loop: L auxiliary updates per generator update (IBMD Alg. 1; docs/method.md sec. 4.3).

Networks: the frozen teacher ``D*``, the auxiliary ("fake") bridge model ``D_phi`` and the
generator ``G_theta`` (:class:`~ibmd_pipeline.distill.generator.BridgeGenerator`), both
initialised from the teacher's weights (its EMA weights by default). One step of
:func:`~ibmd_pipeline.engine.loop.run_training` is one generator update::

    repeat L times:                                     # auxiliary step, step phi only
        xT ~ corrupted data, z ~ N(0, I);  x0 = G_theta(xT, z) without autograd
        loss_phi = lambda(t) || D_phi(x_t, t [,xT]) - x0 ||^2          (ibmd_auxiliary_loss)
    xT, z fresh;  x0 = G_theta(xT, z) with its graph
    loss_theta = lambda(t) (||D*(x_t) - x0||^2 - ||D_phi(x_t) - x0||^2)  (ibmd_generator_loss)

with ``t`` from the teacher's training distribution and ``x_t = a_t xT + b_t x0 + c_t eps``.
Each update has its own AdamW (``lr_generator``, ``lr_aux``), gradient clipping, and the
generator keeps an EMA. Only corrupted images enter: :func:`distill_student` takes the
corrupted tensor and an optional mask, nothing else. For inpainting, the hole of every
training xT is refilled with fresh N(0, I) noise (xT ~ p(xT) includes that noise, as I2SB's
corruption draws it anew each time), and the losses count the hole only.

Randomness: every draw of a step (batch indices, hole noise, z, the posterior-step noise of
multi-step chains, t, eps, the rollout depth) comes from the training state's generators and
is drawn for the *global* batch, of which each rank takes its slice. A run is therefore a
function of the seed and the global batch only, and resuming from the working checkpoint
(which saves those generators) continues it exactly.

Gradient accumulation (``train.global_batch_size``): each update, the L auxiliary ones and the
generator's, is drawn for its global batch as above and each rank feeds its slice in
``global_batch_size / (batch_size x world size)`` micro-batches, back-propagating each with
weight ``1 / micro-batches`` and stepping once (``engine.training.accumulated_update``). The
auxiliary batch keeps its ratio to the generator's: ``aux_batch_size`` images per micro-batch,
the same number of micro-batches. So 2 processes and 1 process accumulating 2 micro-batches
train on the same images and the same noise, equal up to float rounding, and a working
checkpoint resumes on either.

Distributed (``distill.distributed.nproc_per_node > 1`` or a torchrun/srun launch): the
generator and the auxiliary model are each wrapped in DDP and called through the wrapper
only in the forward pass whose backward updates them; the teacher, and the auxiliary model
inside the generator loss, are called as plain modules (``engine.distributed`` rules). Rank 0
alone writes the run's one working checkpoint; every rank resumes from it.

Devices: the three UNets run in ``channels_last`` on CUDA (``engine.devices.place_module``);
with ``train.compile.enabled`` the teacher, generator and auxiliary networks are compiled in
place once every copy of them exists, before the DDP wrappers are built. The corrupted
training images stay in host memory, pinned on CUDA, and each batch is gathered into pinned
memory and copied asynchronously (``engine.devices.gather_to_device``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

from ibmd_pipeline.data.stream import StepBatches, StreamedPairs, loader_options, materialise
from ibmd_pipeline.distill.config import DistillConfig, ResolvedDistill, resolve_distill
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.distill.ibmd import ibmd_auxiliary_loss, ibmd_generator_loss
from ibmd_pipeline.distill.validation import DistillValidator
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.engine.devices import (
    autocast_context,
    compile_module,
    describe_device,
    gather_to_device,
    place_module,
    stage_on_host,
)
from ibmd_pipeline.engine.distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    split_global_batch,
    wrap_ddp,
)
from ibmd_pipeline.engine.launch import launch_mode, run_data_parallel
from ibmd_pipeline.engine.loop import run_training
from ibmd_pipeline.engine.resume import WORKING_CHECKPOINT, run_folder_name
from ibmd_pipeline.engine.training import (
    BatchPlan,
    NonFiniteLossError,
    TrainingState,
    accumulated_update,
    create_training_state,
    epoch_batch_indices,
    export_checkpoint,
    plan_batches,
    set_learning_rates,
)
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.teacher.model import LoadedTeacher, teacher_from_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "DistillRun",
    "SnapshotFn",
    "build_distill_run",
    "distill_student",
    "fresh_ibmd_update",
    "split_held_out",
]

MASK_TASKS = ("inpaint_center",)
#: ``on_snapshot(updates, student_checkpoint)``: called after generator update ``updates``.
SnapshotFn = Callable[[int, dict[str, Any]], None]


def split_held_out(
    corrupted: Tensor | StreamedPairs, mask: Tensor | None, held_out: int
) -> tuple[Tensor | Subset, Tensor | None, Tensor, Tensor | None]:
    """``(train_xT, train_mask, val_xT, val_mask)``: the last ``held_out`` images are held out.

    The distill pipeline's validation and preview grid use the held-out part; training never
    sees it. For streamed images (a :class:`StreamedPairs` without targets) the training part
    is the dataset's first images (a ``Subset``, its masks come with its items) and only the
    held-out images are read into memory.
    """
    count = len(corrupted)
    if count <= held_out:
        raise ValueError(
            f"corrupted_train has {count} images; holding out distill.validation.batch_size = {held_out} "
            "for validation leaves none to train on (lower distill.validation.batch_size)"
        )
    cut = count - held_out
    if isinstance(corrupted, StreamedPairs):
        val = materialise(corrupted, range(cut, count))
        return Subset(corrupted, range(cut)), None, val["corrupted"], val.get("mask")
    train_mask = None if mask is None else mask[:cut]
    val_mask = None if mask is None else mask[cut:]
    return corrupted[:cut], train_mask, corrupted[cut:], val_mask


def _fingerprint(tensors: Sequence[Tensor]) -> str:
    """sha256 of the tensors' bytes (with their shapes): identifies data and teacher weights."""
    digest = hashlib.sha256()
    for tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(repr((tuple(cpu.shape), str(cpu.dtype))).encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy() if cpu.numel() else b"")
    return digest.hexdigest()


@dataclass
class _Draw:
    """Everything random about one update's batch (this rank's slice of the global draw)."""

    xT: Tensor
    mask: Tensor | None
    z: Tensor | None
    step_noise: list[Tensor] | None
    rollout_to: int | None
    t: Tensor
    eps: Tensor | None

    def rows(self, part: slice) -> _Draw:
        """The draw of one micro-batch: rows ``part`` of every per-image tensor."""

        def cut(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[part]

        step_noise = None if self.step_noise is None else [noise[part] for noise in self.step_noise]
        return _Draw(
            self.xT[part], cut(self.mask), cut(self.z), step_noise, self.rollout_to, self.t[part],
            cut(self.eps),
        )


@dataclass
class DistillRun:
    """A distillation ready to run: networks, training state and the step function's parts.

    Built by :func:`build_distill_run`; :meth:`step` is the ``step_fn`` of ``run_training``
    (:meth:`aux_update` L times, then :meth:`generator_update`), :meth:`on_sample` its
    validation callback. ``generator`` and ``aux`` wrap the trained UNets held in
    ``state.models`` (``"generator"``, ``"aux"``); ``ema_generator`` wraps the EMA shadow.
    """

    ctx: DistContext
    teacher: LoadedTeacher
    generator: BridgeGenerator
    aux: X0Predictor
    ema_generator: BridgeGenerator
    state: TrainingState
    resolved: ResolvedDistill
    config: DistillConfig
    train_xT: Tensor | Subset  # host memory, float32 (pinned on CUDA), or streamed images
    train_mask: Tensor | None
    val_xT: Tensor
    val_mask: Tensor | None
    student_config: dict[str, Any]
    run_config: dict[str, Any]
    batches: BatchPlan  # how a generator update's global batch splits (engine.training.plan_batches)
    validator: DistillValidator | None = None
    reader: StepBatches | None = None  # set when train_xT is streamed

    def __post_init__(self) -> None:
        self.use_bf16 = self.config.autocast_bf16(self.ctx.device)
        # DDP wrappers, used only in the forward whose backward updates the wrapped network.
        self.generator_for_update = wrap_ddp(self.generator, self.ctx)
        self.aux_for_update = wrap_ddp(self.aux, self.ctx)

    @property
    def aux_batches(self) -> BatchPlan:
        """How an auxiliary update's global batch splits: ``aux_batch_size`` per micro-batch, as
        many micro-batches as the generator update."""
        return aux_batch_plan(self.batches, self.resolved.aux_batch_size)

    @property
    def checkpoint_extra(self) -> dict[str, Any]:
        """What the student checkpoint records beside the engine's entries."""
        return {"kind": "student", "autocast_bf16": self.use_bf16}

    # ----------------------------------------------------------------------------- draws

    def _normal(self, shape: tuple[int, ...], global_batch: int) -> Tensor:
        gen = self.state.device_generator
        noise = torch.randn((global_batch, *shape[1:]), generator=gen, device=gen.device)
        return split_global_batch(noise, self.ctx).to(self.ctx.device)

    def draw(self, stream: int, index: int, batches: BatchPlan) -> _Draw:
        """This rank's part of global batch ``index`` of data stream ``stream`` with fresh noise.

        ``stream`` 0 feeds the auxiliary updates (``L`` batches per step), 1 the generator's.
        Indices come from :func:`epoch_batch_indices`, a pure function of the index.
        """
        global_batch = batches.global_batch
        device = self.ctx.device
        if self.reader is not None:
            aux_steps = self.resolved.aux_steps
            step, position = divmod(index, aux_steps) if stream == 0 else (index, aux_steps)
            read = self.reader.get(step, position)
            xT = read["corrupted"].to(device, non_blocking=True)
            mask = read["mask"].to(device, non_blocking=True) if "mask" in read else None
        else:
            assert isinstance(self.train_xT, Tensor)
            indices = _rank_indices(self.ctx, len(self.train_xT), stream, index, batches, self.resolved)
            xT = gather_to_device(self.train_xT, indices, device)
            mask = None if self.train_mask is None else gather_to_device(self.train_mask, indices, device)
        shape = tuple(xT.shape)
        if mask is not None:
            xT = xT * (1.0 - mask) + self._normal(shape, global_batch) * mask
        z = self._normal(shape, global_batch) if self.generator.noise else None
        nfe = self.generator.nfe
        schedule = self.teacher.schedule
        rollout_to = None
        if nfe > 1 and self.resolved.multistep_mode == "rollout":
            rollout_to = int(torch.randint(1, nfe + 1, (1,), generator=self.state.generator))
        step_noise = None
        if nfe > 1 and not schedule.deterministic:
            step_noise = [self._normal(shape, global_batch) for _ in range(nfe - 1)]
        gen = self.state.device_generator
        t = split_global_batch(schedule.sample_time(global_batch, generator=gen, device=gen.device), self.ctx)
        eps = None if schedule.deterministic else self._normal(shape, global_batch)
        return _Draw(xT, mask, z, step_noise, rollout_to, t.to(device), eps)

    def _autocast(self):
        # CUDA autocast also comes from run_training (train.bf16); on the CPU it is opt-in.
        return autocast_context(self.ctx.device, self.use_bf16, allow_cpu=True)

    def _generate(self, generator: torch.nn.Module, draw: _Draw) -> Tensor:
        return generator(
            draw.xT, draw.z, mask=draw.mask, rollout_to=draw.rollout_to, step_noise=draw.step_noise
        )

    def _check_finite(self, name: str, loss: Tensor) -> None:
        # On several ranks the decision must be taken on the all-reduced value (all agree).
        if self.ctx.distributed:
            value = all_reduce_mean(loss, self.ctx)
            if not math.isfinite(value):
                raise NonFiniteLossError(self.state.step, f"loss of '{name}'", value)

    # ------------------------------------------------------------------------------ step

    def aux_update(self, state: TrainingState, step: int, j: int) -> Tensor:
        """Auxiliary update ``j`` of step ``step``: bridge matching of ``D_phi`` on fresh generator
        samples (``ibmd_auxiliary_loss``; the generator runs without autograd), micro-batch by
        micro-batch. Returns the loss, the mean over this rank's micro-batches."""
        batches = self.aux_batches
        draw = self.draw(0, step * self.resolved.aux_steps + j, batches)

        def micro_loss(part: slice) -> Tensor:
            micro = draw.rows(part)
            with self._autocast():
                with torch.no_grad():
                    x0 = self._generate(self.generator, micro)
                loss = ibmd_auxiliary_loss(
                    self.aux_for_update, x0, micro.xT, self.teacher.schedule,
                    mask=micro.mask, t=micro.t, noise=micro.eps,
                )
            self._check_finite("aux", loss)
            return loss

        parts = [functools.partial(micro_loss, part) for part in batches.micro_batches()]
        _, losses = accumulated_update(state, "aux", parts, module=self.aux_for_update)
        return torch.stack(losses).mean()

    def generator_update(self, state: TrainingState, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator update of step ``step`` (``ibmd_generator_loss`` on a fresh batch).

        Gradients reach theta through x0 and through x_t into the frozen teacher and the
        auxiliary model, whose parameters are not touched. Returns the loss and its two terms,
        means over this rank's micro-batches.
        """
        draw = self.draw(1, step, self.batches)
        terms: list[dict[str, Tensor]] = []

        def micro_loss(part: slice) -> Tensor:
            micro = draw.rows(part)
            with self._autocast():
                x0 = self._generate(self.generator_for_update, micro)
                # Plain modules here: their parameters get no gradient from this loss (ibmd.py).
                loss, micro_terms = ibmd_generator_loss(
                    self.teacher.predictor, self.aux, x0, micro.xT, self.teacher.schedule,
                    mask=micro.mask, t=micro.t, noise=micro.eps, return_terms=True,
                )
            self._check_finite("generator", loss)
            terms.append(micro_terms)
            return loss

        parts = [functools.partial(micro_loss, part) for part in self.batches.micro_batches()]
        _, losses = accumulated_update(state, "generator", parts, module=self.generator_for_update)
        means = {key: torch.stack([t[key] for t in terms]).mean() for key in ("teacher", "fake")}
        return torch.stack(losses).mean(), means

    def step(self, state: TrainingState, step: int) -> dict[str, float]:
        """One generator update preceded by its L auxiliary updates (IBMD Alg. 1)."""
        aux_losses = [self.aux_update(state, step, j) for j in range(self.resolved.aux_steps)]
        loss, terms = self.generator_update(state, step)
        return {
            "loss/generator": all_reduce_mean(loss, self.ctx),
            "loss/aux": all_reduce_mean(torch.stack(aux_losses).mean(), self.ctx),
            "term/teacher": all_reduce_mean(terms["teacher"], self.ctx),
            "term/fake": all_reduce_mean(terms["fake"], self.ctx),
        }

    # ------------------------------------------------------------------------ validation

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics of the EMA generator (and the raw one's gap), as a history record."""
        if self.validator is None:
            return {}
        record = {"step": float(step)}
        record.update(self.validator(self.ema_generator, raw=self.generator))
        return record

    def on_sample(self, state: TrainingState, step: int) -> None:
        """``run_training``'s periodic callback: append a validation record to the history."""
        record = self.validate(step)
        if record:
            state.history.append(record)
            logger.info(
                "distill validation at step %d: %s",
                step,
                ", ".join(f"{k.removeprefix('val/')}={v:.4f}" for k, v in record.items() if k != "step"),
            )


def aux_batch_plan(batches: BatchPlan, aux_batch_size: int) -> BatchPlan:
    """The auxiliary updates' split: micro-batches of ``aux_batch_size``, as many as ``batches``."""
    global_batch = aux_batch_size * batches.world_size * batches.accumulation
    return dataclasses.replace(batches, micro_batch=aux_batch_size, global_batch=global_batch)


def _rank_indices(
    ctx: DistContext, count: int, stream: int, index: int, batches: BatchPlan, resolved: ResolvedDistill
) -> Tensor:
    """This rank's part of global batch ``index`` of data stream ``stream`` (0: auxiliary, 1: generator)."""
    seed = resolved.train.seed + stream
    return split_global_batch(epoch_batch_indices(count, batches.global_batch, index, seed), ctx)


def _shaping_settings(resolved: ResolvedDistill, batches: BatchPlan) -> dict[str, Any]:
    """The resolved settings that shape the run: with ``global_batch_size`` the auxiliary
    update's global batch instead of its micro-batch, which changes float rounding only."""
    settings = resolved.as_dict()
    if resolved.train.global_batch_size is not None:
        settings.pop("aux_batch_size")
        settings["aux_global_batch_size"] = aux_batch_plan(batches, resolved.aux_batch_size).global_batch
    return settings


def _check_inputs(corrupted: Tensor, mask: Tensor | None, task_kind: str | None) -> None:
    if not isinstance(corrupted, Tensor) or corrupted.ndim != 4 or not corrupted.is_floating_point():
        shape = tuple(corrupted.shape) if isinstance(corrupted, Tensor) else type(corrupted).__name__
        raise ValueError(f"corrupted images must be a float tensor (N, C, H, W), got {shape}")
    expected_mask = (corrupted.shape[0], 1, *corrupted.shape[2:])
    if mask is not None and tuple(mask.shape) != expected_mask:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(corrupted.shape)}"
        )
    if task_kind is not None and (task_kind in MASK_TASKS) != (mask is not None):
        raise ValueError(
            f"task '{task_kind}' {'needs' if task_kind in MASK_TASKS else 'has no'} missing-pixel mask, "
            f"but the corrupted data {'has none' if mask is None else 'comes with one'}"
        )


def build_distill_run(
    ctx: DistContext,
    corrupted: Tensor,
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    *,
    mask: Tensor | None = None,
    task_kind: str | None = None,
    progress: bool = False,
) -> DistillRun:
    """Load the teacher, build generator, auxiliary model, EMA, optimisers and validation.

    ``progress``: bars over the validation's teacher reference draws (made here, before the first
    update; the many-step draws take minutes on a CPU).

    Checks that the teacher fits the data (task, image size, channels) before any work:
    :class:`~ibmd_pipeline.teacher.model.CheckpointMismatchError` otherwise; and first of all
    that the global batch splits over ``ctx.world_size`` processes (``ConfigError`` naming
    ``distill.train.global_batch_size`` otherwise).
    """
    batches = plan_batches(config.train, ctx.world_size, key="distill.train")
    if isinstance(corrupted, StreamedPairs):
        if corrupted.targets:
            raise ValueError(
                "distillation reads corrupted images only: pass StreamedPairs(..., targets=False)"
            )
        image_size, channels = corrupted.manifest.image_size, corrupted.manifest.channels
        inpainting = corrupted.manifest.task.has_mask
        data_fingerprint = corrupted.fingerprint()
    else:
        _check_inputs(corrupted, mask, task_kind)
        image_size, channels = int(corrupted.shape[-1]), int(corrupted.shape[1])
        inpainting = mask is not None
        data_fingerprint = _fingerprint([corrupted] + ([] if mask is None else [mask]))
    teacher = teacher_from_checkpoint(
        teacher_checkpoint,
        use_ema=config.use_teacher_ema,
        device=ctx.device,
        task_kind=task_kind,
        image_size=image_size,
        channels=channels,
    )
    # The device's memory format before any copy is made: generator and auxiliary inherit it.
    place_module(teacher.predictor.net, ctx.device)
    resolved = resolve_distill(
        config, bridge_kind=teacher.bridge.kind, conditional=teacher.conditional, inpainting=inpainting
    )
    train_xT, train_mask, val_xT, val_mask = split_held_out(corrupted, mask, config.validation.batch_size)
    dtype = torch.get_default_dtype()
    reader = None
    if isinstance(train_xT, Subset):
        # Streamed: workers read the batches of the coming updates, in the order the step asks.
        streamed, count = corrupted, len(train_xT)

        aux_batches = aux_batch_plan(batches, resolved.aux_batch_size)

        def plan(step: int) -> list[Tensor]:
            updates = range(step * resolved.aux_steps, (step + 1) * resolved.aux_steps)
            aux = [_rank_indices(ctx, count, 0, index, aux_batches, resolved) for index in updates]
            return [*aux, _rank_indices(ctx, count, 1, step, batches, resolved)]

        assert isinstance(streamed, StreamedPairs)
        reader = StepBatches(train_xT, plan, resolved.train.steps, **loader_options(streamed, ctx.device))
    else:
        # Batches are gathered from host memory every update: converted once to torch's default
        # dtype (float32 unless the caller set another), pinned once on CUDA.
        train_xT = stage_on_host(train_xT.to("cpu", dtype).contiguous(), ctx.device)
        if train_mask is not None:
            train_mask = stage_on_host(train_mask.to("cpu", dtype).contiguous(), ctx.device)

    generator = BridgeGenerator.from_teacher(
        teacher.predictor, nfe=resolved.student_nfe, noise=resolved.noise
    )
    aux_net = copy.deepcopy(teacher.predictor.net).requires_grad_(True)
    aux = X0Predictor(aux_net, teacher.schedule, conditional=teacher.conditional)
    state = create_training_state(
        {"generator": generator.predictor.net, "aux": aux_net},
        resolved.train,
        device=ctx.device,
        ema=["generator"],
        lr={"generator": resolved.lr_generator, "aux": resolved.lr_aux},
    )
    # In place, once every copy exists (EMA, generator and auxiliary copies of the teacher)
    # and before DistillRun builds the DDP wrappers around the generator and auxiliary model.
    for net in (teacher.predictor.net, generator.predictor.net, aux_net):
        compile_module(net, resolved.train.compile)
    ema_shadow = state.emas["generator"].shadow
    ema_generator = BridgeGenerator(
        X0Predictor(ema_shadow, teacher.schedule, conditional=teacher.conditional),
        nfe=generator.nfe,
        noise=generator.noise,
    )

    teacher_config = {k: v for k, v in teacher.config.items() if k != "catalog_version"}
    student_config = {
        "teacher": teacher_config,
        "teacher_version": teacher.version,
        "distill": config_to_dict(config),
        "resolved": resolved.as_dict(),
        "generator": {**generator.spec(), "multistep_mode": resolved.multistep_mode},
        "task": teacher_config.get("task"),
        "image_size": image_size,
        "channels": channels,
    }
    weights_key = "ema" if config.use_teacher_ema else "models"
    teacher_weights = teacher_checkpoint[weights_key]["model"]
    run_config = {
        "teacher": teacher_config,
        "teacher_weights": _fingerprint([teacher_weights[k] for k in sorted(teacher_weights)]),
        "data": data_fingerprint,
        "held_out": config.validation.batch_size,
        "resolved": _shaping_settings(resolved, batches),
        "use_teacher_ema": config.use_teacher_ema,
        # Not the process count: a changed one finds this run's checkpoint and resumes it (with
        # train.global_batch_size) or says why it cannot (engine.resume).
        "autocast_bf16": config.autocast_bf16(ctx.device),
    }
    run = DistillRun(
        ctx=ctx,
        teacher=teacher,
        generator=generator,
        aux=aux,
        ema_generator=ema_generator,
        state=state,
        resolved=resolved,
        config=config,
        train_xT=train_xT,
        train_mask=train_mask,
        val_xT=val_xT,
        val_mask=val_mask,
        student_config=student_config,
        run_config=run_config,
        batches=batches,
        reader=reader,
    )
    if config.validation.every > 0:
        run.validator = DistillValidator(
            teacher.predictor,
            val_xT.to(ctx.device, dtype),
            None if val_mask is None else val_mask.to(ctx.device, dtype),
            config.validation,
            resolved.student_nfe,
            bf16=run.use_bf16,
            progress=progress,
        )
    return run


def fresh_ibmd_update(
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    corrupted: Tensor,
    device: torch.device,
    *,
    mask: Tensor | None = None,
    task_kind: str | None = None,
) -> Callable[[], None]:
    """One IBMD update (L auxiliary updates, then the generator's) of a fresh one-process run, as
    a call that times or profiles it: each call takes the next step, at learning rate 0, so the
    networks stay where they started."""
    run = build_distill_run(
        DistContext.single_process(device),
        corrupted,
        teacher_checkpoint,
        config,
        mask=mask,
        task_kind=task_kind,
    )
    set_learning_rates(run.state, 0)
    counter = iter(range(10**9))
    return lambda: run.step(run.state, next(counter))


def _train(
    ctx: DistContext,
    config: DistillConfig,
    corrupted: Tensor,
    teacher_checkpoint: Mapping[str, Any],
    mask: Tensor | None,
    task_kind: str | None,
    progress: bool,
    snapshot_steps: Sequence[int] = (),
    on_snapshot: SnapshotFn | None = None,
) -> dict[str, Any]:
    """Build and run the distillation on this rank; returns the student checkpoint (equal on all ranks)."""
    run = build_distill_run(
        ctx, corrupted, teacher_checkpoint, config, mask=mask, task_kind=task_kind,
        progress=progress and ctx.is_main,
    )
    resolved = run.resolved
    logger.info(
        "IBMD on %s%s: student NFE %d (%s), noise %s, L=%d aux updates per generator update, lr %.3g / %.3g, "
        "%d generator updates of global batch %d (aux %d) = %d rank(s) x %d micro-batch(es) of %d (aux %d), "
        "%d training / %d held-out images",
        describe_device(ctx.device), ", bf16 autocast" if run.use_bf16 else "",
        resolved.student_nfe, resolved.multistep_mode, resolved.noise,
        resolved.aux_steps, resolved.lr_generator, resolved.lr_aux, resolved.train.steps,
        run.batches.global_batch, run.aux_batches.global_batch, ctx.world_size, run.batches.accumulation,
        resolved.train.batch_size, resolved.aux_batch_size,
        len(run.train_xT), len(run.val_xT),
    )
    initial = run.validate(0)
    workdir = None
    if config.workdir is not None:
        workdir = Path(config.workdir) / run_folder_name(run.run_config, config_to_dict(resolved.train))
    step_fn = run.step
    if on_snapshot is not None and snapshot_steps:
        wanted = frozenset(snapshot_steps)

        def step_fn(state: TrainingState, step: int) -> dict[str, float]:
            losses = run.step(state, step)
            if step + 1 in wanted:  # the loop counts this update only after step_fn returns
                snapshot = export_checkpoint(state, run.student_config, extra=run.checkpoint_extra)
                snapshot["step"] = step + 1
                on_snapshot(step + 1, snapshot)
            return losses

    run_training(
        run.state,
        step_fn,
        workdir=workdir,
        run_config=run.run_config,
        progress_desc=f"IBMD (NFE {resolved.student_nfe})",
        on_sample=run.on_sample if run.validator is not None else None,
        progress=progress and ctx.is_main,
        ctx=ctx,
    )
    if initial:
        run.state.history.insert(0, initial)
    barrier(ctx)
    if workdir is not None and not config.keep_workdir and ctx.is_main:
        (workdir / WORKING_CHECKPOINT).unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return export_checkpoint(run.state, run.student_config, extra=run.checkpoint_extra)


def distill_student(
    corrupted: Tensor,
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    *,
    mask: Tensor | None = None,
    task_kind: str | None = None,
    device: str = "auto",
    progress: bool = True,
    snapshot_steps: Sequence[int] = (),
    on_snapshot: SnapshotFn | None = None,
) -> dict[str, Any]:
    """Distil the teacher in ``teacher_checkpoint`` into a student with IBMD; returns its checkpoint.

    corrupted: the corrupted training images xT, float ``(N, C, H, W)`` in [-1, 1] (the only
        data IBMD uses; the last ``config.validation.batch_size`` are held out for validation).
    teacher_checkpoint: a teacher checkpoint dict (``teacher.model`` format).
    mask: ``(N, 1, H, W)``, 1 = missing pixel, for inpainting.
    task_kind: checked against the teacher's task and the presence of ``mask`` when given.
    device: ``auto``/``cpu``/``cuda``/``cuda:N`` (``engine.device``).
    snapshot_steps, on_snapshot: after each listed generator update (each in ``[1, train.steps]``)
        ``on_snapshot(updates, checkpoint)`` receives a student checkpoint of the run so far
        (CPU copies, loadable with ``student_from_checkpoint``), e.g. to score quality against
        training length from one run. Updates restored from a working checkpoint are not
        re-run, so they give no snapshot. Single-process runs only.

    It runs in this process, in ``config.distributed.nproc_per_node`` local processes, or as
    this process's rank of a torchrun/srun job, as
    :func:`~ibmd_pipeline.engine.launch.run_data_parallel` decides. The returned dict is the
    student checkpoint described in :mod:`ibmd_pipeline.distill.student`.
    """
    if snapshot_steps or on_snapshot is not None:
        _check_snapshots(snapshot_steps, on_snapshot, config.train.steps)
        if launch_mode(config.distributed) != "in_process":
            raise ValueError("snapshots (snapshot_steps / on_snapshot) need a single-process run")
    if launch_mode(config.distributed) == "local_workers":
        # Every worker would stop at once on this; refuse before spawning them.
        plan_batches(config.train, config.distributed.nproc_per_node, key="distill.train")
    return run_data_parallel(
        _train, config, corrupted, dict(teacher_checkpoint), mask, task_kind, progress,
        snapshot_steps, on_snapshot, device=device, key="distill.distributed",
    )


def _check_snapshots(snapshot_steps: Sequence[int], on_snapshot: SnapshotFn | None, steps: int) -> None:
    if on_snapshot is None or not snapshot_steps:
        raise ValueError("snapshot_steps and on_snapshot go together: give both or neither")
    outside = [
        n for n in snapshot_steps if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= steps
    ]
    if outside:
        raise ValueError(
            f"snapshot_steps {outside} are not generator update counts in [1, train.steps={steps}]"
        )
