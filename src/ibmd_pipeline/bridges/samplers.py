"""Bridge samplers: from the corrupted image ``xT`` at ``t = T`` to a clean ``x0``.

:func:`posterior_chain` is the one loop that alternates x0-predictions and bridge steps: the
teacher sampler :func:`sample` (docs/method.md sec. 3, "Sampling"), the multi-step IBMD
generator (``distill.generator``, docs/method.md sec. 4.4; IBMD sec. 3.5) and the exported
student graph (``deploy.export``) all run it. On the grid ``T = t_N > ... > t_1 > t_0 = t_min``
of ``schedule.grid(nfe)`` the network is evaluated at ``t_N .. t_1`` (``nfe`` evaluations) and
the state moves ``t_n -> t_{n-1}`` between them:

- ``"ancestral"``: ``x_s ~ q(x_s | x_t, x0 = x0_hat)`` (``schedule.posterior_step``, I2SB's
  ``p_posterior``); a deterministic (OT-ODE) schedule takes the posterior mean.
- ``"deterministic"``: the DDIM/DBIM bridge step ``x_s = a_s xT + b_s x0_hat + c_s eps_hat`` with
  ``eps_hat = (x_t - a_t xT - b_t x0_hat) / c_t``. At ``t = T`` the bridge has no noise
  (``c_T = 0``) so ``eps_hat`` is undefined: the first step draws it from N(0, I) (DBIM's
  "booting noise"), which makes that step the same as the ancestral one. For an OT-ODE
  schedule (``c = 0`` everywhere) this mode is the posterior mean, as in I2SB.

The last transition goes from ``t_1`` to the clean end of the bridge, where the posterior is the
point mass at ``x0_hat`` (``posterior_step`` with ``s = 0``), so no noise is added and the result
is the last x0-prediction. (I2SB and DBIM return their state at ``t_min`` instead, which differs
from the clean end by the bridge's spread there, ``c_{t_min}`` = 0.01 for I2SB and 3e-3 for
DDBM-VP, about one 8-bit level, plus ``a_{t_min} xT`` with ``a_{t_min} < 1e-3``.)

Inpainting (``mask``, 1 = missing pixel): the known pixels of ``xT`` are clean, so before every
step the prediction there is replaced by ``xT``. The state's known region then follows the
bridge for the clean known value at every step (for I2SB + OT-ODE this is exactly ``xT``, the
"copy from xT"; with noise it is ``xT + c_s eps`` as in I2SB's reset), and the output's known
region equals ``xT``.

All step coefficients are computed once per call from the grid (:func:`chain_steps`, float64,
then Python floats), so a step costs the network call plus a few multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ibmd_pipeline.bridges.losses import Predictor
from ibmd_pipeline.bridges.schedules import BridgeSchedule, standard_normal_like

__all__ = ["ChainStep", "SamplerTrajectory", "chain_steps", "posterior_chain", "sample"]


@dataclass(frozen=True)
class SamplerTrajectory:
    """What a sampler visited: ``times`` (nfe+1,), ``states`` at those times (the last one is the
    output), ``predictions`` (the ``nfe`` x0-predictions, after the known-pixel paste)."""

    times: Tensor
    states: list[Tensor]
    predictions: list[Tensor]


@dataclass(frozen=True)
class ChainStep:
    """One transition ``x_s = coef_x x_t + coef_x0 x0_hat + coef_xT xT + noise_std z`` of a chain."""

    coef_x: float  # multiplies the current state x_t
    coef_x0: float  # multiplies x0_hat
    coef_xT: float  # multiplies xT
    noise_std: float  # multiplies fresh N(0, I) noise


def chain_steps(
    schedule: BridgeSchedule, times: Tensor, mode: Literal["ancestral", "deterministic"] = "ancestral"
) -> list[ChainStep]:
    """The transitions ``times[i] -> times[i+1]`` of a descending grid, one :class:`ChainStep` each.

    ``"ancestral"``: the bridge posterior ``q(x_s | x_t, x0 = x0_hat)``
    (``schedule.posterior_coefficients``); ``"deterministic"``: the DDIM/DBIM step (module docstring).
    """
    if mode not in ("ancestral", "deterministic"):
        raise ValueError(f"mode must be 'ancestral' or 'deterministic', got {mode!r}")
    times = times.to(torch.float64).cpu()
    t, s = times[:-1], times[1:]
    coef_x0, coef_xt, std = (c.tolist() for c in schedule.posterior_coefficients(t, s))
    a, b, c = (v.tolist() for v in schedule.coefficients(times))
    steps = []
    for i in range(len(t)):
        if mode == "ancestral" or schedule.deterministic:
            steps.append(ChainStep(coef_xt[i], coef_x0[i], 0.0, std[i]))
        elif c[i] <= 1e-12 * max(abs(a[i]), abs(b[i]), 1e-30):
            # c_t = 0 (t = T): no eps to recover, boot with fresh noise as DBIM does.
            steps.append(ChainStep(0.0, b[i + 1], a[i + 1], c[i + 1]))
        else:
            ratio = c[i + 1] / c[i]
            steps.append(ChainStep(ratio, b[i + 1] - ratio * b[i], a[i + 1] - ratio * a[i], 0.0))
    return steps


def posterior_chain(
    predict: Callable[[Tensor, int], Tensor],
    xT: Tensor,
    steps: Sequence[ChainStep],
    *,
    mask: Tensor | None = None,
    step_noise: Sequence[Tensor] | Tensor | None = None,
    generator: torch.Generator | None = None,
    grad_through_chain: bool = True,
    on_prediction: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``x0`` from ``xT`` by ``len(steps) + 1`` x0-predictions chained by the bridge steps ``steps``.

    Starting at ``x = xT``, evaluation ``k`` is ``x0_hat = predict(x, k)`` (at the k-th time of
    the caller's grid); for inpainting (``mask``, 1 = missing pixel) its known pixels are then
    reset from ``xT``. Each evaluation but the last is followed by the transition ``steps[k]``
    (:class:`ChainStep`); the last evaluation's ``x0_hat`` is the result (the step from there to
    the clean end of the bridge is the point mass at ``x0_hat``, module docstring).

    step_noise: the noise of the transitions that take noise (``noise_std > 0``), indexed by
        transition; drawn from ``generator`` when omitted. A deterministic (OT-ODE) step takes none.
    grad_through_chain: False runs every evaluation and transition before the last one without
        autograd (the DMD2-style rollout of multi-step students); True keeps the caller's mode.
    on_prediction: called as ``on_prediction(x_t, x0_hat)`` after each evaluation.
    """
    keep = None if mask is None else 1.0 - mask.to(xT.dtype)

    def predict_known(x: Tensor, k: int) -> Tensor:
        x0_hat = predict(x, k)
        if keep is not None:
            x0_hat = torch.lerp(x0_hat, xT, keep)
        if on_prediction is not None:
            on_prediction(x, x0_hat)
        return x0_hat

    x = xT
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad_through_chain):
        for k, step in enumerate(steps):
            x0_hat = predict_known(x, k)
            x_next = step.coef_x * x + step.coef_x0 * x0_hat
            if step.coef_xT != 0.0:
                x_next = x_next + step.coef_xT * xT
            if step.noise_std > 0.0:
                noise = step_noise[k] if step_noise is not None else standard_normal_like(x, generator)
                x_next = x_next + step.noise_std * noise
            x = x_next
    return predict_known(x, len(steps))


def sample(
    predictor: Predictor,
    xT: Tensor,
    schedule: BridgeSchedule,
    nfe: int,
    *,
    mode: Literal["ancestral", "deterministic"] = "ancestral",
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    extra: Tensor | None = None,
    enable_grad: bool = False,
) -> Tensor | tuple[Tensor, SamplerTrajectory]:
    """Run the bridge sampler with ``nfe`` network evaluations from ``xT``; returns ``x0``.

    ``predictor(x_t, t, xT=xT[, extra=extra]) -> x0_hat`` (``extra``, e.g. a generator's noise,
    is passed only when given). ``generator`` drives every noise draw. With
    ``return_trajectory`` also returns a :class:`SamplerTrajectory`. Runs without autograd unless
    ``enable_grad`` (for back-propagating through a short chain).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if mode not in ("ancestral", "deterministic"):
        raise ValueError(f"mode must be 'ancestral' or 'deterministic', got {mode!r}")
    times = schedule.grid(nfe)
    # the final transition (to the clean end) needs no coefficients: its result is x0_hat
    steps = chain_steps(schedule, times[:-1], mode)
    eval_times = times.tolist()
    kwargs = {} if extra is None else {"extra": extra}

    def predict(x: Tensor, k: int) -> Tensor:
        t_batch = torch.full((x.shape[0],), eval_times[k], device=x.device, dtype=torch.float32)
        return predictor(x, t_batch, xT=xT, **kwargs)

    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=nfe, desc=f"bridge sampler ({mode}, {nfe} NFE)", leave=False)
    states: list[Tensor] = []
    predictions: list[Tensor] = []

    def record(x_t: Tensor, x0_hat: Tensor) -> None:
        if return_trajectory:
            states.append(x_t)
            predictions.append(x0_hat)
        if progress_bar is not None:
            progress_bar.update()

    with torch.set_grad_enabled(enable_grad and torch.is_grad_enabled()):
        x0 = posterior_chain(predict, xT, steps, mask=mask, generator=generator, on_prediction=record)
    if progress_bar is not None:
        progress_bar.close()
    if return_trajectory:
        states.append(x0)
        return x0, SamplerTrajectory(times=times, states=states, predictions=predictions)
    return x0
