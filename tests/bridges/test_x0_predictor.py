"""X0Predictor: preconditioning applied around any ``net(x, noise_level)``, input assembly, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.networks.predictors import X0Predictor, expected_in_channels


class Recorder(nn.Module):
    """Stand-in network: records its inputs, returns a fixed function of them."""

    def __init__(self, in_channels: int, out_channels: int = 3, scale: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale = nn.Parameter(torch.tensor(scale))
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        self.seen = (x, noise_level)
        return self.scale * x[:, : self.out_channels]


class TinyConv(nn.Module):
    """A network with a ``config.in_channels`` like the project's UNet."""

    def __init__(self, in_channels: int, out_channels: int = 3):
        super().__init__()
        self.config = type("Config", (), {"in_channels": in_channels})()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x, noise_level):
        return self.conv(x) * noise_level.view(-1, 1, 1, 1).tanh()


SCHEDULES = {
    "i2sb": lambda: make_schedule(BridgeConfig(kind="i2sb")),
    "ddbm_vp": lambda: make_schedule(BridgeConfig(kind="ddbm_vp", cov_xy=0.1)),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_zero_network_returns_c_skip_times_x_t(kind):
    schedule = SCHEDULES[kind]()
    conditional = kind == "ddbm_vp"
    predictor = X0Predictor(Recorder(6 if conditional else 3, scale=0.0), schedule, conditional=conditional)
    x_t, xT = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.linspace(0.1, 1.0, 5)
    c_skip = schedule.preconditioning(t)[0]
    torch.testing.assert_close(predictor(x_t, t, xT=xT), c_skip.view(-1, 1, 1, 1) * x_t)


def test_network_input_is_scaled_x_t_then_xT_then_extra():
    schedule = SCHEDULES["ddbm_vp"]()
    net = Recorder(3 + 3 + 2, scale=0.7)
    predictor = X0Predictor(net, schedule, conditional=True)
    x_t, xT, z = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 2, 5, 5)
    t = torch.tensor([0.2, 0.4, 0.6, 1.0])
    out = predictor(x_t, t, xT=xT, extra=z)
    c_skip, c_out, c_in, c_noise = (v.view(-1, 1, 1, 1) for v in schedule.preconditioning(t))
    seen_x, seen_noise = net.seen
    torch.testing.assert_close(seen_x, torch.cat([c_in * x_t, xT, z], dim=1))
    torch.testing.assert_close(seen_noise, c_noise.view(-1))
    torch.testing.assert_close(out, c_skip * x_t + c_out * 0.7 * c_in * x_t)


def test_i2sb_output_is_x_t_minus_std_times_network():
    schedule = SCHEDULES["i2sb"]()
    net = TinyConv(3)
    predictor = X0Predictor(net, schedule, conditional=False)
    x_t = torch.randn(3, 3, 6, 6)
    t = torch.tensor([0.25, 0.5, 1.0])
    with torch.no_grad():
        raw = net(x_t, t * 1000 - 1)
        expected = x_t - schedule.sigma(t).view(-1, 1, 1, 1) * raw
        torch.testing.assert_close(predictor(x_t, t, xT=torch.randn_like(x_t)), expected)


def test_scalar_time_is_broadcast_and_state_dict_is_the_networks():
    schedule = SCHEDULES["i2sb"]()
    predictor = X0Predictor(TinyConv(3), schedule, conditional=False)
    x_t = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(predictor(x_t, 0.5), predictor(x_t, torch.full((2,), 0.5)))
    assert set(predictor.state_dict()) == {"net.conv.weight", "net.conv.bias"}
    assert expected_in_channels(predictor.net) == 3


def test_conditional_predictor_requires_xT():
    predictor = X0Predictor(TinyConv(6), SCHEDULES["ddbm_vp"](), conditional=True)
    with pytest.raises(ValueError, match="conditional: pass xT"):
        predictor(torch.randn(2, 3, 4, 4), torch.full((2,), 0.5))


def test_channel_mismatch_names_every_part():
    predictor = X0Predictor(TinyConv(6), SCHEDULES["ddbm_vp"](), conditional=True)
    x = torch.randn(2, 3, 4, 4)
    message = r"expects 6 input channels, got x_t \(3\) \+ xT \(3\) \+ extra \(1\) = 7"
    with pytest.raises(ValueError, match=message):
        predictor(x, torch.full((2,), 0.5), xT=x, extra=torch.randn(2, 1, 4, 4))
    unconditional = X0Predictor(TinyConv(6), SCHEDULES["i2sb"](), conditional=False)
    with pytest.raises(ValueError, match="expects 6 input channels"):
        unconditional(x, torch.full((2,), 0.5), xT=x)


def test_shape_errors_are_clear():
    predictor = X0Predictor(TinyConv(6, out_channels=1), SCHEDULES["ddbm_vp"](), conditional=True)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="network returned shape"):
        predictor(x, torch.full((2,), 0.5), xT=x)
    with pytest.raises(ValueError, match="must match x_t"):
        predictor(x, torch.full((2,), 0.5), xT=torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="t must be a scalar"):
        predictor(x, torch.full((3,), 0.5), xT=x)
    with pytest.raises(TypeError, match="BridgeSchedule"):
        X0Predictor(TinyConv(3), "i2sb", conditional=False)  # type: ignore[arg-type]


def test_gradients_reach_the_network_and_the_input():
    predictor = X0Predictor(TinyConv(3), SCHEDULES["i2sb"](), conditional=False)
    x_t = torch.randn(2, 3, 4, 4, requires_grad=True)
    predictor(x_t, torch.full((2,), 0.5)).square().sum().backward()
    assert x_t.grad is not None and predictor.net.conv.weight.grad is not None
    assert predictor.net.conv.weight.grad.abs().sum() > 0
