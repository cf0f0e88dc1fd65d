"""The published teachers as their own code builds and runs them, for the import parity tests.

Networks come from guided-diffusion's own ``UNetModel`` (the ``guided-diffusion-sdk`` registry
package carries openai/guided-diffusion's ``guided_diffusion/unet.py`` unchanged; installed with
``--no-deps`` from ``requirements-reference.txt``). Around it, restated here in our words:

- I2SB's ``Image256Net`` (NVlabs/I2SB ``i2sb/network.py``, commit 0bbea4a): the network is fed
  ``noise_levels[step]`` with ``noise_levels = linspace(t0, T, interval) * interval``
  (``i2sb/runner.py``), and ``cat([x, cond])`` when trained with ``--cond-x1``.
- DDBM's ``UNetModel`` (alexzhou907/DDBM ``ddbm/unet.py``, commit 0b21ee6) with ``condition_mode
  concat``: ``cat([x, xT])``, twice the input channels. Its default flash attention splits the
  fused projection q|k|v-major, which is guided-diffusion's ``use_new_attention_order`` layout
  (``QKVAttention``); flash-attn itself needs CUDA, so on the CPU that module computes it.
- I2SB's diffusion (``i2sb/diffusion.py``, ``i2sb/runner.py``, ``i2sb/util.py``): beta schedule,
  ``compute_pred_x0``, ``p_posterior`` and ``ddpm_sampling`` over ``space_indices``.
- DDBM's VP preconditioning (``ddbm/karras_diffusion.py``: ``vp_logsnr``, ``vp_logs``,
  ``get_bridge_scalings``, ``denoise``), in float32 as there, and DBIM's first-order sampler
  (thu-ml/DiffusionBridge ``sample_dbim`` at ``eta = 0``), the sampler the paper runs DDBM with.

Noise comes from a callable ``draw(like)`` so both sides can be fed the same draws.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # its checkpoint helper uses deprecated amp decorators
    from guided_diffusion.unet import UNetModel

from ibmd_pipeline.teacher.importers import AdmArchitecture

Draw = Callable[[Tensor], Tensor]


def adm_unet(architecture: AdmArchitecture, *, in_channels: int | None = None) -> UNetModel:
    """guided-diffusion's ``UNetModel`` for ``architecture`` (float32, dropout 0, eval mode)."""
    return UNetModel(
        image_size=architecture.image_size,
        in_channels=architecture.in_channels if in_channels is None else in_channels,
        model_channels=architecture.model_channels,
        out_channels=architecture.out_channels,
        num_res_blocks=architecture.num_res_blocks,
        attention_resolutions=architecture.attention_rates,
        dropout=0.0,
        channel_mult=architecture.channel_mult,
        num_head_channels=architecture.num_head_channels,
        use_scale_shift_norm=architecture.use_scale_shift_norm,
        resblock_updown=architecture.resblock_updown,
        use_new_attention_order=architecture.attention_order == "qkv_major",
    ).eval()


def randomize_(module: nn.Module, generator: torch.Generator, scale: float = 0.05) -> nn.Module:
    """Perturb every parameter (a fresh ADM has zero output convolutions, which would hide errors)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


class Image256Net(nn.Module):
    """I2SB's wrapper: ``forward(x, steps, cond)`` runs the ADM net on ``noise_levels[steps]``."""

    def __init__(self, diffusion_model: UNetModel, noise_levels: Tensor, cond: bool):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.noise_levels = noise_levels
        self.cond = cond

    def forward(self, x: Tensor, steps: Tensor, cond: Tensor | None = None) -> Tensor:
        t = self.noise_levels[steps].detach()
        x = torch.cat([x, cond], dim=1) if self.cond else x
        return self.diffusion_model(x, t)


def i2sb_noise_levels(interval: int = 1000, t0: float = 1e-4, T: float = 1.0) -> Tensor:
    return torch.linspace(t0, T, interval) * interval


class DDBMUNet(nn.Module):
    """DDBM's concatenating network: ``forward(x, timesteps, xT) = net(cat([x, xT]), timesteps)``."""

    def __init__(self, net: UNetModel):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, timesteps: Tensor, xT: Tensor) -> Tensor:
        return self.net(torch.cat([x, xT], dim=1), timesteps)


# ------------------------------------------------------------------------------------------ I2SB


class I2SBDiffusion:
    """I2SB's discrete bridge: ``std_fwd``, ``std_bwd`` from the mirrored betas, float32 tables."""

    def __init__(self, beta_max: float = 0.3, interval: int = 1000):
        ramp = torch.linspace(1e-4**0.5, (beta_max / interval) ** 0.5, interval, dtype=torch.float64)
        betas = (ramp**2).numpy()
        betas = np.concatenate([betas[: interval // 2], np.flip(betas[: interval // 2])])
        std_fwd = np.sqrt(np.cumsum(betas))
        std_bwd = np.sqrt(np.flip(np.cumsum(np.flip(betas))))
        self.interval = interval
        self.std_fwd = torch.tensor(std_fwd, dtype=torch.float32)
        var = std_fwd**2 * std_bwd**2 / (std_fwd**2 + std_bwd**2)
        self.std_sb = torch.tensor(np.sqrt(var), dtype=torch.float32)

    def pred_x0(self, net: Image256Net, xt: Tensor, step: int, cond: Tensor | None) -> Tensor:
        steps = torch.full((xt.shape[0],), step, dtype=torch.long)
        out = net(xt, steps, cond=cond)
        return xt - self.std_fwd[steps][:, None, None, None] * out

    def p_posterior(self, nprev: int, n: int, x_n: Tensor, x0: Tensor, ot_ode: bool, draw: Draw) -> Tensor:
        std_n, std_nprev = self.std_fwd[n], self.std_fwd[nprev]
        std_delta = (std_n**2 - std_nprev**2).sqrt()
        denom = std_nprev**2 + std_delta**2
        mu_x0, mu_xn, var = std_delta**2 / denom, std_nprev**2 / denom, std_nprev**2 * std_delta**2 / denom
        xt_prev = mu_x0 * x0 + mu_xn * x_n
        if not ot_ode and nprev > 0:
            xt_prev = xt_prev + var.sqrt() * draw(xt_prev)
        return xt_prev


def space_indices(num_steps: int, count: int) -> list[int]:
    stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    position, taken = 0.0, []
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


def i2sb_sample(
    diffusion: I2SBDiffusion,
    net: Image256Net,
    x1: Tensor,
    nfe: int,
    *,
    ot_ode: bool,
    draw: Draw,
    mask: Tensor | None = None,
    cond: Tensor | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """I2SB's ``ddpm_sampling``: returns (the state at step 0, the states fed to the net, the predictions)."""
    steps = space_indices(diffusion.interval, nfe + 1)[::-1]
    xt, inputs, predictions = x1, [], []
    for prev_step, step in zip(steps[1:], steps[:-1], strict=True):
        inputs.append(xt)
        pred_x0 = diffusion.pred_x0(net, xt, step, cond)
        predictions.append(pred_x0)
        xt = diffusion.p_posterior(prev_step, step, xt, pred_x0, ot_ode, draw)
        if mask is not None:
            xt_true = x1
            if not ot_ode:
                xt_true = xt_true + diffusion.std_sb[prev_step] * draw(xt_true)
            xt = (1.0 - mask) * xt_true + mask * xt
    return xt, inputs, predictions


# ------------------------------------------------------------------------------------------ DDBM


def vp_logsnr(t: Tensor, beta_d: float, beta_min: float) -> Tensor:
    t = torch.as_tensor(t)
    return -torch.log((0.5 * beta_d * (t**2) + beta_min * t).exp() - 1)


def vp_logs(t: Tensor, beta_d: float, beta_min: float) -> Tensor:
    t = torch.as_tensor(t)
    return -0.25 * t**2 * beta_d - 0.5 * t * beta_min


def ddbm_abc(
    t: Tensor, beta_d: float = 2.0, beta_min: float = 0.1, t_max: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """DDBM's VP bridge ``(a_t, b_t, c_t^2)`` (``karras_diffusion.py``: its ``c_t`` is the variance)."""
    logsnr_t, logsnr_T = vp_logsnr(t, beta_d, beta_min), vp_logsnr(t_max, beta_d, beta_min)
    logs_t, logs_T = vp_logs(t, beta_d, beta_min), vp_logs(t_max, beta_d, beta_min)
    a_t = (logsnr_T - logsnr_t + logs_t - logs_T).exp()
    b_t = -torch.expm1(logsnr_T - logsnr_t) * logs_t.exp()
    c_t = -torch.expm1(logsnr_T - logsnr_t) * (2 * logs_t - logsnr_t).exp()
    return a_t, b_t, c_t


def ddbm_denoise(
    model: DDBMUNet, x_t: Tensor, sigmas: Tensor, xT: Tensor, sigma_data: float = 0.5, cov_xy: float = 0.0
) -> Tensor:
    """``KarrasDenoiser.denoise`` for ``pred_mode vp``: the bridge scalings around the network."""
    a_t, b_t, c_t = ddbm_abc(sigmas)
    big_a = a_t**2 * sigma_data**2 + b_t**2 * sigma_data**2 + 2 * a_t * b_t * cov_xy + c_t
    c_in = 1 / big_a**0.5
    c_skip = (b_t * sigma_data**2 + a_t * cov_xy) / big_a
    c_out = (a_t**2 * (sigma_data**4 - cov_xy**2) + sigma_data**2 * c_t) ** 0.5 * c_in
    c_skip, c_out, c_in = (c[:, None, None, None] for c in (c_skip, c_out, c_in))
    rescaled_t = 1000 * 0.25 * torch.log(sigmas + 1e-44)
    return c_out * model(c_in * x_t, rescaled_t, xT) + c_skip * x_t


def dbim_sample(
    model: DDBMUNet, xT: Tensor, ts: list[float], boot_noise: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """DBIM at ``eta = 0`` on the descending times ``ts`` (``ts[0] = T``): booting step then
    ``x_t = a_t xT + b_t x0_hat + c_t eps_hat``. Returns (states fed to the net, predictions)."""
    ones = xT.new_ones(xT.shape[0])

    def abc(t: float) -> tuple[Tensor, Tensor, Tensor]:
        a, b, c2 = ddbm_abc(torch.tensor(t, dtype=torch.float32))
        return a, b, c2.sqrt()

    inputs, predictions = [xT], []
    x0_hat = ddbm_denoise(model, xT, ts[0] * ones, xT)
    predictions.append(x0_hat)
    a, b, c = abc(ts[1])
    x = a * xT + b * x0_hat + c * boot_noise
    for s, t in zip(ts[1:-1], ts[2:], strict=True):
        inputs.append(x)
        x0_hat = ddbm_denoise(model, x, s * ones, xT)
        predictions.append(x0_hat)
        a_s, b_s, c_s = abc(s)
        a_t, b_t, c_t = abc(t)
        eps = (x - a_s * xT - b_s * x0_hat) / c_s
        x = a_t * xT + b_t * x0_hat + c_t * eps
    return inputs, predictions


def max_abs(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def float32_atol(values: Tensor, depth: int) -> float:
    """``depth`` float32 roundings of numbers of the size of ``values`` (``u = 6e-8``)."""
    return depth * float(values.abs().max()) * torch.finfo(torch.float32).eps / 2 + math.ulp(0.0)
