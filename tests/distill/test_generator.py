"""Generators built from a teacher: initialisation, noise channels, inpainting, multi-step chains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.networks.unet import UNetConfig
from ibmd_pipeline.teacher.model import teacher_from_checkpoint


def loaded_teacher(checkpoint):
    return teacher_from_checkpoint(checkpoint).predictor


def at_T(teacher, xT):
    t = torch.full((xT.shape[0],), teacher.schedule.T)
    with torch.no_grad():
        return teacher(xT, t, xT=xT)


# ---------------------------------------------------------------- one step at initialisation


@pytest.mark.parametrize("task", ["sr4x_bicubic", "sketch"])  # I2SB unconditional, DDBM conditional
def test_one_step_generator_starts_as_the_teachers_prediction_at_T_for_any_z(teacher_checkpoint, task):
    teacher = loaded_teacher(teacher_checkpoint(task))
    generator = BridgeGenerator.from_teacher(teacher, nfe=1, noise=True)
    xT = torch.randn(3, 1, 16, 16)
    expected = at_T(teacher, xT)
    assert expected.abs().mean() > 0.05 and not torch.allclose(expected, xT)  # a non-trivial teacher
    config = generator.predictor.net.config
    assert config.in_channels == teacher.net.config.in_channels + 1  # z has the image's channels
    new_weights = generator.predictor.net.input_conv.weight[:, -1:]
    assert torch.count_nonzero(new_weights) == 0
    with torch.no_grad():
        for seed in (0, 1):
            z = torch.randn(xT.shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(generator(xT, z), expected, rtol=0, atol=1e-6)
    # the teacher itself is untouched and frozen; the copy trains
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in generator.parameters())
    assert generator.predictor.net is not teacher.net


def test_noise_channels_carry_z_once_their_weights_move(teacher_checkpoint):
    teacher = loaded_teacher(teacher_checkpoint())
    generator = BridgeGenerator.from_teacher(teacher, nfe=1, noise=True)
    with torch.no_grad():
        generator.predictor.net.input_conv.weight[:, -1:].normal_(0.0, 0.1)
        xT = torch.randn(2, 1, 16, 16)
        a, b = generator(xT, torch.randn_like(xT)), generator(xT, torch.randn_like(xT))
    assert (a - b).abs().max() > 1e-3


def test_noise_false_keeps_the_teachers_inputs_and_refuses_z(teacher_checkpoint):
    teacher = loaded_teacher(teacher_checkpoint("inpaint_center"))
    generator = BridgeGenerator.from_teacher(teacher, nfe=1, noise=False)
    assert generator.predictor.net.config.in_channels == teacher.net.config.in_channels
    assert generator.draw_noise(torch.zeros(1, 1, 16, 16)) is None
    xT = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(generator(xT), at_T(teacher, xT), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="takes no noise"):
        generator(xT, torch.randn_like(xT))
    spec = generator.spec()
    assert spec["noise"] is False and spec["noise_channels"] == 0 and spec["time_input"] is False


@pytest.mark.parametrize("nfe", [1, 4])
def test_inpainting_output_copies_the_known_pixels_from_xT(teacher_checkpoint, corrupted_images, nfe):
    teacher = loaded_teacher(teacher_checkpoint("inpaint_center"))
    generator = BridgeGenerator.from_teacher(teacher, nfe=nfe, noise=True)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.05 * torch.randn_like(p))  # any weights: the paste does not depend on them
        xT, mask = corrupted_images("inpaint_center", 3)
        x0 = generator(xT, mask=mask, generator=torch.Generator().manual_seed(0))
    known = mask.expand_as(xT) == 0
    assert torch.equal(x0[known], xT[known])
    assert (x0[~known] - xT[~known]).abs().mean() > 1e-2  # the hole is generated, not copied


# ---------------------------------------------------------------- multi-step chains with an oracle


class RecordingOracle(nn.Module):
    """An x0-predictor that knows the answer ``x0`` and records what it was called with."""

    def __init__(self, schedule, x0: torch.Tensor):
        super().__init__()
        self.schedule, self.conditional, self.x0 = schedule, False, x0
        self.weight = nn.Parameter(torch.ones(()))  # something for autograd to track
        self.calls: list[tuple[float, torch.Tensor, bool]] = []

    def forward(self, x_t, t, xT=None, extra=None):
        self.calls.append((float(t[0]), x_t.detach().clone(), torch.is_grad_enabled()))
        return self.weight * self.x0.expand_as(x_t)


def oracle_generator(kind="i2sb", ot_ode=False, x0=None, nfe=4):
    schedule = make_schedule(BridgeConfig(kind=kind, ot_ode=ot_ode))
    x0 = torch.full((1, 1, 1, 1), 0.5) if x0 is None else x0
    oracle = RecordingOracle(schedule, x0)
    return BridgeGenerator(oracle, nfe=nfe, noise=False), oracle, schedule


@pytest.mark.parametrize("kind", ["i2sb", "ddbm_vp"])
def test_oracle_chain_visits_the_bridge_marginals_and_returns_x0(kind):
    """With the true x0, each posterior step keeps x_t ~ q(x_t | x0, xT): check the moments."""
    generator, oracle, schedule = oracle_generator(kind)
    xT = torch.full((20000, 1, 1, 1), -0.8)
    out = generator(xT, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 0.5))
    times = schedule.grid(4)
    assert [round(c[0], 6) for c in oracle.calls] == [round(float(t), 6) for t in times[:4]]
    for t, x_t, _ in oracle.calls:
        a, b, c = (float(v) for v in schedule.coefficients(torch.tensor(t, dtype=torch.float64)))
        mean, std = a * -0.8 + b * 0.5, c
        assert float(x_t.mean()) == pytest.approx(mean, abs=4 * std / 140 + 1e-6)
        assert float(x_t.std()) == pytest.approx(std, rel=0.03, abs=1e-6)


def test_oracle_chain_on_an_ot_ode_schedule_is_the_bridge_mean_without_noise():
    generator, oracle, schedule = oracle_generator("i2sb", ot_ode=True)
    xT = torch.linspace(-1, 1, 8).view(8, 1, 1, 1)
    generator(xT)
    for t, x_t, _ in oracle.calls:
        a, b, _ = schedule.coefficients(torch.tensor([t], dtype=torch.float64))
        torch.testing.assert_close(x_t, (a * xT + b * 0.5).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "fewer"), [("i2sb", 2), ("i2sb", 1), ("ddbm_vp", 2)])
def test_fewer_steps_evaluate_on_the_coarser_teacher_grid_inside_the_trained_one(kind, fewer):
    generator, oracle, schedule = oracle_generator(kind)
    generator(torch.zeros(2, 1, 1, 1), nfe=fewer, generator=torch.Generator().manual_seed(0))
    visited = [c[0] for c in oracle.calls]
    assert visited == pytest.approx(schedule.grid(fewer)[:fewer].tolist(), abs=1e-6)
    trained = schedule.grid(4)[:4].tolist()
    assert all(min(abs(t - s) for s in trained) < 1e-6 for t in visited)  # M divides N: a subset
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        generator(torch.zeros(1, 1, 1, 1), nfe=8)


def test_rollout_runs_earlier_steps_without_gradients_and_returns_the_kth_prediction():
    generator, oracle, _ = oracle_generator("i2sb", nfe=4)
    xT = torch.zeros(2, 1, 1, 1)
    out = generator(xT, rollout_to=3, generator=torch.Generator().manual_seed(0))
    assert [c[2] for c in oracle.calls] == [False, False, True]
    assert out.requires_grad
    out.sum().backward()
    assert float(oracle.weight.grad) == pytest.approx(2 * 0.5)  # only the last evaluation's graph
    oracle.calls.clear()
    generator(xT, generator=torch.Generator().manual_seed(0))  # the chain keeps every graph
    assert [c[2] for c in oracle.calls] == [True] * 4
    with pytest.raises(ValueError, match="rollout_to"):
        generator(xT, rollout_to=5)


@pytest.mark.parametrize("task", ["sr4x_bicubic", "sketch"])
def test_multi_step_generator_starts_as_the_teachers_ancestral_sampler(teacher_checkpoint, task):
    teacher = loaded_teacher(teacher_checkpoint(task))
    generator = BridgeGenerator.from_teacher(teacher, nfe=4, noise=True)
    xT = torch.randn(3, 1, 16, 16)
    z = torch.randn_like(xT)
    with torch.no_grad():
        ours = generator(xT, z, generator=torch.Generator().manual_seed(5))
    theirs = sample(teacher, xT, teacher.schedule, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    spec = generator.spec()
    assert spec["time_input"] is True and spec["nfe"] == 4
    assert spec["grid"] == pytest.approx(teacher.schedule.grid(4).tolist())
    assert parse_config(UNetConfig, spec["unet"]) == generator.predictor.net.config


@pytest.mark.parametrize("task", ["sr4x_bicubic", "inpaint_center", "sketch"])
def test_generator_without_noise_runs_the_teacher_samplers_chain_bit_for_bit(
    teacher_checkpoint, corrupted_images, task
):
    """No z channels: the same network, steps, known-pixel paste and noise draws as the sampler."""
    teacher = loaded_teacher(teacher_checkpoint(task))
    generator = BridgeGenerator.from_teacher(teacher, nfe=4, noise=False)
    xT, mask = corrupted_images(task, 3)
    with torch.no_grad():
        for nfe in (2, 4):
            seeded = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            ours = generator(xT, mask=mask, nfe=nfe, generator=seeded[0])
            theirs = sample(teacher, xT, teacher.schedule, nfe, mask=mask, generator=seeded[1])
            assert torch.equal(ours, theirs)


def test_step_noise_given_explicitly_replaces_the_generators_draws(teacher_checkpoint):
    teacher = loaded_teacher(teacher_checkpoint())
    generator = BridgeGenerator.from_teacher(teacher, nfe=2, noise=False)
    xT = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = generator(xT, step_noise=[torch.zeros_like(xT)])
        b = generator(xT, step_noise=[torch.zeros_like(xT)], generator=torch.Generator().manual_seed(3))
        c = generator(xT, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, c)
