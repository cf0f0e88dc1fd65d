"""Imported teachers compute what the originals compute: network, one step and a 10-step sampler run.

The originals are guided-diffusion's own ``UNetModel`` inside restatements of I2SB's and DDBM's
wrappers and samplers (``tests/reference/originals.py``), with random weights, saved in their
checkpoint layouts (``conftest.py``) and imported through ``import_teacher``.

Tolerances. Network outputs: 1e-5 max abs (float32, the acceptance bound; both sides run the
same float32 kernels up to summation order). Predictors and samplers: the network tolerance
plus the float32 rounding of the coefficients each side computes in its own way (I2SB keeps
float32 tables, this project float64 formulas cast to float32; DDBM computes its scalings in
float32), a few roundings of the values involved (``float32_atol``), grown by at most the number
of steps for the sampler.
"""

from __future__ import annotations

import pytest
import torch
from official_files import (
    SMALL_DDBM,
    SMALL_I2SB,
    build_i2sb_net,
    ema_network,
    i2sb_options,
    save_i2sb_checkpoint,
)
from reference.originals import (
    I2SBDiffusion,
    dbim_sample,
    ddbm_denoise,
    float32_atol,
    i2sb_sample,
    max_abs,
    space_indices,
)

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.bridges.schedules import I2SBSchedule
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.teacher import teacher_from_checkpoint
from ibmd_pipeline.teacher.importers import TeacherImportConfig, import_teacher

NETWORK_ATOL = 1e-5


def _import(path, fmt: str, task: TaskConfig, image_size: int = 32, **settings):
    # the small test networks use heads of 16 channels (the published ones 64, the default)
    config = TeacherImportConfig(format=fmt, checkpoint=str(path), num_head_channels=16, **settings)
    return import_teacher(config, task, image_size=image_size, channels=3)


def _inputs(seed: int, batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.randn(batch, 3, size, size, generator=generator).clamp(-1, 1))  # fmt: skip


I2SB_TASK = TaskConfig(kind="sr4x_bicubic", operators="i2sb")


def test_i2sb_network_output_equals_the_original(i2sb_sr_files):
    path, original = i2sb_sr_files
    checkpoint = _import(path, "i2sb", I2SB_TASK)
    teacher = teacher_from_checkpoint(checkpoint, task_kind="sr4x_bicubic", image_size=32, channels=3)
    assert checkpoint["config"]["bridge"]["noise_levels"] == "i2sb" and not teacher.conditional
    x, _ = _inputs(0)
    for step in (0, 1, 499, 998, 999):
        steps = torch.full((2,), step)
        with torch.no_grad():
            theirs = original(x, steps)
            t = torch.full((2,), (step + 1) / 1000, dtype=torch.float32)  # this project's time of step j
            _, _, _, c_noise = teacher.schedule.preconditioning(t)
            assert torch.equal(c_noise.float(), original.noise_levels[steps])  # the very same float32 level
            ours = teacher.predictor.net(x, c_noise.float())
        assert max_abs(ours, theirs) <= NETWORK_ATOL, step


def test_i2sb_raw_and_ema_weights_are_kept_apart(i2sb_sr_files):
    path, _ = i2sb_sr_files
    checkpoint = _import(path, "i2sb", I2SB_TASK)
    raw, ema = checkpoint["models"]["model"], checkpoint["ema"]["model"]
    saved = torch.load(path, weights_only=True)
    assert torch.equal(raw["out.2.weight"], saved["net"]["diffusion_model.out.2.weight"])
    assert not torch.equal(raw["out.2.weight"], ema["out.2.weight"])


def test_i2sb_one_step_and_ten_step_runs_follow_i2sbs_sampler(i2sb_sr_files):
    path, original = i2sb_sr_files
    teacher = teacher_from_checkpoint(_import(path, "i2sb", I2SB_TASK), image_size=32, channels=3)
    diffusion = I2SBDiffusion(beta_max=0.3)
    _, x1 = _inputs(1)
    for nfe in (1, 10):
        # Both samplers draw one standard normal per noisy transition, in the same order.
        theirs = torch.Generator().manual_seed(nfe)

        def draw(like: torch.Tensor, generator: torch.Generator = theirs) -> torch.Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype)

        with torch.no_grad():
            final, inputs, predictions = i2sb_sample(diffusion, original, x1, nfe, ot_ode=False, draw=draw)
        ours, trajectory = sample(teacher.predictor, x1, teacher.schedule, nfe, return_trajectory=True,
                                  generator=torch.Generator().manual_seed(nfe))  # fmt: skip
        atol = NETWORK_ATOL + float32_atol(torch.stack(predictions), 8) * nfe
        assert len(trajectory.predictions) == len(predictions) == nfe
        for mine, theirs in zip(trajectory.states, inputs, strict=False):
            assert max_abs(mine, theirs) <= atol
        for mine, theirs in zip(trajectory.predictions, predictions, strict=True):
            assert max_abs(mine, theirs) <= atol
        # I2SB returns its state at step 0, the posterior mean from the last prediction; this
        # project returns that prediction itself (bridges/samplers.py): one step apart, exactly.
        last_t = float(teacher.schedule.grid(nfe)[nfe - 1])
        to_step0 = teacher.schedule.posterior_step(
            trajectory.states[nfe - 1], ours, last_t, 1 / 1000, noise=torch.zeros_like(ours)
        )
        assert max_abs(to_step0, final) <= atol


def test_i2sb_grid_is_i2sbs_space_indices():
    schedule = I2SBSchedule()
    for nfe in range(1, 1000):
        steps = sorted(round(float(t) * 1000) - 1 for t in schedule.grid(nfe))
        assert steps == space_indices(1000, nfe + 1), nfe


def test_i2sb_inpainting_ot_ode_run_follows_i2sb(tmp_path):
    net = build_i2sb_net(seed=3)
    path = save_i2sb_checkpoint(tmp_path / "inpaint-center", net, i2sb_options("inpaint-center"))
    original = ema_network(net, path)
    task = TaskConfig(kind="inpaint_center", operators="i2sb")
    teacher = teacher_from_checkpoint(_import(path, "i2sb", task), image_size=32, channels=3)
    assert teacher.schedule.deterministic and teacher.bridge.beta_max == 1.0
    clean, _ = _inputs(2)
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    x1 = clean * (1 - mask) + mask * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    diffusion = I2SBDiffusion(beta_max=1.0)
    with torch.no_grad():
        _, inputs, predictions = i2sb_sample(diffusion, original, x1, 10, ot_ode=True, draw=None, mask=mask)
    ours, trajectory = sample(teacher.predictor, x1, teacher.schedule, 10, mask=mask, return_trajectory=True)
    atol = NETWORK_ATOL + float32_atol(torch.stack(predictions), 8) * 10
    for mine, theirs in zip(trajectory.states, inputs, strict=False):
        assert max_abs(mine, theirs) <= atol
    # I2SB predicts everywhere and resets the known pixels of the state; this project pastes xT
    # into the prediction's known pixels first (the state's known pixels agree either way).
    for mine, theirs in zip(trajectory.predictions, predictions, strict=True):
        assert max_abs(mine * mask, theirs * mask) <= atol


def test_ddbm_network_output_equals_the_original(ddbm_files):
    path, original = ddbm_files
    checkpoint = _import(path, "ddbm", TaskConfig(kind="paired"))
    teacher = teacher_from_checkpoint(checkpoint, image_size=32, channels=3)
    assert teacher.conditional and checkpoint["step"] == 420000
    x, xT = _inputs(3)
    for level in (-2302.6, -575.6, -26.3, 0.0):
        noise_level = torch.full((2,), level)
        with torch.no_grad():
            theirs = original(x, noise_level, xT)
            ours = teacher.predictor.net(torch.cat([x, xT], dim=1), noise_level)
        assert max_abs(ours, theirs) <= NETWORK_ATOL, level


def test_ddbm_one_step_and_ten_step_runs_follow_ddbm_and_dbim(ddbm_files):
    path, original = ddbm_files
    checkpoint = _import(path, "ddbm", TaskConfig(kind="paired"))
    teacher = teacher_from_checkpoint(checkpoint, image_size=32, channels=3)
    _, xT = _inputs(4)
    with torch.no_grad():
        for t in (1.0, 0.5, 1e-3):
            times = torch.full((2,), t, dtype=torch.float32)
            theirs = ddbm_denoise(original, xT, times, xT)
            ours = teacher.predictor(xT, times, xT=xT)
            assert max_abs(ours, theirs) <= NETWORK_ATOL + float32_atol(theirs, 64), t
        one_step = sample(teacher.predictor, xT, teacher.schedule, 1)
        theirs = ddbm_denoise(original, xT, torch.ones(2), xT)
        assert max_abs(one_step, theirs) <= NETWORK_ATOL + float32_atol(one_step, 64)
        grid = teacher.schedule.grid(10).tolist()
        boot = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
        inputs, predictions = dbim_sample(original, xT, grid, boot)
        generator = torch.Generator().manual_seed(6)  # DBIM's booting noise: the one draw of both
        _, trajectory = sample(teacher.predictor, xT, teacher.schedule, 10, mode="deterministic",
                               generator=generator, return_trajectory=True)  # fmt: skip
    atol = NETWORK_ATOL + float32_atol(torch.stack(predictions), 64) * 10
    for mine, theirs in zip(trajectory.states, inputs, strict=False):
        assert max_abs(mine, theirs) <= atol
    for mine, theirs in zip(trajectory.predictions, predictions, strict=True):
        assert max_abs(mine, theirs) <= atol


@pytest.mark.parametrize("architecture", [SMALL_I2SB, SMALL_DDBM])
def test_small_architectures_are_read_back_from_their_weights(architecture):
    from reference.originals import adm_unet

    from ibmd_pipeline.teacher.importers import infer_architecture

    state = adm_unet(architecture).state_dict()
    assert infer_architecture(
        state, image_size=32, num_head_channels=16, attention_order=architecture.attention_order
    ) == architecture


def test_the_exact_grid_leaves_every_configured_nfe_where_it_was():
    """The grid now follows I2SB's rounding; at the NFEs the project's configurations use (and
    its students' 2- and 4-step grids) it gives the same times as the former round-half-up grid."""
    schedule = I2SBSchedule()
    for nfe in (1, 2, 4, 5, 8, 10, 16, 100, 999):
        former = torch.floor(torch.linspace(0, 999, nfe + 1, dtype=torch.float64) + 0.5)
        assert torch.equal(schedule.grid(nfe), ((former + 1) / 1000).flip(0)), nfe


def test_i2sb_noise_levels_interpolate_between_steps_and_default_to_the_step_index():
    table = I2SBSchedule(noise_levels="i2sb")
    levels = torch.linspace(1e-4, 1.0, 1000) * 1000
    between = table.network_noise_level(torch.tensor([0.0105], dtype=torch.float64))  # step 9.5
    assert float(between) == pytest.approx(float(levels[9] + levels[10]) / 2, rel=1e-12)
    plain = I2SBSchedule()
    t = torch.tensor([0.5, 1.0], dtype=torch.float32)
    assert torch.equal(plain.preconditioning(t)[3], plain.step_index(t))  # this project's teachers: unchanged
