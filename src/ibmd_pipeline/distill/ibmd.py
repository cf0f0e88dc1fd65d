"""The two IBMD losses (IBMD Thm. 3.2, Prop. 3.3, Thm. 3.4; docs/method.md sec. 4.2).

With a frozen teacher ``D*``, an auxiliary ("fake") bridge model ``D_phi`` and a generator
``x0 = G_theta(xT, z)``, ``x_t = a_t xT + b_t x0 + c_t eps`` on the generator's coupling:

    auxiliary (step phi):  E lambda(t) || D_phi(x_t, t [,xT]) - sg(x0) ||^2
    generator (step theta): E lambda(t) ( || D*(x_t, t [,xT]) - x0 ||^2 - || D_phi(x_t, t [,xT]) - x0 ||^2 )

The inner minimiser of the auxiliary loss is ``E_{p_theta}[x0 | x_t]``, so at the optimum the
generator loss equals ``E lambda || D* - E_{p_theta}[x0 | x_t] ||^2 >= 0`` (IBMD Thm. 3.2 / 3.4), zero
exactly when the generator's bridge model is the teacher's.

Gradients of the generator loss flow into ``x0`` directly and through ``x_t`` into both
networks' inputs, but never into the parameters of ``D*`` or ``D_phi``: they are evaluated
with :func:`torch.func.functional_call` on detached copies of their parameters, so a backward
pass leaves their ``.grad`` untouched (no toggling of ``requires_grad``, nothing to restore if
an exception is raised). Pass the plain modules, not DistributedDataParallel wrappers, to the
generator loss: a DDP forward whose parameters receive no gradient stalls its reducer.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor, nn

from ibmd_pipeline.bridges.losses import Predictor, bridge_matching_loss, masked_mean_squared_error
from ibmd_pipeline.bridges.schedules import BridgeSchedule, standard_normal_like

__all__ = ["call_with_frozen_parameters", "ibmd_auxiliary_loss", "ibmd_generator_loss"]


def call_with_frozen_parameters(predictor: Predictor, *args, **kwargs) -> Tensor:
    """Call ``predictor`` so that gradients reach its inputs but none of its parameters.

    Modules run through :func:`torch.func.functional_call` with detached parameters; plain
    callables (analytic oracles) are called as they are.
    """
    if isinstance(predictor, nn.Module):
        detached = {name: p.detach() for name, p in predictor.named_parameters()}
        return torch.func.functional_call(predictor, detached, args, kwargs)
    return predictor(*args, **kwargs)


def ibmd_auxiliary_loss(
    fake_predictor: Predictor,
    x0: Tensor,
    xT: Tensor,
    schedule: BridgeSchedule,
    *,
    mask: Tensor | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bridge matching of ``D_phi`` on the generator's samples ``x0`` (detached here): step phi only."""
    return bridge_matching_loss(
        fake_predictor, x0.detach(), xT.detach(), schedule, t=t, noise=noise, mask=mask, generator=generator
    )


@overload
def ibmd_generator_loss(
    teacher_predictor: Predictor,
    fake_predictor: Predictor,
    x0: Tensor,
    xT: Tensor,
    schedule: BridgeSchedule,
    *,
    mask: Tensor | None = ...,
    t: Tensor | None = ...,
    noise: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    return_terms: Literal[False] = ...,
) -> Tensor: ...


@overload
def ibmd_generator_loss(
    teacher_predictor: Predictor,
    fake_predictor: Predictor,
    x0: Tensor,
    xT: Tensor,
    schedule: BridgeSchedule,
    *,
    mask: Tensor | None = ...,
    t: Tensor | None = ...,
    noise: Tensor | None = ...,
    generator: torch.Generator | None = ...,
    return_terms: Literal[True] = ...,
) -> tuple[Tensor, dict[str, Tensor]]: ...


def ibmd_generator_loss(
    teacher_predictor: Predictor,
    fake_predictor: Predictor,
    x0: Tensor,
    xT: Tensor,
    schedule: BridgeSchedule,
    *,
    mask: Tensor | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``mean lambda(t) ( ||D*(x_t) - x0||^2 - ||D_phi(x_t) - x0||^2 )`` with ``x_t`` built from ``x0``.

    ``x0`` is the generator's output with its graph; ``x_t = a xT + b x0 + c eps`` keeps it, so
    the gradient w.r.t. theta has the direct term and the terms through ``x_t`` into both
    predictors (docs/method.md sec. 4.2). Predictor parameters get no gradient (module docstring).
    Errors are per-pixel means, over the hole only when ``mask`` is given. With
    ``return_terms`` also returns the detached batch means ``{"teacher": ..., "fake": ...}`` of
    the two weighted errors (their difference is the loss).
    """
    if x0.shape != xT.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and xT {tuple(xT.shape)} must have the same shape")
    if t is None:
        t = schedule.sample_time(x0.shape[0], generator=generator, device=x0.device)
    if noise is None and not schedule.deterministic:
        noise = standard_normal_like(x0, generator)
    x_t = schedule.sample_marginal(x0, xT, t, noise=noise)
    teacher_x0 = call_with_frozen_parameters(teacher_predictor, x_t, t, xT=xT)
    fake_x0 = call_with_frozen_parameters(fake_predictor, x_t, t, xT=xT)
    weight = schedule.loss_weight(t).to(device=x0.device, dtype=x0.dtype)
    teacher_term = weight * masked_mean_squared_error(teacher_x0, x0, mask)
    fake_term = weight * masked_mean_squared_error(fake_x0, x0, mask)
    loss = (teacher_term - fake_term).mean()
    if return_terms:
        return loss, {"teacher": teacher_term.detach().mean(), "fake": fake_term.detach().mean()}
    return loss
