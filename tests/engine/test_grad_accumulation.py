"""Gradient accumulation in the engine: the batch plan, the accumulated update, resuming on another
number of processes (``train.global_batch_size``).

The accumulated update is compared with one update on the whole batch in float64, on a tolerance
derived from rounding (``tests/numerics.py``): the two sum the same per-sample gradients in
another order, so a gradient element differs by at most ``N u`` (``N`` = the batch, the longest
reduction of a linear layer's weight gradient; every element is at most 1 after clipping to norm
1), and AdamW turns that into at most ``lr N u / eps`` per update. The same check fails on the two
usual accumulation bugs: losses summed instead of averaged (Adam hides a uniform scale in the
weights, the gradient norm shows it), and gradients cleared between micro-batches (only the last
one counts).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from numerics import adam_weight_atol, default_dtype, sum_rtol
from torch import nn

from ibmd_pipeline.engine import training
from ibmd_pipeline.engine.config import ConfigError, config_to_dict, parse_config
from ibmd_pipeline.engine.resume import (
    ResumeMismatchError,
    restore_training_state,
    run_folder_name,
    training_checkpoint,
)
from ibmd_pipeline.engine.training import (
    BatchPlan,
    TrainConfig,
    accumulated_update,
    create_training_state,
    optimizer_step,
    plan_batches,
    step_generator,
)

BATCH, LR, UPDATES = 8, 1e-2, 3
DTYPE = torch.float64


def _config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(steps=UPDATES, batch_size=BATCH, lr=LR, grad_clip=1.0), **changes)


# --------------------------------------------------------------------------- the batch plan


def test_without_global_batch_size_each_process_feeds_one_batch_as_before() -> None:
    assert plan_batches(_config(batch_size=4), 3) == BatchPlan(12, 4, 1, 3)


def test_the_global_batch_is_kept_by_accumulating_on_fewer_processes() -> None:
    config = _config(batch_size=4, global_batch_size=16)
    assert [plan_batches(config, world).accumulation for world in (1, 2, 4)] == [4, 2, 1]
    plan = plan_batches(config, 2)
    assert (plan.global_batch, plan.per_rank) == (16, 8)
    assert plan.micro_batches() == [slice(0, 4), slice(4, 8)]


def test_a_process_count_that_cannot_keep_the_global_batch_names_the_key_and_what_works() -> None:
    config = _config(batch_size=4, global_batch_size=16)
    with pytest.raises(ConfigError) as error:
        plan_batches(config, 8, key="teacher.train")
    assert error.value.key == "teacher.train.global_batch_size"
    message = str(error.value)
    assert "process count that divides 4 (1, 2, 4)" in message
    assert "set teacher.train.batch_size to one of 1, 2" in message  # 16 / 8 processes = 2 per process
    with pytest.raises(ConfigError, match="no teacher.train.batch_size splits it over 3 processes"):
        plan_batches(config, 3, key="teacher.train")


@pytest.mark.parametrize("value", [0, -8, 12])
def test_global_batch_size_must_be_a_positive_multiple_of_batch_size(value: int) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(TrainConfig, {"batch_size": 8, "global_batch_size": value}, "distill.train")
    assert error.value.key == "distill.train.global_batch_size"
    assert "multiple of batch_size=8" in str(error.value)
    unset = parse_config(TrainConfig, {"batch_size": 8, "global_batch_size": None}, "distill.train")
    assert unset.global_batch_size is None


def test_step_generators_depend_on_the_seed_and_the_step_only() -> None:
    draw = [torch.rand(3, generator=step_generator(5, step)) for step in (0, 1, 0)]
    assert torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], torch.rand(3, generator=step_generator(6, 0)))


# --------------------------------------------------------------------------- the accumulated update

_DATA = torch.Generator().manual_seed(0)
X = torch.randn(UPDATES, BATCH, 4, generator=_DATA, dtype=DTYPE)
Y = torch.randn(UPDATES, BATCH, 2, generator=_DATA, dtype=DTYPE)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).to(DTYPE)


def _loss(net: nn.Module, step: int, rows: slice) -> torch.Tensor:
    return (net(X[step, rows]) - Y[step, rows]).square().mean()


def _train(micro_batches: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """UPDATES updates on the batches X, Y, each accumulated over ``micro_batches`` micro-batches."""
    state = create_training_state({"net": _mlp()}, _config())
    net, size, norms = state.models["net"], BATCH // micro_batches, []
    for step in range(UPDATES):
        if micro_batches == 1:
            norms.append(optimizer_step(state, "net", _loss(net, step, slice(None))))
            continue
        parts = [
            (lambda rows=slice(i * size, (i + 1) * size), step=step: _loss(net, step, rows))
            for i in range(micro_batches)
        ]
        norm, losses = accumulated_update(state, "net", parts)
        assert len(losses) == micro_batches
        norms.append(norm)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, norms


def _assert_same_update(a, b) -> None:
    """Weights within the AdamW bound after UPDATES updates; the first gradient norm (equal weights
    before it) within the rounding of its sums."""
    (weights_a, norms_a), (weights_b, norms_b) = a, b
    assert math.isclose(norms_a[0], norms_b[0], rel_tol=sum_rtol(BATCH, DTYPE), abs_tol=0), (norms_a, norms_b)
    atol = adam_weight_atol(UPDATES, LR, BATCH, DTYPE)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], atol=atol, rtol=0, msg=key)


def test_accumulated_micro_batches_make_the_update_of_the_whole_batch() -> None:
    with default_dtype(DTYPE):
        whole = _train(1)
        for micro_batches in (2, 4):
            _assert_same_update(_train(micro_batches), whole)
        # Not vacuous: the updates moved the weights by far more than the tolerance.
        moved = max(float((whole[0][k] - v).abs().max()) for k, v in _mlp().state_dict().items())
        assert moved > 1e6 * adam_weight_atol(UPDATES, LR, BATCH, DTYPE)


def _summed(original):
    """Every micro-batch's loss back-propagated at full weight: the sum, not the mean."""

    def accumulate(state, name, loss, *, weight=1.0, parameters=None):
        return original(state, name, loss, weight=1.0, parameters=parameters)

    return accumulate


def _cleared_between_micro_batches(original):
    """The gradients cleared before each micro-batch: only the last one is left."""

    def accumulate(state, name, loss, *, weight=1.0, parameters=None):
        state.optimizers[name].zero_grad(set_to_none=True)
        return original(state, name, loss, weight=weight, parameters=parameters)

    return accumulate


#: Accumulation bugs, as replacements of ``engine.training.accumulate_gradients``.
ACCUMULATION_FAULTS = {"summed": _summed, "cleared_between_micro_batches": _cleared_between_micro_batches}


@pytest.mark.parametrize("fault", sorted(ACCUMULATION_FAULTS))
def test_the_check_fails_when_the_micro_batches_are_scaled_or_kept_wrongly(monkeypatch, fault) -> None:
    with default_dtype(DTYPE):
        whole = _train(1)
        broken = ACCUMULATION_FAULTS[fault](training.accumulate_gradients)
        monkeypatch.setattr(training, "accumulate_gradients", broken)
        with pytest.raises(AssertionError):
            _assert_same_update(_train(2), whole)


# --------------------------------------------------------------------------- resuming on another world size


def _two_rank_payload(config: TrainConfig) -> tuple[dict, torch.Tensor]:
    """A working checkpoint as two ranks write it; rank 0's generator a few draws on."""
    state = create_training_state({"net": _mlp()}, config)
    torch.rand(7, generator=state.generator)
    state.step = 2
    rank0 = training_checkpoint(state, {})["rng"][0]
    rank1 = {**rank0, "generator": torch.Generator().manual_seed(99).get_state()}
    return training_checkpoint(state, {}, [rank0, rank1]), rank0["generator"]


def test_with_global_batch_size_another_process_count_resumes_with_rank_0s_shared_streams() -> None:
    config = _config(batch_size=4, global_batch_size=8)
    payload, shared = _two_rank_payload(config)
    # Another micro-batch size keeps the global batch too: it is no part of what must match.
    target = create_training_state({"net": _mlp()}, dataclasses.replace(config, batch_size=2))
    restore_training_state(target, payload, rank=0, world_size=1)
    assert target.step == 2 and torch.equal(target.generator.get_state(), shared)
    # The process-wide streams are re-seeded from the seed and the step: the same on a rerun.
    first = torch.rand(3)
    restore_training_state(target, payload, rank=0, world_size=1)
    assert torch.equal(torch.rand(3), first)
    for rank in range(4):
        restore_training_state(target, payload, rank=rank, world_size=4)
        assert torch.equal(target.generator.get_state(), shared)


def test_without_global_batch_size_another_process_count_is_refused_with_what_to_set() -> None:
    payload, _ = _two_rank_payload(_config(batch_size=4))
    target = create_training_state({"net": _mlp()}, _config(batch_size=4))
    with pytest.raises(ResumeMismatchError) as error:
        restore_training_state(target, payload, world_size=1)
    message = str(error.value)
    assert "global batch of 8 images (train.batch_size 4 x 2)" in message
    assert "distributed.nproc_per_node: 2" in message and "train.global_batch_size set (e.g. 8)" in message
    # Another global batch than the run's is refused as well.
    other = create_training_state({"net": _mlp()}, _config(batch_size=4, global_batch_size=16))
    with pytest.raises(ResumeMismatchError, match="Resume with 2 process"):
        restore_training_state(other, payload, world_size=1)


def test_the_run_folder_ignores_the_micro_batch_only_when_the_global_batch_is_fixed() -> None:
    def folder(**changes) -> str:
        return run_folder_name({"kind": "toy"}, config_to_dict(_config(**changes)))

    assert folder(batch_size=4, global_batch_size=16) == folder(batch_size=8, global_batch_size=16)
    assert folder(batch_size=4, global_batch_size=16) != folder(batch_size=4, global_batch_size=32)
    assert folder(batch_size=4) != folder(batch_size=8)


def test_one_micro_batch_is_the_plain_optimizer_step() -> None:
    """``optimizer_step`` is one ``accumulated_update`` of one micro-batch, to the bit."""
    with default_dtype(DTYPE):
        one = _train(1)
        state = create_training_state({"net": _mlp()}, _config())
        net = state.models["net"]
        norms = [
            accumulated_update(state, "net", [lambda step=step: _loss(net, step, slice(None))])[0]
            for step in range(UPDATES)
        ]
        assert norms == one[1]
        assert all(torch.equal(v, one[0][k]) for k, v in net.state_dict().items())
