"""A distillation toy with a known answer: IBMD learns the spread that a one-step teacher lacks.

Per pixel, xT ~ N(0, 1) and the true coupling is x0 | xT ~ N(W xT + M, S^2). The teacher is the
exact bridge model of that coupling, E[x0 | x_t (, xT)], in closed form. The generator
``G(xT, z) = w xT + m + k z`` starts with the wrong mean and no spread (k = 0: a deterministic
map, like a teacher's one-step posterior mean); the fake model is the exact conditional mean of
the same Gaussian family with its own (w, m, k), initialised from the teacher as in the paper.
L:K = 5:1 alternating Adam steps. At the optimum the generator's coupling equals the true one:
|k| = S (the sign of z is arbitrary), w = W, m = M.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.distill.ibmd import ibmd_auxiliary_loss, ibmd_generator_loss

W, M, S = 0.5, 0.3, 0.6


def gaussian_bridge_mean(schedule, x_t, t, xT, w, m, k, conditional: bool):
    """E[x0 | x_t, xT] (conditional) or E[x0 | x_t] for x0 = w xT + m + k z, xT ~ N(0, 1)."""
    a, b, c = (v.view(-1, 1, 1, 1) for v in schedule.coefficients(t))
    if conditional:
        mu = w * xT + m
        gain = b * k**2 / (b * b * k**2 + c * c)
        return mu + gain * (x_t - a * xT - b * mu)
    cov = w * (a + b * w) + b * k**2
    var = (a + b * w) ** 2 + b * b * k**2 + c * c
    return m + cov / var * (x_t - b * m)


class ExactTeacher(nn.Module):
    def __init__(self, schedule, conditional: bool):
        super().__init__()
        self.schedule, self.conditional = schedule, conditional

    def forward(self, x_t, t, xT=None):
        return gaussian_bridge_mean(self.schedule, x_t, t, xT, W, M, S, self.conditional)


class GaussianFamilyModel(nn.Module):
    """Bridge model that can represent E_{p_theta}[x0 | x_t] for every generator of the family."""

    def __init__(self, schedule, conditional: bool):
        super().__init__()
        self.schedule, self.conditional = schedule, conditional
        self.w, self.m, self.k = (nn.Parameter(torch.tensor(v)) for v in (W, M, S))

    def forward(self, x_t, t, xT=None):
        return gaussian_bridge_mean(self.schedule, x_t, t, xT, self.w, self.m, self.k, self.conditional)


class GaussianGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.m, self.k = (nn.Parameter(torch.tensor(v)) for v in (0.2, -0.2, 0.0))

    def forward(self, xT, z):
        return self.w * xT + self.m + self.k * z


@pytest.mark.parametrize("kind", ["ddbm_vp", "i2sb"])
def test_ibmd_recovers_the_true_coupling(kind):
    conditional = kind == "ddbm_vp"  # DDBM teachers see xT, I2SB teachers do not
    schedule = make_schedule(BridgeConfig(kind=kind))
    teacher = ExactTeacher(schedule, conditional)
    fake = GaussianFamilyModel(schedule, conditional)
    gen = GaussianGenerator()
    opt_gen = torch.optim.Adam(gen.parameters(), lr=1e-2)
    opt_fake = torch.optim.Adam(fake.parameters(), lr=2e-2)
    rng = torch.Generator().manual_seed(0)
    shape = (256, 1, 2, 2)
    history = []
    for _ in range(350):
        for _ in range(5):  # L fake steps on detached generator samples
            xT, z = torch.randn(shape, generator=rng), torch.randn(shape, generator=rng)
            with torch.no_grad():
                x0 = gen(xT, z)
            opt_fake.zero_grad()
            ibmd_auxiliary_loss(fake, x0, xT, schedule, generator=rng).backward()
            opt_fake.step()
        xT, z = torch.randn(shape, generator=rng), torch.randn(shape, generator=rng)
        opt_gen.zero_grad()
        ibmd_generator_loss(teacher, fake, gen(xT, z), xT, schedule, generator=rng).backward()
        opt_gen.step()
        history.append([p.item() for p in gen.parameters()])
    w, m, k = torch.tensor(history[-50:]).mean(dim=0).tolist()  # average out Adam's jitter
    assert abs(k) == pytest.approx(S, rel=0.1)
    assert w == pytest.approx(W, abs=0.05)
    assert m == pytest.approx(M, abs=0.05)
