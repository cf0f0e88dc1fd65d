"""Preemption: stop a training run at a step boundary on SIGTERM, save it, exit with a known code.

A cluster scheduler ends a job with SIGTERM and, a grace period later, SIGKILL (SLURM: ``scontrol
requeue``, a time limit or preemption; torchrun forwards SIGTERM to its workers). SIGUSR1 is what
SLURM sends ahead of the time limit with ``#SBATCH --signal=USR1@120``. :class:`PreemptionWatcher`
turns each of these signals into a flag; :func:`~ibmd_pipeline.engine.loop.run_training` reads it
after every step, collectively (:func:`stop_requested`: the ranks agree, so all of them stop at
the same step even when only one got the signal), writes the working checkpoint and raises
:class:`TrainingPreempted`. ``python -m ibmd_pipeline.commands.train`` then exits with
:data:`PREEMPTED_EXIT_CODE`; started again with the same settings it resumes from that checkpoint.

SIGINT (Ctrl-C) is handled the same way the first time; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ibmd_pipeline.engine.distributed import DistContext

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "PreemptionWatcher",
    "TrainingPreempted",
    "stop_requested",
]

logger = logging.getLogger(__name__)

#: Exit status of a run stopped by a signal after saving its working checkpoint: 75 is
#: ``EX_TEMPFAIL`` of sysexits.h ("temporary failure, try again"), distinct from a crash (1) and
#: from death by signal (128 + n).
PREEMPTED_EXIT_CODE = 75
#: Signals that ask a run to save and stop (those the platform has).
PREEMPTION_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")


class TrainingPreempted(RuntimeError):
    """A signal stopped the run at ``step``; the working checkpoint ``checkpoint`` (None: no
    ``workdir``, nothing saved) lets the same command resume it."""

    def __init__(self, step: int, signal_name: str, checkpoint: Path | None):
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        where = (
            f"working checkpoint '{checkpoint}' saved; run the same command again to resume"
            if checkpoint is not None
            else "no workdir was set, so nothing was saved"
        )
        super().__init__(f"training stopped by {signal_name} after step {step}: {where}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.signal_name, self.checkpoint))


class PreemptionWatcher:
    """While installed (or open as a context manager), :data:`PREEMPTION_SIGNALS` set :attr:`signal_name`.

    Handlers are installed only in the main thread (Python allows no other) and the previous
    ones are put back on exit. A second SIGINT calls the previous SIGINT handler (by default:
    ``KeyboardInterrupt``).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name is not None:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        if self.signal_name is None:
            logger.warning("%s received: saving and stopping at the end of this step", name)
        self.signal_name = self.signal_name or name

    def install(self) -> PreemptionWatcher:
        """Handle the signals from now on (in the main thread; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def remove(self) -> None:
        """Put the previous handlers back."""
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def stop_requested(watcher: PreemptionWatcher, ctx: DistContext) -> bool:
    """Whether any rank got a preemption signal; collective when ``ctx`` is distributed.

    Every rank calls it at every step boundary, so all of them decide the same way at the same
    step (one rank saving while the others train on would hang the next collective).
    """
    local = watcher.signal_name is not None
    if not ctx.distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
