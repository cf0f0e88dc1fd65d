"""Bridge matching loss: exact values with oracles, masking, I2SB's own label form, minimiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.losses import bridge_matching_loss, masked_mean_squared_error
from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.networks.predictors import X0Predictor

SCHEDULES = {
    "i2sb": lambda: make_schedule(BridgeConfig(kind="i2sb")),
    "ddbm_vp": lambda: make_schedule(BridgeConfig(kind="ddbm_vp")),
}


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


def test_masked_mean_squared_error_averages_over_the_hole():
    prediction = torch.zeros(2, 3, 4, 4)
    target = torch.ones(2, 3, 4, 4)
    target[0, :, :2] = 3.0  # error 9 in the top half of sample 0
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0  # sample 0: hole = top half
    mask[1, :, 0, 0] = 1.0  # sample 1: a one-pixel hole
    torch.testing.assert_close(masked_mean_squared_error(prediction, target, mask), torch.tensor([9.0, 1.0]))
    torch.testing.assert_close(masked_mean_squared_error(prediction, target), torch.tensor([5.0, 1.0]))
    empty = torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(masked_mean_squared_error(prediction, target, empty), torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        masked_mean_squared_error(prediction, target, torch.ones(2, 1, 2, 2))


def test_oracle_predictor_has_zero_loss(schedule):
    x0, xT = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)

    def oracle(x_t, t, xT=None):
        return x0

    loss = bridge_matching_loss(oracle, x0, xT, schedule, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0


def test_loss_equals_weight_times_squared_error_of_the_prediction(schedule):
    generator = torch.Generator().manual_seed(0)
    x0, xT = torch.randn(6, 2, 3, 3, generator=generator), torch.randn(6, 2, 3, 3, generator=generator)
    noise = torch.randn(6, 2, 3, 3, generator=generator)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 1.0])
    seen = {}

    def shrink(x_t, t, xT=None):
        seen["x_t"] = x_t
        return 0.5 * x_t + 0.1 * xT

    per_sample = bridge_matching_loss(shrink, x0, xT, schedule, t=t, noise=noise, reduction="none")
    a, b, c = (v.view(-1, 1, 1, 1) for v in schedule.coefficients(t))
    x_t = a * xT + b * x0 + c * noise
    torch.testing.assert_close(seen["x_t"], x_t)
    expected = schedule.loss_weight(t) * ((0.5 * x_t + 0.1 * xT - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(
        bridge_matching_loss(shrink, x0, xT, schedule, t=t, noise=noise), expected.mean()
    )
    with pytest.raises(ValueError, match="reduction"):
        bridge_matching_loss(shrink, x0, xT, schedule, t=t, noise=noise, reduction="sum")  # type: ignore


def test_masked_loss_ignores_known_pixels(schedule):
    x0, xT = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    t = torch.full((4,), 0.5)

    def wrong_outside_hole(x_t, t, xT=None):
        return x0 + 5.0 * (1 - mask)

    def off_by_one_in_hole(x_t, t, xT=None):
        return x0 + mask

    assert bridge_matching_loss(wrong_outside_hole, x0, xT, schedule, t=t, mask=mask).item() == 0.0
    torch.testing.assert_close(
        bridge_matching_loss(off_by_one_in_hole, x0, xT, schedule, t=t, mask=mask),
        schedule.loss_weight(t).mean(),
    )


def test_i2sb_loss_is_the_mse_between_network_output_and_its_label():
    """With lambda = 1/c_out^2 the loss is I2SB's ``mse(net, (x_t - x0) / std_fwd)``."""
    schedule = SCHEDULES["i2sb"]()
    net = nn.Conv2d(3, 3, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = net

        def forward(self, x, noise_level):
            return self.conv(x)

    predictor = X0Predictor(Net(), schedule, conditional=False)
    generator = torch.Generator().manual_seed(1)
    x0, xT = torch.randn(5, 3, 6, 6, generator=generator), torch.randn(5, 3, 6, 6, generator=generator)
    noise = torch.randn(5, 3, 6, 6, generator=generator)
    t = torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])
    loss = bridge_matching_loss(predictor, x0, xT, schedule, t=t, noise=noise)
    x_t = schedule.sample_marginal(x0, xT, t, noise=noise)
    label = (x_t - x0) / schedule.sigma(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(loss, ((net(x_t) - label) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_minimiser_is_the_conditional_mean():
    """Fitting D = alpha x_t + beta xT at a fixed t recovers E[x0 | x_t, xT] for Gaussian data."""
    schedule = SCHEDULES["ddbm_vp"]()
    generator = torch.Generator().manual_seed(2)
    n, t_value, w, m, s = 100_000, 0.6, 0.5, 0.3, 0.4
    xT = torch.randn(n, 1, 1, 1, generator=generator)
    x0 = w * xT + m + s * torch.randn(n, 1, 1, 1, generator=generator)
    t = torch.full((n,), t_value)
    params = nn.Parameter(torch.zeros(3))

    def linear(x_t, t, xT=None):
        return params[0] * x_t + params[1] * xT + params[2]

    optimiser = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")
    noise = torch.randn(n, 1, 1, 1, generator=generator)

    def closure():
        optimiser.zero_grad()
        loss = bridge_matching_loss(linear, x0, xT, schedule, t=t, noise=noise)
        loss.backward()
        return loss

    optimiser.step(closure)
    a, b, c = (v.item() for v in schedule.coefficients(torch.tensor([t_value], dtype=torch.float64)))
    gain = b * s**2 / (b**2 * s**2 + c**2)  # E[x0|x_t,xT] = mu + gain (x_t - a xT - b mu)
    expected = torch.tensor([gain, (1 - gain * b) * w - gain * a, (1 - gain * b) * m])
    torch.testing.assert_close(params.detach(), expected, atol=0.01, rtol=0)


def test_ot_ode_loss_uses_no_noise():
    schedule = make_schedule(BridgeConfig(kind="i2sb", beta_max=1.0, ot_ode=True))
    x0, xT = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.full((4,), 0.5)
    seen = []

    def record(x_t, t, xT=None):
        seen.append(x_t)
        return torch.zeros_like(x_t)

    bridge_matching_loss(record, x0, xT, schedule, t=t, generator=torch.Generator().manual_seed(0))
    bridge_matching_loss(record, x0, xT, schedule, t=t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(seen[0], 0.5 * x0 + 0.5 * xT)
