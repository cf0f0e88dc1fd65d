"""Diffusion-bridge schedules: the pure math of ``q(x_t | x0, xT)`` for I2SB and DDBM-VP teachers.

IBMD sec. 2.3 (docs/method.md sec. 2). A linear prior ``dx = f(t) x dt + g(t) dw`` has ``q(x_t | x0) =
N(alpha_t x0, sigma_t^2 I)``; pinning it at ``x_T = xT`` gives the bridge marginal

    q(x_t | x0, xT) = N(a_t xT + b_t x0, c_t^2 I)
    a_t = (alpha_t / alpha_T) SNR_T / SNR_t,  b_t = alpha_t (1 - SNR_T / SNR_t),
    c_t^2 = sigma_t^2 (1 - SNR_T / SNR_t).

Every quantity here is written with ``rho_t^2 = sigma_t^2 / alpha_t^2 = 1 / SNR_t`` and
``rhobar_t^2 = rho_T^2 - rho_t^2``, computed in float64, because the differences ``1 - SNR_T/SNR_t``
and ``sigma_t^2 - alpha_{t|s}^2 sigma_s^2`` lose all precision in float32 near both ends of the
bridge. Results are cast back to the dtype of the input.

Schedules are small immutable objects with no state beyond their parameters. Times are float
tensors of shape ``(B,)`` (any shape works); methods that multiply images broadcast the
per-sample coefficients to ``(B, 1, ..., 1)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ibmd_pipeline.engine.config import ConfigError, require

__all__ = [
    "BridgeConfig",
    "BridgeSchedule",
    "DDBMVPSchedule",
    "I2SBSchedule",
    "i2sb_betas",
    "make_schedule",
    "standard_normal_like",
]


@dataclass(frozen=True)
class BridgeConfig:
    """Parameters of a bridge schedule (Kedro ``params:<...>.bridge``).

    ``kind``: ``"i2sb"`` (unconditional bridge, symmetric discrete beta) or ``"ddbm_vp"``
    (conditional DDBM bridge over a VP prior).

    I2SB: ``beta_max`` (peak of the symmetric beta schedule; 0.3 for SR/JPEG, 1.0 for
    inpainting), ``n_timesteps`` (discretisation, even), ``ot_ode`` (deterministic OT-ODE
    variant: no noise in ``x_t`` nor in the sampler), ``noise_levels`` (what the network is told
    about the time: ``step_index`` feeds the step ``j``, as this project's own teachers are
    trained; ``i2sb`` feeds I2SB's table ``n * linspace(i2sb_t0, i2sb_T, n)[j]``, which its
    published checkpoints were trained with; ``i2sb_t0``/``i2sb_T`` are I2SB's ``--t0``/``--T``).

    DDBM-VP: ``beta_min``, ``beta_d`` (``beta(t) = beta_min + beta_d t``), ``t_min`` (end of the
    sampling grid, T = 1), ``sigma_data`` (std of both data ends for the preconditioning),
    ``cov_xy`` (their assumed covariance, DDBM's ``cov_xy``).
    """

    kind: Literal["i2sb", "ddbm_vp"] = "i2sb"
    beta_max: float = 0.3
    n_timesteps: int = 1000
    ot_ode: bool = False
    noise_levels: Literal["step_index", "i2sb"] = "step_index"
    i2sb_t0: float = 1e-4
    i2sb_T: float = 1.0
    beta_min: float = 0.1
    beta_d: float = 2.0
    t_min: float = 1e-4
    sigma_data: float = 0.5
    cov_xy: float = 0.0

    def validate(self, key: str = "") -> None:
        """Range checks; errors name the dotted key (``<key>.beta_max`` ...)."""

        def sub(name: str) -> str:
            return f"{key}.{name}" if key else name

        require(self.kind in ("i2sb", "ddbm_vp"), sub("kind"),
                f"got {self.kind!r}; allowed values: 'i2sb', 'ddbm_vp'")
        require(0.0 < self.beta_max <= 10.0, sub("beta_max"), f"must be in (0, 10], got {self.beta_max}")
        require(self.n_timesteps >= 2 and self.n_timesteps % 2 == 0, sub("n_timesteps"),
                f"must be an even integer >= 2 (the beta schedule is mirrored), got {self.n_timesteps}")
        require(self.beta_min >= 0.0, sub("beta_min"), f"must be >= 0, got {self.beta_min}")
        require(self.beta_d >= 0.0, sub("beta_d"), f"must be >= 0, got {self.beta_d}")
        require(self.beta_min + self.beta_d > 0.0, sub("beta_d"),
                f"beta_min + beta_d must be > 0, got {self.beta_min} + {self.beta_d}")
        require(0.0 < self.t_min < 0.5, sub("t_min"), f"must be in (0, 0.5), got {self.t_min}")
        require(self.sigma_data > 0.0, sub("sigma_data"), f"must be > 0, got {self.sigma_data}")
        require(abs(self.cov_xy) < self.sigma_data**2, sub("cov_xy"),
                f"must satisfy |cov_xy| < sigma_data^2 = {self.sigma_data**2} (else the DDBM output "
                f"scale vanishes at t = T), got {self.cov_xy}")
        require(not (self.ot_ode and self.kind != "i2sb"), sub("ot_ode"),
                f"the OT-ODE variant exists for kind 'i2sb' only, got kind {self.kind!r}")
        require(self.noise_levels in ("step_index", "i2sb"), sub("noise_levels"),
                f"got {self.noise_levels!r}; allowed values: 'step_index', 'i2sb'")
        require(self.noise_levels == "step_index" or self.kind == "i2sb", sub("noise_levels"),
                f"'i2sb' noise levels exist for kind 'i2sb' only, got kind {self.kind!r}")
        require(0.0 <= self.i2sb_t0 < self.i2sb_T, sub("i2sb_t0"),
                f"must satisfy 0 <= i2sb_t0 < i2sb_T, got {self.i2sb_t0} and {self.i2sb_T}")


def make_schedule(config: BridgeConfig) -> BridgeSchedule:
    """Build the schedule described by ``config`` (validated here, so bad values fail early)."""
    if not isinstance(config, BridgeConfig):
        raise TypeError(f"make_schedule expects a BridgeConfig, got {type(config).__name__}")
    config.validate("bridge")
    if config.kind == "i2sb":
        return I2SBSchedule(
            beta_max=config.beta_max,
            n_timesteps=config.n_timesteps,
            ot_ode=config.ot_ode,
            noise_levels=config.noise_levels,
            i2sb_t0=config.i2sb_t0,
            i2sb_T=config.i2sb_T,
        )
    if config.kind == "ddbm_vp":
        return DDBMVPSchedule(
            beta_min=config.beta_min,
            beta_d=config.beta_d,
            t_min=config.t_min,
            sigma_data=config.sigma_data,
            cov_xy=config.cov_xy,
        )
    raise ConfigError("bridge.kind", f"got {config.kind!r}; allowed values: 'i2sb', 'ddbm_vp'")


# --------------------------------------------------------------------------------------------
# helpers


def _as_time(t: Tensor | float) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` (or scalar) coefficient as ``(B, 1, ..., 1)`` in the dtype/device of ``like``."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def standard_normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``; drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)


# --------------------------------------------------------------------------------------------
# the interface


class BridgeSchedule(ABC):
    """One bridge: alpha/sigma of the prior, bridge coefficients, posterior step, preconditioning.

    Subclasses provide ``_alpha_rho2(t)`` (float64 ``alpha_t``, ``rho_t^2 = sigma_t^2/alpha_t^2``,
    ``rho_T^2 - rho_t^2``), the training time distribution, the sampling grid and the network
    preconditioning; everything else is the general formula of docs/method.md sec. 2.
    """

    T: float = 1.0
    t_min: float

    @property
    def deterministic(self) -> bool:
        """True for the OT-ODE variant: ``c_t = 0`` in ``x_t`` and no noise in the sampler."""
        return False

    # -- the prior ---------------------------------------------------------------------------

    @abstractmethod
    def _alpha_rho2(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """float64 ``(alpha_t, rho_t^2, rho_T^2 - rho_t^2)`` for float64 ``t``."""

    def _prior64(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        t = _as_time(t)
        alpha, rho2, rho2_bar = self._alpha_rho2(t.to(torch.float64))
        return alpha, rho2, rho2_bar, _out_dtype(t)

    @property
    def alpha_T(self) -> float:
        """``alpha`` at the pinned end ``t = T``."""
        return float(self._alpha_rho2(torch.tensor(self.T, dtype=torch.float64))[0])

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale of the prior ``q(x_t | x0) = N(alpha_t x0, sigma_t^2 I)``."""
        alpha, _, _, dtype = self._prior64(t)
        return alpha.to(dtype)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise std of the prior ``q(x_t | x0)``."""
        alpha, rho2, _, dtype = self._prior64(t)
        return (alpha * rho2.sqrt()).to(dtype)

    # -- the bridge --------------------------------------------------------------------------

    def coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(a_t, b_t, c_t)`` of the bridge marginal ``x_t = a_t xT + b_t x0 + c_t eps``.

        IBMD sec. 2.3 (docs/method.md sec. 2), with ``SNR_T / SNR_t = rho_t^2 / rho_T^2`` and
        ``1 - SNR_T / SNR_t = rhobar_t^2 / rho_T^2``. ``rho_T^2`` is summed at ``t`` as
        ``rho_t^2 + rhobar_t^2``, so ``a_t`` and ``b_t`` share one denominator: for I2SB
        (``alpha = 1``) this is its Gaussian product, operation for operation,
        ``x_t = sb2/(s2+sb2) x0 + s2/(s2+sb2) xT + sqrt(s2 sb2/(s2+sb2)) eps``
        (``compute_gaussian_product_coef``), whose ``a_t + b_t`` is 1 to rounding.
        ``c_t`` is zero for a deterministic (OT-ODE) schedule.
        """
        alpha, rho2, rho2_bar, dtype = self._prior64(t)
        rho2_T = rho2 + rho2_bar
        a = alpha / self.alpha_T * rho2 / rho2_T
        b = alpha * rho2_bar / rho2_T
        if self.deterministic:
            c = torch.zeros_like(rho2)
        else:
            c = alpha * (rho2 * rho2_bar / rho2_T).clamp_min(0.0).sqrt()
        return a.to(dtype), b.to(dtype), c.to(dtype)

    def sample_marginal(
        self,
        x0: Tensor,
        xT: Tensor,
        t: Tensor | float,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``x_t ~ q(x_t | x0, xT)``; differentiable in ``x0`` and ``xT`` (the graph is kept).

        ``noise`` (standard normal, shaped like ``x0``) is drawn from ``generator`` when omitted;
        a deterministic schedule uses no noise.
        """
        a, b, c = self.coefficients(t)
        x_t = _per_sample(a, x0) * xT + _per_sample(b, x0) * x0
        if self.deterministic:
            return x_t
        if noise is None:
            noise = standard_normal_like(x0, generator)
        return x_t + _per_sample(c, x0) * noise

    # -- the reverse step --------------------------------------------------------------------

    def posterior_coefficients(self, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(coef_x0, coef_xt, std)`` of ``q(x_s | x_t, x0)`` for ``s < t`` (docs/method.md sec. 2).

        mean = alpha_s sigma_{t|s}^2 / sigma_t^2 x0 + alpha_{t|s} sigma_s^2 / sigma_t^2 x_t,
        var = sigma_s^2 sigma_{t|s}^2 / sigma_t^2, with sigma_{t|s}^2 = alpha_t^2 (rho_t^2 - rho_s^2).
        The bridge is the prior conditioned on x_T and is Markov, so this is also the bridge's
        posterior; for I2SB it is its ``p_posterior``, ``N((s2_t - s2_s)/s2_t x0 + s2_s/s2_t x_t,
        s2_s (s2_t - s2_s)/s2_t)``. ``s = 0`` gives mean ``x0`` and zero variance. ``std = 0`` for a
        deterministic (OT-ODE) schedule.
        """
        t = _as_time(t)
        alpha_t, rho2_t, _, dtype = self._prior64(t)
        alpha_s, rho2_s, _, _ = self._prior64(_as_time(s).to(t.device))
        gap = (rho2_t - rho2_s).clamp_min(0.0)
        coef_x0 = alpha_s * gap / rho2_t
        coef_xt = alpha_s / alpha_t * rho2_s / rho2_t
        if self.deterministic:
            std = torch.zeros_like(gap)
        else:
            std = alpha_s * (rho2_s * gap / rho2_t).sqrt()
        return coef_x0.to(dtype), coef_xt.to(dtype), std.to(dtype)

    def posterior_step(
        self,
        x_t: Tensor,
        x0_hat: Tensor,
        t: Tensor | float,
        s: Tensor | float,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``x_s ~ q(x_s | x_t, x0 = x0_hat)`` (the ancestral sampler step, I2SB's ``p_posterior``).

        Deterministic schedules return the posterior mean. Passing ``noise=torch.zeros_like(x_t)``
        also gives the mean (a sampler's last step).
        """
        coef_x0, coef_xt, std = self.posterior_coefficients(t, s)
        x_s = _per_sample(coef_x0, x_t) * x0_hat + _per_sample(coef_xt, x_t) * x_t
        if self.deterministic:
            return x_s
        if noise is None:
            noise = standard_normal_like(x_t, generator)
        return x_s + _per_sample(std, x_t) * noise

    # -- training and sampling ---------------------------------------------------------------

    @abstractmethod
    def sample_time(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """float32 ``(batch,)`` training times in ``[t_min, T]``, the teacher's own distribution."""

    @abstractmethod
    def grid(self, nfe: int) -> Tensor:
        """float64 ``(nfe + 1,)`` sampling times, descending from ``T`` to ``t_min`` (teacher's grid)."""

    @abstractmethod
    def preconditioning(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` with ``x0_hat = c_skip x_t + c_out F(c_in x_t, c_noise)``."""

    def loss_weight(self, t: Tensor | float) -> Tensor:
        """``lambda(t) = 1 / c_out^2``: the weight that makes the loss ``||F - F_target||^2``."""
        _, c_out, _, _ = self.preconditioning(_as_time(t).to(torch.float64))
        return (1.0 / c_out.square()).to(_out_dtype(_as_time(t)))

    @staticmethod
    def _check_nfe(nfe: int) -> None:
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")


def _sample_uniform(
    batch: int, generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    draw_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float64)
    return u if device is None else u.to(device)


# --------------------------------------------------------------------------------------------
# I2SB


def i2sb_betas(beta_max: float, n_timesteps: int) -> Tensor:
    """I2SB's symmetric per-step betas (float64, ``(n_timesteps,)``).

    ``linspace(sqrt(1e-4), sqrt(beta_max / n), n)^2``, its first half, then that half mirrored:
    small at both ends of the bridge (docs/method.md sec. 2.1).
    """
    ramp = torch.linspace(1e-4**0.5, (beta_max / n_timesteps) ** 0.5, n_timesteps, dtype=torch.float64) ** 2
    half = ramp[: n_timesteps // 2]
    return torch.cat([half, half.flip(0)])


class I2SBSchedule(BridgeSchedule):
    """I2SB bridge: ``alpha_t = 1``, ``sigma_t^2 = s2(t) = int_0^t beta``, ``sb2(t) = int_t^T beta``.

    Continuous time ``t in [0, 1]`` covers the ``n`` discrete steps: beta is piecewise constant,
    step ``i`` occupying ``[i/n, (i+1)/n)`` with mass ``beta_i``, so ``s2`` and ``sb2`` are the
    exact, piecewise-linear integrals and any ``t`` works. I2SB's step index ``j`` (its
    ``std_fwd[j]^2`` sums ``beta_0..beta_j``) is ``t = (j + 1) / n``; ``t_min = 1 / n`` is step 0.

    ``noise_levels`` chooses the network's time input ``c_noise`` (see :class:`BridgeConfig`):
    the step index ``j``, or I2SB's own table (``Runner.__init__`` in NVlabs/I2SB
    ``i2sb/runner.py``: ``noise_levels = torch.linspace(t0, T, n) * n``, indexed by the step),
    built here in float32 exactly as there.

    With ``alpha = 1`` the general bridge and posterior formulas are I2SB's own Gaussian products
    (``compute_gaussian_product_coef`` and ``p_posterior``), with the same arithmetic.
    """

    def __init__(
        self,
        beta_max: float = 0.3,
        n_timesteps: int = 1000,
        ot_ode: bool = False,
        noise_levels: str = "step_index",
        i2sb_t0: float = 1e-4,
        i2sb_T: float = 1.0,
    ):
        if n_timesteps < 2 or n_timesteps % 2 or beta_max <= 0:
            raise ValueError(
                f"I2SB needs an even n_timesteps >= 2 and beta_max > 0, got {n_timesteps}, {beta_max}"
            )
        if noise_levels not in ("step_index", "i2sb"):
            raise ValueError(f"noise_levels must be 'step_index' or 'i2sb', got {noise_levels!r}")
        self.beta_max = float(beta_max)
        self.n_timesteps = int(n_timesteps)
        self.ot_ode = bool(ot_ode)
        self.noise_levels = noise_levels
        self.i2sb_t0 = float(i2sb_t0)
        self.i2sb_T = float(i2sb_T)
        # I2SB's float32 table, kept in float64 (exactly the same values) for interpolation.
        self._level_table = (
            torch.linspace(self.i2sb_t0, self.i2sb_T, self.n_timesteps, dtype=torch.float32)
            * self.n_timesteps
        ).to(torch.float64)
        self.T = 1.0
        self.t_min = 1.0 / self.n_timesteps
        betas = i2sb_betas(self.beta_max, self.n_timesteps)
        zero = torch.zeros(1, dtype=torch.float64)
        # s2 at the knots t = k/n, and sb2 summed from the other end so it is exact near T.
        self._betas = betas
        self._s2_knots = torch.cat([zero, betas.cumsum(0)])
        self._sb2_knots = torch.cat([betas.flip(0).cumsum(0).flip(0), zero])
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        levels = "" if self.noise_levels == "step_index" else (
            f", noise_levels='i2sb', i2sb_t0={self.i2sb_t0}, i2sb_T={self.i2sb_T}"
        )
        return (
            f"I2SBSchedule(beta_max={self.beta_max}, n_timesteps={self.n_timesteps}, "
            f"ot_ode={self.ot_ode}{levels})"
        )

    @property
    def deterministic(self) -> bool:
        return self.ot_ode

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        # The lookup tables are tiny; one copy per device avoids a host transfer every call.
        if device not in self._tables:
            self._tables[device] = (
                self._betas.to(device),
                self._s2_knots.to(device),
                self._sb2_knots.to(device),
            )
        return self._tables[device]

    def s2_sb2(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """float64 ``(s2(t), sb2(t))``: beta integrated from 0 to t and from t to T."""
        t = _as_time(t).to(torch.float64)
        betas, s2_knots, sb2_knots = self._table(t.device)
        pos = t * self.n_timesteps
        idx = pos.floor().clamp(0, self.n_timesteps - 1)
        frac = pos - idx
        idx = idx.long()
        step_beta = betas[idx]
        return s2_knots[idx] + frac * step_beta, sb2_knots[idx] - frac * step_beta

    def _alpha_rho2(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s2, sb2 = self.s2_sb2(t)
        return torch.ones_like(s2), s2, sb2

    @property
    def alpha_T(self) -> float:
        return 1.0

    def sample_time(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Uniform over I2SB's discrete steps ``j = 0..n-1``, i.e. ``t = (j + 1) / n``."""
        draw_device = generator.device if generator is not None else device
        step = torch.randint(0, self.n_timesteps, (batch,), generator=generator, device=draw_device)
        t = (step + 1).to(torch.float32) / self.n_timesteps
        return t if device is None else t.to(device)

    def grid(self, nfe: int) -> Tensor:
        """I2SB's ``space_indices(n, nfe + 1)``: ``nfe + 1`` step indices evenly spread over ``0..n-1``.

        Returned as times ``(j + 1) / n`` from ``T = 1`` down to ``t_min = 1 / n``. The indices are
        I2SB's own (``i2sb/util.py``: a float stride ``(n - 1) / nfe`` accumulated and rounded
        with Python's ``round``, half to even), so a sampler visits exactly the steps I2SB's
        ``ddpm_sampling`` visits; ``nfe`` may not exceed ``n - 1``.
        """
        self._check_nfe(nfe)
        if nfe > self.n_timesteps - 1:
            raise ValueError(
                f"nfe must be at most n_timesteps - 1 = {self.n_timesteps - 1} for this I2SB "
                f"schedule, got {nfe}"
            )
        stride, position, steps = (self.n_timesteps - 1) / nfe, 0.0, []
        for _ in range(nfe + 1):
            steps.append(round(position))
            position += stride
        return ((torch.tensor(steps, dtype=torch.float64) + 1) / self.n_timesteps).flip(0)

    def step_index(self, t: Tensor | float) -> Tensor:
        """I2SB's (continuous) step index ``j = n t - 1``: ``t_min`` is step 0, ``T`` is step ``n - 1``."""
        t = _as_time(t)
        return (t.to(torch.float64) * self.n_timesteps - 1.0).to(_out_dtype(t))

    def network_noise_level(self, t: Tensor | float) -> Tensor:
        """float64 ``c_noise`` at ``t``: the step index, or I2SB's table at that step.

        Table lookups snap a step index within 1e-3 of an integer to it (float32 times such as
        ``(j + 1) / n`` are off by ~1e-5 steps), so the network sees exactly I2SB's float32
        value there; between steps the table is interpolated linearly.
        """
        step = self.step_index(_as_time(t).to(torch.float64))
        if self.noise_levels == "step_index":
            return step
        table = self._level_table.to(step.device)
        nearest = step.round()
        step = torch.where((step - nearest).abs() < 1e-3, nearest, step).clamp(0, self.n_timesteps - 1)
        index = step.floor().clamp(max=self.n_timesteps - 2)
        frac = step - index
        index = index.long()
        return table[index] + frac * (table[index + 1] - table[index])

    def preconditioning(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """I2SB: the network predicts ``(x_t - x0) / std_fwd``, so ``x0 = x_t - sigma_t F``.

        ``c_skip = 1``, ``c_out = -sigma_t``, ``c_in = 1``, ``c_noise`` = the step index ``n t - 1``
        or I2SB's noise level of that step (``noise_levels``).
        """
        t = _as_time(t)
        s2, _ = self.s2_sb2(t)
        dtype = _out_dtype(t)
        ones = torch.ones_like(s2)
        # The step index stays in t's own dtype; I2SB's table values are float32 numbers in float64.
        c_noise = self.step_index(t) if self.noise_levels == "step_index" else self.network_noise_level(t)
        return ones.to(dtype), (-s2.sqrt()).to(dtype), ones.to(dtype), c_noise.to(s2.device)


# --------------------------------------------------------------------------------------------
# DDBM VP


class DDBMVPSchedule(BridgeSchedule):
    """DDBM bridge over the VP prior ``beta(t) = beta_min + beta_d t``, ``t in [t_min, 1]``.

    ``alpha_t = exp(-0.5 beta_min t - 0.25 beta_d t^2)``,
    ``rho_t^2 = sigma_t^2 / alpha_t^2 = exp(beta_min t + 0.5 beta_d t^2) - 1`` (docs/method.md sec. 2.2).
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_d: float = 2.0,
        t_min: float = 1e-4,
        sigma_data: float = 0.5,
        cov_xy: float = 0.0,
    ):
        if not (0.0 < t_min < 1.0 and sigma_data > 0 and abs(cov_xy) < sigma_data**2):
            raise ValueError(
                f"DDBM-VP needs 0 < t_min < 1, sigma_data > 0, |cov_xy| < sigma_data^2; "
                f"got t_min={t_min}, sigma_data={sigma_data}, cov_xy={cov_xy}"
            )
        self.beta_min = float(beta_min)
        self.beta_d = float(beta_d)
        self.t_min = float(t_min)
        self.T = 1.0
        self.sigma_data = float(sigma_data)
        self.cov_xy = float(cov_xy)
        self._log_growth_T = self._log_growth(self.T)

    def __repr__(self) -> str:
        return (
            f"DDBMVPSchedule(beta_min={self.beta_min}, beta_d={self.beta_d}, t_min={self.t_min}, "
            f"sigma_data={self.sigma_data}, cov_xy={self.cov_xy})"
        )

    def _log_growth(self, t: Tensor | float) -> Tensor | float:
        # int_0^t beta = beta_min t + beta_d t^2 / 2 = -2 log alpha_t
        return self.beta_min * t + 0.5 * self.beta_d * t * t

    def _alpha_rho2(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        growth = self._log_growth(t)
        alpha = torch.exp(-0.5 * growth)
        rho2 = torch.expm1(growth)
        # rho_T^2 - rho_t^2 = e^{g_t} (e^{g_T - g_t} - 1): exact near T where the plain difference cancels
        rho2_bar = torch.exp(growth) * torch.expm1(self._log_growth_T - growth)
        return alpha, rho2, rho2_bar

    @property
    def alpha_T(self) -> float:
        return math.exp(-0.5 * self._log_growth_T)

    def sample_time(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """DDBM's ``real-uniform`` sampler: ``t ~ U[t_min, T)``."""
        u = _sample_uniform(batch, generator, device)
        return (self.t_min + (self.T - self.t_min) * u).to(torch.float32)

    def grid(self, nfe: int) -> Tensor:
        """Uniform in ``t`` from ``T`` to ``t_min`` (DBIM's spacing for its bridge sampler)."""
        self._check_nfe(nfe)
        return torch.linspace(self.T, self.t_min, nfe + 1, dtype=torch.float64)

    def preconditioning(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """DDBM's bridge preconditioning (EDM-style, for ``x_t = a xT + b x0 + c eps``).

        With ``Var x0 = Var xT = sigma_data^2``, ``Cov(x0, xT) = cov_xy`` and
        ``A = a^2 sd^2 + b^2 sd^2 + 2 a b cov + c^2 = Var x_t``:
        ``c_in = A^{-1/2}``, ``c_skip = (b sd^2 + a cov) / A`` (the regression of x0 on x_t) and
        ``c_out = sqrt(a^2 (sd^4 - cov^2) + sd^2 c^2) / sqrt(A)`` (its residual std);
        ``c_noise = 1000 * 0.25 * log(t)``.
        """
        t = _as_time(t)
        a, b, c = self.coefficients(t.to(torch.float64))
        sd2, cov = self.sigma_data**2, self.cov_xy
        var_xt = a * a * sd2 + b * b * sd2 + 2.0 * a * b * cov + c * c
        c_in = var_xt.rsqrt()
        c_skip = (b * sd2 + a * cov) / var_xt
        c_out = (a * a * (sd2 * sd2 - cov * cov) + sd2 * c * c).sqrt() * c_in
        c_noise = 250.0 * torch.log(t.to(torch.float64).clamp_min(1e-44))
        dtype = _out_dtype(t)
        return c_skip.to(dtype), c_out.to(dtype), c_in.to(dtype), c_noise.to(dtype)
