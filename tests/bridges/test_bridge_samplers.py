"""The posterior chain and the samplers on it, driven by oracle and exact Gaussian x0-predictors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.samplers import ChainStep, chain_steps, posterior_chain, sample
from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule

SCHEDULES = {
    "i2sb": lambda: make_schedule(BridgeConfig(kind="i2sb", beta_max=0.3)),
    "i2sb_ot_ode": lambda: make_schedule(BridgeConfig(kind="i2sb", beta_max=1.0, ot_ode=True)),
    "ddbm_vp": lambda: make_schedule(BridgeConfig(kind="ddbm_vp")),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


def oracle_for(x0: torch.Tensor):
    calls = []

    def oracle(x_t, t, xT=None):
        calls.append(t)
        return x0

    return oracle, calls


@pytest.mark.parametrize("mode", ["deterministic", "ancestral"])
@pytest.mark.parametrize("nfe", [1, 2, 5, 100])
def test_oracle_predictor_recovers_x0_with_the_requested_nfe(schedule, mode, nfe):
    generator = torch.Generator().manual_seed(0)
    x0, xT = torch.randn(4, 3, 5, 5, generator=generator), torch.randn(4, 3, 5, 5, generator=generator)
    oracle, calls = oracle_for(x0)
    out, trajectory = sample(
        oracle, xT, schedule, nfe, mode=mode, generator=generator, return_trajectory=True
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=0)
    assert len(calls) == nfe and len(trajectory.predictions) == nfe and len(trajectory.states) == nfe + 1
    grid = schedule.grid(nfe)
    for t, expected in zip(calls, grid[:-1].tolist(), strict=True):
        assert t.shape == (4,) and t.dtype == torch.float32
        assert t[0].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(trajectory.states[0], xT)
    if schedule.deterministic:  # OT-ODE: every visited state is exactly on the bridge a xT + b x0
        for t_value, state in zip(grid[:-1].tolist(), trajectory.states[:-1], strict=True):
            a, b, _ = (v.item() for v in schedule.coefficients(torch.tensor([t_value], dtype=torch.float64)))
            torch.testing.assert_close(state, a * xT + b * x0, rtol=0, atol=1e-5)


def test_deterministic_oracle_chain_keeps_its_booting_noise():
    """DBIM with the exact x0: x_t = a_t xT + b_t x0 + c_t z with one z for the whole chain."""
    schedule = SCHEDULES["ddbm_vp"]()
    generator = torch.Generator().manual_seed(3)
    x0, xT = torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
    oracle, _ = oracle_for(x0)
    _, trajectory = sample(
        oracle, xT, schedule, 6, mode="deterministic", generator=generator, return_trajectory=True
    )
    boots = []
    for t_value, state in zip(trajectory.times[1:-1].tolist(), trajectory.states[1:-1], strict=True):
        a, b, c = (v.item() for v in schedule.coefficients(torch.tensor([t_value], dtype=torch.float64)))
        boots.append((state - a * xT - b * x0) / c)
    for z in boots[1:]:
        torch.testing.assert_close(z, boots[0], rtol=0, atol=1e-4)
    assert boots[0].std().item() == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("kind", ["i2sb", "ddbm_vp"])
def test_ancestral_oracle_chain_visits_the_bridge_marginals(kind):
    schedule = SCHEDULES[kind]()
    generator = torch.Generator().manual_seed(4)
    n = 40_000
    x0, xT = torch.full((n, 1, 1, 1), 0.8), torch.full((n, 1, 1, 1), -0.6)
    oracle, _ = oracle_for(x0)
    _, trajectory = sample(
        oracle, xT, schedule, 5, mode="ancestral", generator=generator, return_trajectory=True
    )
    for t_value, state in zip(trajectory.times[1:-1].tolist(), trajectory.states[1:-1], strict=True):
        a, b, c = (v.item() for v in schedule.coefficients(torch.tensor([t_value], dtype=torch.float64)))
        assert state.mean().item() == pytest.approx(a * -0.6 + b * 0.8, abs=5 * c / math.sqrt(n))
        assert state.std().item() == pytest.approx(c, rel=5 / math.sqrt(2 * n))


def test_nfe_one_returns_the_prediction_at_T(schedule):
    xT = torch.randn(3, 2, 4, 4)

    def predictor(x_t, t, xT=None):
        return 0.3 * x_t - 0.2 + t.view(-1, 1, 1, 1)

    out = sample(predictor, xT, schedule, 1, mode="ancestral")
    torch.testing.assert_close(out, 0.3 * xT - 0.2 + schedule.T)


class GaussianDenoiser:
    """Exact E[x0 | x_t, xT] when x0 | xT ~ N(w xT + m, s^2) per pixel."""

    def __init__(self, schedule, w, m, s):
        self.schedule, self.w, self.m, self.s = schedule, w, m, s

    def __call__(self, x_t, t, xT=None):
        a, b, c = (v.view(-1, 1, 1, 1) for v in self.schedule.coefficients(t.double()))
        mu = self.w * xT + self.m
        denom = b * b * self.s**2 + c * c
        # at t = T (b = c = 0) x_t = xT carries no information about x0: the gain's limit is 0
        gain = torch.where(denom > 0, b * self.s**2 / denom.clamp_min(1e-300), torch.zeros_like(denom))
        return (mu + gain * (x_t - a * xT - b * mu)).float()


@pytest.mark.parametrize("kind", ["i2sb", "ddbm_vp"])
@pytest.mark.parametrize("mode", ["ancestral", "deterministic"])
def test_exact_denoiser_samples_the_data_distribution(kind, mode):
    """With the exact posterior mean, 100 steps reproduce x0 | xT in mean and spread."""
    schedule = SCHEDULES[kind]()
    generator = torch.Generator().manual_seed(5)
    w, m, s = 0.5, 0.3, 0.4
    xT = torch.randn(20_000, 1, 1, 1, generator=generator)
    out = sample(GaussianDenoiser(schedule, w, m, s), xT, schedule, 100, mode=mode, generator=generator)
    residual = out - (w * xT + m)
    assert residual.mean().item() == pytest.approx(0.0, abs=0.02)
    assert residual.std().item() == pytest.approx(s, rel=0.05)
    # one step collapses to the posterior mean at T, which has no spread
    one = sample(GaussianDenoiser(schedule, w, m, s), xT, schedule, 1, mode=mode, generator=generator)
    torch.testing.assert_close(one, w * xT + m)


@pytest.mark.parametrize("mode", ["ancestral", "deterministic"])
def test_mask_keeps_known_pixels_of_xT(schedule, mode):
    generator = torch.Generator().manual_seed(6)
    xT = torch.randn(2, 3, 6, 6, generator=generator)
    mask = torch.zeros(2, 1, 6, 6)
    mask[:, :, 1:4, 2:5] = 1.0

    def garbage(x_t, t, xT=None):
        return torch.full_like(x_t, 7.0)

    out, trajectory = sample(
        garbage, xT, schedule, 5, mode=mode, mask=mask, generator=generator, return_trajectory=True
    )
    known = mask.expand_as(xT) == 0
    torch.testing.assert_close(out[known], xT[known])
    assert torch.all(out[~known] == 7.0)
    if schedule.deterministic:  # I2SB OT-ODE: the known region is xT at every step
        for state in trajectory.states:
            torch.testing.assert_close(state[known], xT[known], rtol=0, atol=1e-6)


def test_ancestral_noise_follows_the_generator():
    schedule = SCHEDULES["i2sb"]()
    xT = torch.randn(2, 1, 4, 4)

    def predictor(x_t, t, xT=None):
        return 0.5 * x_t

    first = sample(predictor, xT, schedule, 4, generator=torch.Generator().manual_seed(1))
    again = sample(predictor, xT, schedule, 4, generator=torch.Generator().manual_seed(1))
    other = sample(predictor, xT, schedule, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_ot_ode_sampler_adds_no_noise():
    schedule = SCHEDULES["i2sb_ot_ode"]()
    xT = torch.randn(2, 1, 4, 4)

    def predictor(x_t, t, xT=None):
        return 0.5 * x_t + 0.1

    outs = [
        sample(predictor, xT, schedule, 7, mode=mode, generator=torch.Generator().manual_seed(seed))
        for mode in ("ancestral", "deterministic")
        for seed in (0, 1)
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert all(step.noise_std == 0.0 for step in chain_steps(schedule, schedule.grid(7), "ancestral"))


def test_extra_input_reaches_the_predictor_and_grad_is_off_by_default():
    schedule = SCHEDULES["ddbm_vp"]()
    scale = nn.Parameter(torch.tensor(0.5))
    z = torch.randn(2, 1, 4, 4)
    seen = []

    def predictor(x_t, t, xT=None, extra=None):
        seen.append(extra)
        return scale * x_t

    out = sample(predictor, torch.randn(2, 1, 4, 4), schedule, 3, extra=z)
    assert all(e is z for e in seen) and not out.requires_grad
    out = sample(predictor, torch.randn(2, 1, 4, 4), schedule, 3, extra=z, enable_grad=True)
    out.sum().backward()
    assert scale.grad is not None


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_nfe_is_rejected(schedule, bad):
    with pytest.raises(ValueError, match="nfe"):
        sample(lambda x_t, t, xT=None: x_t, torch.zeros(1, 1, 2, 2), schedule, bad)


def test_unknown_mode_is_rejected(schedule):
    with pytest.raises(ValueError, match="mode"):
        sample(lambda x_t, t, xT=None: x_t, torch.zeros(1, 1, 2, 2), schedule, 3, mode="heun")  # type: ignore


# ---------------------------------------------------------------------------------------------
# the chain itself


def test_chain_applies_each_step_to_the_state_the_prediction_and_xT():
    xT = torch.randn(2, 1, 3, 3)
    noise = torch.randn(1, 2, 1, 3, 3)
    steps = [ChainStep(0.5, 0.25, 0.0, 0.0), ChainStep(0.0, 0.5, 2.0, 0.125)]
    seen = []

    def predict(x_t, k):
        seen.append((k, x_t))
        return x_t + k

    out = posterior_chain(predict, xT, steps, step_noise=[None, noise[0]])
    x1 = 0.5 * xT + 0.25 * xT
    x2 = 0.5 * (x1 + 1) + 2.0 * xT + 0.125 * noise[0]
    assert [k for k, _ in seen] == [0, 1, 2]
    assert torch.equal(seen[1][1], x1) and torch.equal(seen[2][1], x2)
    assert torch.equal(out, x2 + 2)  # the last prediction is the result


def test_chain_noise_comes_from_step_noise_or_the_generator_and_only_where_a_step_takes_it():
    xT = torch.zeros(2, 1, 2, 2)
    steps = [ChainStep(1.0, 0.0, 0.0, 0.0), ChainStep(1.0, 0.0, 0.0, 1.0)]
    given = [torch.full_like(xT, 7.0), torch.full_like(xT, 3.0)]  # the first is never read
    assert torch.equal(posterior_chain(lambda x, k: x, xT, steps, step_noise=given), given[1])
    drawn = posterior_chain(lambda x, k: x, xT, steps, generator=torch.Generator().manual_seed(4))
    assert torch.equal(drawn, torch.randn(xT.shape, generator=torch.Generator().manual_seed(4)))


def test_chain_without_grad_through_the_chain_records_only_the_last_evaluation():
    scale = nn.Parameter(torch.tensor(2.0))
    modes = []

    def predict(x_t, k):
        modes.append(torch.is_grad_enabled())
        return scale * x_t

    steps = [ChainStep(0.0, 1.0, 0.0, 0.0)] * 2
    out = posterior_chain(predict, torch.ones(1, 1, 1, 1), steps, grad_through_chain=False)
    out.sum().backward()
    assert modes == [False, False, True]
    assert scale.grad.item() == pytest.approx(4.0)  # d(scale * 4)/d scale: the input is a constant 4
    modes.clear()
    scale.grad = None
    posterior_chain(predict, torch.ones(1, 1, 1, 1), steps).sum().backward()
    assert modes == [True] * 3 and scale.grad.item() == pytest.approx(3 * 2.0**2)


def test_chain_pastes_known_pixels_before_each_step_and_reports_every_prediction():
    xT = torch.arange(4.0).view(1, 1, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    reported = []
    out = posterior_chain(
        lambda x, k: torch.full_like(x, -1.0),
        xT,
        [ChainStep(0.0, 1.0, 0.0, 0.0)],
        mask=mask,
        on_prediction=lambda x_t, x0_hat: reported.append((x_t, x0_hat)),
    )
    expected = torch.tensor([[[[-1.0, 1.0], [2.0, -1.0]]]])
    assert torch.equal(out, expected)
    assert len(reported) == 2 and torch.equal(reported[0][0], xT) and torch.equal(reported[1][0], expected)
    assert all(torch.equal(x0_hat, expected) for _, x0_hat in reported)
