"""Bridge schedules against closed forms: boundaries, Monte-Carlo moments, posterior consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ibmd_pipeline.bridges.schedules import (
    BridgeConfig,
    DDBMVPSchedule,
    I2SBSchedule,
    i2sb_betas,
    make_schedule,
)
from ibmd_pipeline.engine.config import ConfigError, parse_config

SCHEDULES = {
    "i2sb": lambda: make_schedule(BridgeConfig(kind="i2sb", beta_max=0.3)),
    "i2sb_inpaint": lambda: make_schedule(BridgeConfig(kind="i2sb", beta_max=1.0)),
    "ddbm_vp": lambda: make_schedule(BridgeConfig(kind="ddbm_vp")),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


def snr_formula(alpha_t, sigma_t, alpha_T, sigma_T):
    """IBMD sec. 2.3 (docs/method.md sec. 2), written exactly as there (float64 numpy)."""
    snr_t, snr_T = alpha_t**2 / sigma_t**2, alpha_T**2 / sigma_T**2
    a = alpha_t / alpha_T * snr_T / snr_t
    b = alpha_t * (1 - snr_T / snr_t)
    c = np.sqrt(sigma_t**2 * (1 - snr_T / snr_t))
    return a, b, c


def reference_prior(schedule, t: np.ndarray):
    """(alpha_t, sigma_t) from docs/method.md sec. 2.1-2.2, independently of the library (float64)."""
    if isinstance(schedule, DDBMVPSchedule):
        growth = schedule.beta_min * t + 0.5 * schedule.beta_d * t**2
        alpha = np.exp(-0.5 * growth)
        return alpha, alpha * np.sqrt(np.expm1(growth))
    # I2SB: beta_i piecewise constant on [i/n, (i+1)/n); sigma^2 = integral of beta from 0 to t
    n = schedule.n_timesteps
    ramp = np.linspace(1e-4**0.5, (schedule.beta_max / n) ** 0.5, n) ** 2
    betas = np.concatenate([ramp[: n // 2], ramp[: n // 2][::-1]])
    knots = np.concatenate([[0.0], np.cumsum(betas)])
    s2 = np.interp(t, np.arange(n + 1) / n, knots)
    return np.ones_like(t), np.sqrt(s2)


# ---------------------------------------------------------------------------------------------
# config


def test_config_parses_and_builds_both_kinds():
    i2sb = parse_config(BridgeConfig, {"kind": "i2sb", "beta_max": 1.0, "ot_ode": True}, "teacher.bridge")
    ddbm = parse_config(
        BridgeConfig, {"kind": "ddbm_vp", "sigma_data": 0.5, "cov_xy": 0.125}, "teacher.bridge"
    )
    assert isinstance(make_schedule(i2sb), I2SBSchedule) and make_schedule(i2sb).deterministic
    assert isinstance(make_schedule(ddbm), DDBMVPSchedule) and not make_schedule(ddbm).deterministic


@pytest.mark.parametrize(
    "mapping, key",
    [
        ({"kind": "ve"}, "teacher.bridge.kind"),
        ({"beta_max": 0.0}, "teacher.bridge.beta_max"),
        ({"n_timesteps": 999}, "teacher.bridge.n_timesteps"),
        ({"kind": "ddbm_vp", "t_min": 0.0}, "teacher.bridge.t_min"),
        ({"kind": "ddbm_vp", "sigma_data": -1.0}, "teacher.bridge.sigma_data"),
        ({"kind": "ddbm_vp", "cov_xy": 0.25}, "teacher.bridge.cov_xy"),
        ({"kind": "ddbm_vp", "ot_ode": True}, "teacher.bridge.ot_ode"),
        ({"beta_min": -0.1}, "teacher.bridge.beta_min"),
        ({"unknown": 1}, "teacher.bridge.unknown"),
    ],
)
def test_config_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as err:
        parse_config(BridgeConfig, mapping, "teacher.bridge")
    assert err.value.key == key


def test_make_schedule_rejects_an_unknown_kind_built_directly():
    with pytest.raises(ConfigError, match="kind"):
        make_schedule(BridgeConfig(kind="ve"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the prior and the bridge coefficients


def test_i2sb_betas_are_symmetric_and_match_the_discrete_std():
    betas = i2sb_betas(0.3, 1000)
    assert betas.shape == (1000,)
    assert torch.equal(betas, betas.flip(0))
    assert betas[0].item() == pytest.approx(1e-4)
    ramp = torch.linspace(1e-2, (0.3 / 1000) ** 0.5, 1000, dtype=torch.float64) ** 2
    assert betas.max().item() == pytest.approx(ramp[499].item())
    schedule = I2SBSchedule(beta_max=0.3)
    # I2SB's std_fwd[j]^2 = sum(beta_0..beta_j) is sigma^2 at t = (j + 1) / n
    steps = torch.tensor([0, 1, 499, 998, 999])
    t = (steps + 1).double() / 1000
    torch.testing.assert_close(schedule.sigma(t) ** 2, betas.cumsum(0)[steps], rtol=1e-12, atol=0)


def test_alpha_sigma_match_the_method_doc_formulas(schedule):
    t = np.linspace(0.0, 1.0, 97)
    alpha, sigma = reference_prior(schedule, t)
    t64 = torch.from_numpy(t)
    np.testing.assert_allclose(schedule.alpha(t64).numpy(), alpha, rtol=1e-12)
    np.testing.assert_allclose(schedule.sigma(t64).numpy(), sigma, rtol=1e-10, atol=1e-15)


def test_coefficients_equal_the_snr_formula(schedule):
    t = np.linspace(0.02, 0.98, 49)
    alpha, sigma = reference_prior(schedule, t)
    alpha_T, sigma_T = reference_prior(schedule, np.array([1.0]))
    a, b, c = snr_formula(alpha, sigma, alpha_T, sigma_T)
    got = schedule.coefficients(torch.from_numpy(t))
    for value, expected in zip(got, (a, b, c), strict=True):
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_i2sb_coefficients_are_its_gaussian_product_operation_for_operation():
    """With alpha = 1 the general formula does I2SB's own arithmetic (compute_gaussian_product_coef),
    so its bits are I2SB's: compared with no tolerance."""
    for beta_max in (0.3, 1.0):
        schedule = I2SBSchedule(beta_max=beta_max)
        t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
        s2, sb2 = schedule.s2_sb2(t)
        denom = s2 + sb2
        expected = (s2 / denom, sb2 / denom, (s2 * sb2 / denom).sqrt())
        for got, want in zip(schedule.coefficients(t), expected, strict=True):
            assert torch.equal(got, want)
        t32 = (torch.arange(1000) + 1).to(torch.float32) / 1000  # every training time
        s2, sb2 = schedule.s2_sb2(t32)
        denom = s2 + sb2
        expected = (s2 / denom, sb2 / denom, (s2 * sb2 / denom).sqrt())
        for got, want in zip(schedule.coefficients(t32), expected, strict=True):
            assert torch.equal(got, want.float())
    # and the I2SB weights are a convex combination (alpha = 1)
    a, b, _ = schedule.coefficients(t)
    torch.testing.assert_close(a + b, torch.ones_like(t), rtol=0, atol=1e-14)


def test_i2sb_posterior_is_its_p_posterior_operation_for_operation():
    schedule = I2SBSchedule(beta_max=1.0)
    t = torch.linspace(0.01, 1.0, 200, dtype=torch.float64)
    s = t * torch.linspace(0.0, 0.99, 200, dtype=torch.float64)
    s2_t, s2_s = schedule.s2_sb2(t)[0], schedule.s2_sb2(s)[0]
    delta = (s2_t - s2_s).clamp_min(0.0)
    expected = (delta / s2_t, s2_s / s2_t, (s2_s * delta / s2_t).sqrt())
    for got, want in zip(schedule.posterior_coefficients(t, s), expected, strict=True):
        assert torch.equal(got, want)


def test_boundaries_pin_x0_and_xT(schedule):
    a0, b0, c0 = schedule.coefficients(torch.tensor([0.0], dtype=torch.float64))
    aT, bT, cT = schedule.coefficients(torch.tensor([schedule.T], dtype=torch.float64))
    assert a0.item() == 0.0 and b0.item() == pytest.approx(1.0, abs=1e-15) and c0.item() == 0.0
    assert aT.item() == pytest.approx(1.0, abs=1e-15) and bT.item() == 0.0 and cT.item() == 0.0
    x0, xT = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(schedule.sample_marginal(x0, xT, torch.zeros(4)), x0)
    torch.testing.assert_close(schedule.sample_marginal(x0, xT, torch.ones(4)), xT)
    # at the sampler's final time the bridge is within O(sigma(t_min)) of x0
    a, b, c = schedule.coefficients(torch.tensor([schedule.t_min], dtype=torch.float64))
    assert a.item() < 1e-3 and abs(b.item() - 1.0) < 1e-3 and c.item() < 1.1e-2


def test_small_t_keeps_relative_precision_in_float32():
    schedule = DDBMVPSchedule()
    t = torch.tensor([1e-7, 1e-6, 1e-5], dtype=torch.float32)
    a, b, c = schedule.coefficients(t)
    assert a.dtype == torch.float32
    g = 0.1 * t.double() + t.double() ** 2
    g_T = 1.1
    expected_a = torch.exp(-0.5 * g) / math.exp(-0.5 * g_T) * torch.expm1(g) / math.expm1(g_T)
    torch.testing.assert_close(a.double(), expected_a, rtol=1e-6, atol=0)
    assert torch.all(c > 0)


def test_dtype_follows_the_input(schedule):
    for dtype in (torch.float32, torch.float64):
        t = torch.full((3,), 0.5, dtype=dtype)
        assert all(v.dtype == dtype for v in schedule.coefficients(t))
        assert all(v.dtype == dtype for v in schedule.preconditioning(t))
        assert schedule.loss_weight(t).dtype == dtype
        x = torch.zeros(3, 1, 2, 2, dtype=dtype)
        assert schedule.sample_marginal(x, x, t).dtype == dtype


# ---------------------------------------------------------------------------------------------
# Monte-Carlo moments


@pytest.mark.parametrize("t_value", [0.05, 0.3, 0.7, 0.95])
def test_marginal_moments_match_the_formula(schedule, t_value):
    generator = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    xT = torch.full((n, 1, 1, 1), -0.4)
    alpha, sigma = reference_prior(schedule, np.array([t_value]))
    alpha_T, sigma_T = reference_prior(schedule, np.array([1.0]))
    a, b, c = (float(v[0]) for v in snr_formula(alpha, sigma, alpha_T, sigma_T))
    x_t = schedule.sample_marginal(x0, xT, torch.full((n,), t_value), generator=generator)
    mean, std = x_t.mean().item(), x_t.std().item()
    assert mean == pytest.approx(a * -0.4 + b * 0.7, abs=5 * c / math.sqrt(n))
    assert std == pytest.approx(c, rel=5 / math.sqrt(2 * n))


@pytest.mark.parametrize("t_value, s_value", [(1.0, 0.6), (0.8, 0.5), (0.5, 0.1), (0.2, 0.01)])
def test_posterior_step_with_the_true_x0_gives_the_marginal_at_s(schedule, t_value, s_value):
    generator = torch.Generator().manual_seed(2)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    xT = torch.full((n, 1, 1, 1), -1.0)
    t, s = torch.full((n,), t_value), torch.full((n,), s_value)
    x_t = schedule.sample_marginal(x0, xT, t, generator=generator)
    x_s = schedule.posterior_step(x_t, x0, t, s, generator=generator)
    a, b, c = (v[0].item() for v in schedule.coefficients(torch.tensor([s_value], dtype=torch.float64)))
    assert x_s.mean().item() == pytest.approx(a * -1.0 + b * 0.5, abs=5 * c / math.sqrt(n))
    assert x_s.std().item() == pytest.approx(c, rel=5 / math.sqrt(2 * n))
    # and the pair has the bridge's covariance alpha_s alpha_t rho_s^2 (rho_T^2 - rho_t^2) / rho_T^2
    (alpha_s, alpha_t, alpha_T), (sigma_s, sigma_t, sigma_T) = reference_prior(
        schedule, np.array([s_value, t_value, 1.0])
    )
    rho2_s, rho2_t, rho2_T = (sigma_s / alpha_s) ** 2, (sigma_t / alpha_t) ** 2, (sigma_T / alpha_T) ** 2
    bridge_cov = alpha_s * alpha_t * rho2_s * (rho2_T - rho2_t) / rho2_T
    cov = ((x_t - x_t.mean()) * (x_s - x_s.mean())).mean().item()
    c_t = schedule.coefficients(t[:1].double())[2].item()
    assert cov == pytest.approx(bridge_cov, abs=6 * c_t * c / math.sqrt(n) + 1e-9)


def test_posterior_at_s_zero_is_x0(schedule):
    x_t, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.full((3,), 0.5)
    out = schedule.posterior_step(x_t, x0, t, torch.zeros(3))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# OT-ODE


def test_ot_ode_has_no_noise_anywhere():
    schedule = make_schedule(BridgeConfig(kind="i2sb", beta_max=1.0, ot_ode=True))
    stochastic = make_schedule(BridgeConfig(kind="i2sb", beta_max=1.0))
    assert schedule.deterministic and not stochastic.deterministic
    t = torch.linspace(0.05, 1.0, 20)
    a, b, c = schedule.coefficients(t)
    assert torch.all(c == 0)
    torch.testing.assert_close(a, stochastic.coefficients(t)[0])
    x0, xT = torch.randn(20, 1, 3, 3), torch.randn(20, 1, 3, 3)
    x_t = schedule.sample_marginal(x0, xT, t, noise=torch.randn(20, 1, 3, 3))
    torch.testing.assert_close(x_t, a.view(-1, 1, 1, 1) * xT + b.view(-1, 1, 1, 1) * x0)
    assert torch.all(schedule.posterior_coefficients(t, t / 2)[2] == 0)
    x_s = schedule.posterior_step(x_t, x0, t, t / 2, noise=torch.randn_like(x_t))
    # with the true x0, the noiseless posterior mean stays on the deterministic bridge
    a_s, b_s, _ = schedule.coefficients(t / 2)
    expected = a_s.view(-1, 1, 1, 1) * xT + b_s.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(x_s, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# preconditioning


def test_loss_weight_is_inverse_squared_c_out(schedule):
    t = torch.linspace(schedule.t_min, 1.0, 33, dtype=torch.float64)
    _, c_out, _, _ = schedule.preconditioning(t)
    torch.testing.assert_close(schedule.loss_weight(t), 1.0 / c_out**2, rtol=1e-12, atol=0)


def test_i2sb_preconditioning_is_its_std_fwd_parametrisation():
    schedule = I2SBSchedule(beta_max=0.3)
    t = schedule.grid(10)
    c_skip, c_out, c_in, c_noise = schedule.preconditioning(t)
    assert torch.all(c_skip == 1) and torch.all(c_in == 1)
    torch.testing.assert_close(c_out, -schedule.sigma(t))
    steps = t * 1000 - 1
    torch.testing.assert_close(c_noise, steps)
    assert c_noise[0].item() == pytest.approx(999) and c_noise[-1].item() == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("cov_xy", [0.0, 0.1])
def test_ddbm_preconditioning_is_the_linear_regression_of_x0_on_x_t(cov_xy):
    """c_skip x_t is the best linear estimate of x0 for data of std sigma_data, c_out its residual std."""
    schedule = DDBMVPSchedule(sigma_data=0.5, cov_xy=cov_xy)
    generator = torch.Generator().manual_seed(3)
    n = 400_000
    cov = torch.tensor([[0.25, cov_xy], [cov_xy, 0.25]], dtype=torch.float64)
    pair = torch.randn(n, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    x0, xT = pair[:, 0].view(n, 1, 1, 1), pair[:, 1].view(n, 1, 1, 1)
    for t_value in (0.1, 0.5, 0.9, 1.0):
        t = torch.full((n,), t_value, dtype=torch.float64)
        x_t = schedule.sample_marginal(x0, xT, t, generator=generator)
        c_skip, c_out, c_in, c_noise = (v[0].item() for v in schedule.preconditioning(t[:1]))
        assert (c_in * x_t).std().item() == pytest.approx(1.0, rel=0.01)
        slope = ((x0 * x_t).mean() / (x_t * x_t).mean()).item()
        assert slope == pytest.approx(c_skip, abs=0.01)
        assert (x0 - c_skip * x_t).std().item() == pytest.approx(c_out, rel=0.01)
        assert c_noise == pytest.approx(250.0 * math.log(t_value), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# training times and sampling grids


def test_i2sb_training_times_are_uniform_over_the_discrete_steps():
    schedule = I2SBSchedule(n_timesteps=10)
    t = schedule.sample_time(20_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (20_000,)
    steps = torch.round(t * 10).long()
    torch.testing.assert_close(t, steps.float() / 10)
    counts = torch.bincount(steps, minlength=11)
    assert counts[0] == 0 and torch.all(counts[1:] > 1800)
    again = schedule.sample_time(20_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_ddbm_training_times_are_uniform_on_t_min_to_T():
    schedule = DDBMVPSchedule(t_min=1e-4)
    t = schedule.sample_time(50_000, generator=torch.Generator().manual_seed(0))
    assert t.min().item() >= 1e-4 and t.max().item() <= 1.0
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, rel=0.03)


@pytest.mark.parametrize("nfe", [1, 2, 5, 100, 999])
def test_grids_descend_from_T_to_t_min(schedule, nfe):
    grid = schedule.grid(nfe)
    assert grid.shape == (nfe + 1,) and grid.dtype == torch.float64
    assert grid[0].item() == schedule.T
    assert grid[-1].item() == pytest.approx(schedule.t_min, rel=1e-12)
    assert torch.all(grid[1:] < grid[:-1])


def test_i2sb_grid_uses_evenly_spread_integer_steps():
    schedule = I2SBSchedule(n_timesteps=1000)
    for nfe in (1, 3, 7, 100, 999):
        steps = schedule.grid(nfe) * 1000 - 1
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-9)
        gaps = (steps[:-1] - steps[1:]).round()
        assert torch.all((gaps - 999 / nfe).abs() <= 1.0)
    with pytest.raises(ValueError, match="nfe"):
        schedule.grid(1000)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_grid_rejects_bad_nfe(schedule, bad):
    with pytest.raises(ValueError, match="nfe"):
        schedule.grid(bad)
