"""Bridge matching: the teacher loss, also IBMD's auxiliary ("fake") loss (IBMD eq. (7), Alg. 1).

    min_phi  E_{(x0, xT), t, x_t ~ q(x_t | x0, xT)}  lambda(t) || x0_hat_phi(x_t, t [, xT]) - x0 ||^2

with ``lambda(t) = 1 / c_out(t)^2`` (the schedule's own weighting), the squared error averaged
per pixel. Inpainting (``mask`` given, 1 = missing pixel): the error is averaged over the hole
only, normalised by the hole area. ``x_t`` is drawn from the bridge on every pixel: the known
pixels of ``xT`` equal those of ``x0``, so there ``x_t`` already is what the sampler produces
(the bridge started and ended at the clean value), and nothing needs resetting at training time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ibmd_pipeline.bridges.schedules import BridgeSchedule, standard_normal_like

__all__ = ["Predictor", "bridge_matching_loss", "masked_mean_squared_error"]

#: Anything called as ``predictor(x_t, t, xT=xT) -> x0_hat`` (e.g. ``networks.predictors.X0Predictor``).
Predictor = Callable[..., Tensor]


def masked_mean_squared_error(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error ``(B,)``; over the hole only when ``mask`` (B,1,H,W) is given.

    With a mask the sum over ``mask == 1`` pixels (all channels) is divided by the hole area
    times the channel count; a sample without a hole contributes zero.
    """
    error = (prediction - target).square()
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    mask = mask.to(error.dtype)
    if mask.shape[0] != error.shape[0] or mask.shape[2:] != error.shape[2:]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match images of shape {tuple(error.shape)}"
        )
    hole = (mask * error).sum(dim=dims)
    area = mask.expand_as(error).sum(dim=dims).clamp_min(1.0)
    return hole / area


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def bridge_matching_loss(
    predictor: Predictor,
    x0: Tensor,
    xT: Tensor,
    schedule: BridgeSchedule,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """``lambda(t) || predictor(x_t, t, xT) - x0 ||^2`` on ``x_t ~ q(x_t | x0, xT)`` (IBMD eq. (7)).

    ``t`` defaults to ``schedule.sample_time`` and ``noise`` to standard normal draws, both from
    ``generator``. Returns the batch mean, or the ``(B,)`` per-sample losses for
    ``reduction="none"``. Gradients reach ``x0`` too; detach it for a fixed target.
    """
    if x0.shape != xT.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and xT {tuple(xT.shape)} must have the same shape")
    if t is None:
        t = schedule.sample_time(x0.shape[0], generator=generator, device=x0.device)
    if noise is None and not schedule.deterministic:
        noise = standard_normal_like(x0, generator)
    x_t = schedule.sample_marginal(x0, xT, t, noise=noise)
    x0_hat = predictor(x_t, t, xT=xT)
    weight = schedule.loss_weight(t).to(device=x0.device, dtype=x0_hat.dtype)
    return _reduce(weight * masked_mean_squared_error(x0_hat, x0, mask), reduction)
