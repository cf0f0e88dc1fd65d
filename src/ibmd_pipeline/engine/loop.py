"""The training loop shared by the teacher and the IBMD trainers.

:func:`run_training` drives a trainer's step function (``engine.training``) to the configured
number of steps: it seeds, resumes from ``workdir/last.pt`` when that file belongs to the same run
configuration (``engine.resume``), shows a tqdm bar, logs window means, calls the sampling
callback, writes atomic working checkpoints, and stops (or skips the batch) on a non-finite loss
without ever overwriting the last good checkpoint. A SIGTERM/SIGINT/SIGUSR1 stops it at the next
step boundary, after writing the working checkpoint (``engine.preemption``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from ibmd_pipeline.engine.devices import autocast_context
from ibmd_pipeline.engine.distributed import DistContext, barrier
from ibmd_pipeline.engine.preemption import PreemptionWatcher, TrainingPreempted, stop_requested
from ibmd_pipeline.engine.resume import (
    WORKING_CHECKPOINT,
    check_ranks_agree,
    resume_training_state,
    save_working_checkpoint,
)
from ibmd_pipeline.engine.training import (
    NonFiniteLossError,
    TrainingState,
    check_finite_parameters,
    seed_everything,
    set_learning_rates,
)

__all__ = ["StepFn", "run_training"]

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainingState, int], Mapping[str, "Tensor | float"]]


def _save_working(state: TrainingState, run_config: Mapping[str, Any], path: Path, ctx: DistContext) -> None:
    """Write the working checkpoint (collective), never over a good one with weights gone bad."""
    # Every rank checks its (identical, under DDP) weights, so a bad value stops all ranks together.
    check_finite_parameters(state)
    save_working_checkpoint(state, run_config, path, ctx)


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
        this one, keys in :data:`~ibmd_pipeline.engine.resume.RESUME_NEUTRAL_KEYS` aside.
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

    A SIGTERM, SIGINT or SIGUSR1 (on any rank) ends the run at the next step boundary on every
    rank: the working checkpoint is written (with ``workdir``) and :class:`TrainingPreempted`
    is raised; calling ``run_training`` again with the same settings resumes from there.
    """
    config = state.config
    ctx = DistContext.single_process(state.device) if ctx is None else ctx
    run_config = dict(run_config or {})
    path = Path(workdir) / WORKING_CHECKPOINT if workdir is not None else None

    # Nobody reads before every rank got here (a writer of this group, e.g. an earlier run's
    # rank 0, is done; writes are atomic, so a file is never seen half written).
    barrier(ctx)
    if path is not None and config.resume and path.is_file():
        resume_training_state(state, path, run_config, ctx)
        logger.info("resumed from '%s' at step %d of %d", path, state.step, config.steps)
    else:
        seed_everything(state.seed)
        state.generator.manual_seed(state.seed)
        if state.device_generator is not state.generator:
            state.device_generator.manual_seed(state.seed + 1)
        state.step, state.skipped, state.history, state.log_window = 0, 0, [], {}
    check_ranks_agree(state, ctx, path)

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
    watcher = PreemptionWatcher().install()
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

            # A signal to any rank stops every rank here, at the same step; the last step needs
            # no stop (the run ends and saves anyway).
            stop = stop_requested(watcher, ctx) and state.step < config.steps
            due = bool(config.checkpoint_every) and state.step % config.checkpoint_every == 0
            if path is not None and (stop or (due and state.step < config.steps)):
                _save_working(state, run_config, path, ctx)
            if stop:
                raise TrainingPreempted(state.step, watcher.signal_name or "a signal to another rank", path)
    finally:
        watcher.remove()
        bar.close()

    if path is not None:
        _save_working(state, run_config, path, ctx)
    return state
