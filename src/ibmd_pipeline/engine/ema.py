"""Exponential moving average (EMA) of a network's weights, as the trainers keep for their models.

The paper evaluates the EMA weights of teachers and students (decay 0.99). The shadow copy is a
plain module, so it is sampled from directly, saved in checkpoints under ``"ema"`` and resumed
exactly from a working checkpoint (:meth:`EMA.state_dict`).

``torch.optim.swa_utils.AveragedModel`` computes the same numbers bit for bit on the CPU once it
is primed, but it is not used here: its first update copies instead of averaging (it needs a
priming call), its decay is fixed (the warm-up would need an averaging function of its own), it
averages or ignores buffers instead of copying them, and its state_dict (``module.*`` keys and an
``n_averaged`` buffer) differs from the one that working checkpoints and exported ``"ema"`` entries
store. The adapters would be longer than the four lines of :meth:`EMA.update`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ibmd_pipeline.engine.devices import is_compiled

__all__ = ["EMA"]


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

