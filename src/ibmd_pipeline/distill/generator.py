"""IBMD students: generators ``x0 = G_theta(xT, z)`` built from a teacher bridge model.

IBMD sec. 3.5 (docs/method.md sec. 4.3-4.4). A generator is a copy of the teacher's x0-predictor (same UNet,
same schedule preconditioning and output head, same conditioning on xT), with the noise z
(shaped like xT) fed through ``UNet.add_input_channels``: the new input weights are zero, so
at initialisation the generator *is* the teacher.

- One step (``nfe = 1``): ``x0 = D(xT, T [, xT], z)``, the teacher network evaluated at
  ``t = T`` on xT (for I2SB ``x0 = xT - sigma_T net(.)``); at initialisation this is the
  teacher's one-step output, the posterior mean ``E[x0 | xT]``.
- N steps (``nfe = N``, 2 or 4): ``G(x_t, z, t [, xT])`` on the teacher's grid
  ``T = t_N > ... > t_1`` (``schedule.grid(N)``, whose last entry ``t_0 = t_min`` is the clean
  end). Inference alternates ``x0_hat = G(x_{t_n}, z, t_n)`` with the bridge-posterior step
  ``x_{t_{n-1}} ~ q(x_{t_{n-1}} | x_{t_n}, x0 = x0_hat)`` (``schedule.posterior_step``), in
  the teacher sampler's own loop (``bridges.samplers.posterior_chain``); the last transition
  lands on the clean end, where the posterior is the point mass at ``x0_hat``: no noise there
  (nor anywhere for an OT-ODE schedule). The same z is used at every step (IBMD sec. 3.5's
  ``G(x_{t_n}, z, t_n)``); the posterior steps draw their own noise. At initialisation an
  N-step generator is the teacher's N-step ancestral sampler.
- Fewer steps at inference: a generator trained with N steps may run ``M < N`` steps on
  ``schedule.grid(M)``: it is evaluated at ``grid(M)[:M]``, the teacher's M-step grid. For
  the schedules here (I2SB's evenly spread step indices, DDBM's uniform times) ``grid(M)``'s
  evaluation times are a subset of ``grid(N)``'s whenever M divides N (e.g. 1 and 2 of 4), so
  the generator then only meets times it was trained at; other M make it interpolate in t.
- Inpainting (``mask``, 1 = missing pixel): after every evaluation the known pixels of the
  prediction are copied from xT, so the output's known region equals xT. With ``noise=False``
  (I2SB inpainting, OT-ODE) the generator has no z: its randomness is the noise in xT's hole.

Training (IBMD App. B.1, B.2) forms a multi-step generator's x0 in one of two ways, both
through :meth:`BridgeGenerator.forward`: ``chain`` (the whole N-step chain, with gradients
through every evaluation and posterior step) or ``rollout`` (``rollout_to=k``: the first
``k - 1`` evaluations and steps run without gradients from T down to ``t_n``, ``n = N - k + 1``,
and the k-th evaluation's output there is x0, DMD2-style).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ibmd_pipeline.bridges.samplers import chain_steps, posterior_chain
from ibmd_pipeline.bridges.schedules import BridgeSchedule, standard_normal_like
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.networks.unet import UNet

__all__ = ["BridgeGenerator"]


class BridgeGenerator(nn.Module):
    """The IBMD student ``G_theta``: N evaluations of a teacher-shaped x0-predictor.

    ``predictor`` is an :class:`X0Predictor` whose network takes the teacher's inputs plus
    ``noise_channels`` channels of z (0 when ``noise`` is off). Build one from a teacher with
    :meth:`from_teacher`. The module's parameters are the network's (``predictor.net.*``).
    """

    def __init__(self, predictor: X0Predictor, *, nfe: int, noise: bool):
        super().__init__()
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        self.predictor = predictor
        self.nfe = nfe
        self.noise = bool(noise)

    def extra_repr(self) -> str:
        return f"nfe={self.nfe}, noise={self.noise}"

    @classmethod
    def from_teacher(cls, teacher: X0Predictor, *, nfe: int, noise: bool) -> BridgeGenerator:
        """A trainable copy of ``teacher`` (weights copied, teacher untouched) with z channels.

        The z channels (as many as the image has) are appended to the first convolution with
        zero weights, so the generator's output equals the teacher's at initialisation.
        """
        net = copy.deepcopy(teacher.net)
        if noise:
            if not isinstance(net, UNet):
                raise TypeError(f"noise channels need a UNet teacher network, got {type(net).__name__}")
            net.add_input_channels(net.config.out_channels)
        net.requires_grad_(True)
        return cls(X0Predictor(net, teacher.schedule, conditional=teacher.conditional), nfe=nfe, noise=noise)

    @property
    def schedule(self) -> BridgeSchedule:
        return self.predictor.schedule

    @property
    def conditional(self) -> bool:
        return self.predictor.conditional

    def grid(self, nfe: int | None = None) -> Tensor:
        """The float64 times ``(nfe + 1,)`` of an ``nfe``-step run: ``schedule.grid(nfe)``."""
        return self.schedule.grid(self._check_nfe(nfe))

    def draw_noise(self, xT: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Fresh z ~ N(0, I) shaped like ``xT`` (None for a generator without noise)."""
        return standard_normal_like(xT, generator) if self.noise else None

    def forward(
        self,
        xT: Tensor,
        z: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        nfe: int | None = None,
        rollout_to: int | None = None,
        step_noise: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Generate ``x0`` from ``xT`` (and ``z``) with ``nfe`` evaluations (default: trained N).

        z: the generator noise, shaped like ``xT``; drawn from ``generator`` when omitted
            (required to be None for a generator without noise).
        mask: ``(B, 1, H, W)``, 1 = missing pixel; known pixels are copied from ``xT``.
        nfe: steps M <= N on ``schedule.grid(M)`` (module docstring).
        rollout_to: k in ``1..nfe``: stop after the k-th evaluation and return its output;
            the earlier evaluations and posterior steps run without gradients (DMD2-style
            training). None runs the whole chain under the caller's autograd mode.
        step_noise: the noise of the posterior steps, one tensor shaped like ``xT`` per
            transition taken before the last evaluation; drawn from ``generator`` when omitted.
        """
        nfe = self._check_nfe(nfe)
        stop = nfe if rollout_to is None else int(rollout_to)
        if not 1 <= stop <= nfe:
            raise ValueError(f"rollout_to must be in [1, nfe={nfe}], got {rollout_to}")
        z = self._check_noise(xT, z, generator)
        if mask is not None and (mask.shape[0] != xT.shape[0] or mask.shape[2:] != xT.shape[2:]):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit xT of shape {tuple(xT.shape)}")
        if step_noise is not None and len(step_noise) < stop - 1:
            raise ValueError(
                f"step_noise holds {len(step_noise)} tensors, {stop - 1} transitions need one each"
            )
        times = self.schedule.grid(nfe)
        eval_times = times.tolist()
        # the posterior steps between the evaluations at times[0] .. times[stop - 1]
        steps = chain_steps(self.schedule, times[:stop], "ancestral")

        def predict(x_t: Tensor, k: int) -> Tensor:  # G(x_t, z, t_k [, xT])
            t_batch = torch.full((x_t.shape[0],), eval_times[k], device=x_t.device, dtype=torch.float32)
            return self.predictor(x_t, t_batch, xT=xT, extra=z)

        return posterior_chain(
            predict,
            xT,
            steps,
            mask=mask,
            step_noise=step_noise,
            generator=generator,
            grad_through_chain=rollout_to is None,
        )

    def spec(self) -> dict[str, Any]:
        """The plain description stored in a student checkpoint's ``config["generator"]``."""
        net = self.predictor.net
        unet = config_to_dict(net.config) if isinstance(net, UNet) else None
        channels = net.config.out_channels if isinstance(net, UNet) else None
        return {
            "unet": unet,
            "noise": self.noise,
            "noise_channels": int(channels) if (self.noise and channels is not None) else 0,
            "nfe": self.nfe,
            "time_input": self.nfe > 1,
            "conditional": self.conditional,
            "grid": [float(t) for t in self.schedule.grid(self.nfe)],
        }

    def _check_nfe(self, nfe: int | None) -> int:
        if nfe is None:
            return self.nfe
        if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= self.nfe:
            raise ValueError(
                f"nfe must be an integer in [1, {self.nfe}] (the steps it was trained with), got {nfe!r}"
            )
        return nfe

    def _check_noise(self, xT: Tensor, z: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        if not self.noise:
            if z is not None:
                raise ValueError("this generator takes no noise z (noise: false); pass z=None")
            return None
        if z is None:
            return standard_normal_like(xT, generator)
        if z.shape != xT.shape:
            raise ValueError(f"z of shape {tuple(z.shape)} must match xT of shape {tuple(xT.shape)}")
        return z
