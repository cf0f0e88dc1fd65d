"""IBMD losses: the loss identity of IBMD Thm. 3.2/3.4 on Gaussian couplings, and where gradients go."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.distill.ibmd import ibmd_auxiliary_loss, ibmd_generator_loss
from ibmd_pipeline.networks.predictors import X0Predictor

# generator coupling: xT ~ N(0, 1), x0 = W xT + M + K z per pixel
W, M, K = 0.6, -0.2, 0.5


def coefficients(schedule, t):
    return tuple(v.double().view(-1, 1, 1, 1) for v in schedule.coefficients(t))


def conditional_mean_given_xT(schedule, x_t, t, xT):
    """E[x0 | x_t, xT] = mu + g (x_t - a xT - b mu), g = b K^2 / (b^2 K^2 + c^2)."""
    a, b, c = coefficients(schedule, t)
    mu = W * xT + M
    gain = b * K**2 / (b * b * K**2 + c * c)
    return mu + gain * (x_t - a * xT - b * mu)


def conditional_mean_given_x_t(schedule, x_t, t):
    """E[x0 | x_t] after marginalising xT: m + Cov(x0, x_t) / Var(x_t) (x_t - b M)."""
    a, b, c = coefficients(schedule, t)
    cov = W * (a + b * W) + b * K**2
    var = (a + b * W) ** 2 + b * b * K**2 + c * c
    return M + cov / var * (x_t - b * M)


@pytest.mark.parametrize("conditional", [True, False], ids=["ddbm_conditional", "i2sb_unconditional"])
def test_generator_loss_equals_the_distance_of_the_teacher_to_the_conditional_mean(conditional):
    """With D_phi = E_{p_theta}[x0 | x_t] the loss is E lambda ||D* - E[x0|x_t]||^2 (IBMD App. A)."""
    schedule = make_schedule(BridgeConfig(kind="ddbm_vp" if conditional else "i2sb"))
    generator = torch.Generator().manual_seed(0)
    n = 400_000
    dtype = torch.float64
    xT = torch.randn(n, 1, 1, 1, generator=generator, dtype=dtype)
    x0 = W * xT + M + K * torch.randn(n, 1, 1, 1, generator=generator, dtype=dtype)
    t = 0.1 + 0.85 * torch.rand(n, generator=generator, dtype=dtype)
    noise = torch.randn(n, 1, 1, 1, generator=generator, dtype=dtype)

    def teacher(x_t, t, xT=None):  # a fixed, deliberately imperfect bridge model
        return 0.3 * x_t - 0.2 * xT + 0.1 if conditional else 0.3 * x_t + 0.1

    def fake(x_t, t, xT=None):
        if conditional:
            return conditional_mean_given_xT(schedule, x_t, t, xT)
        return conditional_mean_given_x_t(schedule, x_t, t)

    loss = ibmd_generator_loss(teacher, fake, x0, xT, schedule, t=t, noise=noise)

    # exact E[(D* - E[x0|x_t])^2 | t]: D* - m is linear in the independent normals (xT, z, eps)
    a, b, c = coefficients(schedule, t)
    if conditional:
        gain = b * K**2 / (b * b * K**2 + c * c)
        # m = gain x_t + ((1 - gain b) W - gain a) xT + (1 - gain b) M
        alpha, beta, gamma = 0.3 - gain, -0.2 - ((1 - gain * b) * W - gain * a), 0.1 - (1 - gain * b) * M
    else:
        ratio = (W * (a + b * W) + b * K**2) / ((a + b * W) ** 2 + b * b * K**2 + c * c)
        alpha, beta, gamma = 0.3 - ratio, torch.zeros_like(a), 0.1 - M + ratio * b * M
    # x_t = (a + b W) xT + b M + b K z + c eps
    mean = alpha * b * M + gamma
    var = (alpha * (a + b * W) + beta) ** 2 + alpha**2 * (b * b * K**2 + c * c)
    exact_per_sample = (schedule.loss_weight(t).view(-1, 1, 1, 1) * (mean**2 + var)).flatten()
    exact = exact_per_sample.mean().item()

    # Monte-Carlo spread of the estimator, from its per-sample values
    x_t = schedule.sample_marginal(x0, xT, t, noise=noise)
    lam = schedule.loss_weight(t).view(-1, 1, 1, 1)
    per_sample = (lam * ((teacher(x_t, t, xT) - x0) ** 2 - (fake(x_t, t, xT) - x0) ** 2)).flatten()
    tolerance = 5 * per_sample.std().item() / math.sqrt(n)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-9)
    assert exact > 20 * tolerance  # the check below is not vacuous
    assert loss.item() == pytest.approx(exact, abs=tolerance)
    # tighter, sample by sample: loss - mean lambda (D* - m)^2 = mean 2 lambda (D* - m)(m - x0), which
    # vanishes only if the fake is the conditional mean of the x_t the loss actually built
    gap = teacher(x_t, t, xT) - fake(x_t, t, xT)
    cross = (2 * lam * gap * (fake(x_t, t, xT) - x0)).flatten()
    assert loss.item() - (lam * gap**2).mean().item() == pytest.approx(
        0.0, abs=5 * cross.std().item() / math.sqrt(n)
    )


def test_generator_loss_with_the_teacher_as_fake_is_zero():
    schedule = make_schedule(BridgeConfig(kind="ddbm_vp"))
    x0, xT = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)

    def model(x_t, t, xT=None):
        return 0.5 * x_t + 0.25 * xT

    loss, terms = ibmd_generator_loss(
        model, model, x0, xT, schedule, generator=torch.Generator().manual_seed(0), return_terms=True
    )
    assert loss.item() == 0.0 and terms["teacher"].item() == terms["fake"].item() > 0


# ---------------------------------------------------------------------------------------------
# gradients


class TinyNet(nn.Module):
    def __init__(self, in_channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, 2, 3, padding=1)

    def forward(self, x, noise_level):
        return self.conv(x) * (1 + 0.01 * noise_level.view(-1, 1, 1, 1))


class TinyGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, xT, z):
        return xT + self.conv(torch.cat([xT, z], dim=1))


def make_models(conditional: bool):
    schedule = make_schedule(BridgeConfig(kind="ddbm_vp" if conditional else "i2sb"))
    in_channels = 4 if conditional else 2
    teacher = X0Predictor(TinyNet(in_channels, seed=1), schedule, conditional=conditional)
    fake = X0Predictor(TinyNet(in_channels, seed=2), schedule, conditional=conditional)
    return schedule, teacher, fake, TinyGenerator()


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("conditional", [True, False])
def test_generator_loss_only_gives_gradients_to_the_generator(conditional):
    schedule, teacher, fake, gen = make_models(conditional)
    generator = torch.Generator().manual_seed(0)
    xT, z = torch.randn(8, 2, 6, 6, generator=generator), torch.randn(8, 2, 6, 6, generator=generator)
    loss = ibmd_generator_loss(teacher, fake, gen(xT, z), xT, schedule, generator=generator)
    loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(gen))
    assert all(g is None for g in grads(teacher) + grads(fake))
    assert all(p.requires_grad for p in list(teacher.parameters()) + list(fake.parameters()))


@pytest.mark.parametrize("conditional", [True, False])
def test_auxiliary_loss_only_gives_gradients_to_the_fake_model(conditional):
    schedule, teacher, fake, gen = make_models(conditional)
    generator = torch.Generator().manual_seed(0)
    xT, z = torch.randn(8, 2, 6, 6, generator=generator), torch.randn(8, 2, 6, 6, generator=generator)
    x0 = gen(xT, z)
    mask = torch.zeros(8, 1, 6, 6)
    mask[:, :, 2:4] = 1.0
    t = schedule.sample_time(8, generator=generator)
    noise = torch.randn(8, 2, 6, 6, generator=generator)
    loss = ibmd_auxiliary_loss(fake, x0, xT, schedule, mask=mask, t=t, noise=noise)
    loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(fake))
    assert all(g is None for g in grads(gen) + grads(teacher))
    # it is the teacher loss on the generator's (detached) samples
    expected = bridge_matching_loss(fake, x0.detach(), xT, schedule, t=t, noise=noise, mask=mask)
    torch.testing.assert_close(loss, expected)


def test_changing_the_teacher_changes_the_generator_gradient():
    schedule, teacher, fake, gen = make_models(True)
    other_teacher = X0Predictor(TinyNet(4, seed=3), schedule, conditional=True)
    xT, z = torch.randn(8, 2, 6, 6), torch.randn(8, 2, 6, 6)
    t, noise = torch.full((8,), 0.5), torch.randn(8, 2, 6, 6)
    results = []
    for model in (teacher, other_teacher):
        gen.zero_grad()
        ibmd_generator_loss(model, fake, gen(xT, z), xT, schedule, t=t, noise=noise).backward()
        results.append(gen.conv.weight.grad.clone())
    assert not torch.allclose(results[0], results[1])


@pytest.mark.parametrize("kind", ["i2sb", "ddbm_vp"])
def test_generator_gradient_flows_through_x_t_into_both_models(kind):
    """Autograd equals the analytic derivative, which includes the x_t path (and differs without it).

    D*(x_t) = k x_t, D_phi(x_t, xT) = q x_t + r xT, x_t = a xT + b x0 + c eps, per pixel:
    d/dx0 of lambda [(k x_t - x0)^2 - (q x_t + r xT - x0)^2]
        = 2 lambda [(D* - x0)(k b - 1) - (D_phi - x0)(q b - 1)].
    """
    schedule = make_schedule(BridgeConfig(kind=kind))
    k, q, r = 0.8, 0.4, 0.3

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(k, dtype=torch.float64))

        def forward(self, x_t, t, xT=None):
            return self.k * x_t

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Parameter(torch.tensor(q, dtype=torch.float64))
            self.r = nn.Parameter(torch.tensor(r, dtype=torch.float64))

        def forward(self, x_t, t, xT=None):
            return self.q * x_t + self.r * xT

    generator = torch.Generator().manual_seed(0)
    shape = (6, 1, 2, 3)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_(True)
    xT = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    teacher, fake = Teacher(), Fake()
    ibmd_generator_loss(teacher, fake, x0, xT, schedule, t=t, noise=noise).backward()

    a, b, c = (v.view(-1, 1, 1, 1) for v in schedule.coefficients(t))
    lam = schedule.loss_weight(t).view(-1, 1, 1, 1)
    x_t = a * xT + b * x0.detach() + c * noise
    d_teacher, d_fake = k * x_t - x0.detach(), q * x_t + r * xT - x0.detach()
    per_element = 1.0 / (x0.numel())  # mean over batch of per-pixel means
    expected = 2 * lam * (d_teacher * (k * b - 1) - d_fake * (q * b - 1)) * per_element
    without_x_t_path = 2 * lam * (-d_teacher + d_fake) * per_element
    torch.testing.assert_close(x0.grad, expected, rtol=1e-10, atol=1e-12)
    assert (x0.grad - without_x_t_path).abs().max() > 1e-3 * without_x_t_path.abs().max()
    assert teacher.k.grad is None and fake.q.grad is None and fake.r.grad is None
