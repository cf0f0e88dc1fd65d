"""Restoring with a teacher (oracle-checked), the sample-grid columns and the loss-curve figure."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure

from ibmd_pipeline.bridges.schedules import BridgeConfig, make_schedule
from ibmd_pipeline.teacher import plot_loss_curves, restore, sample_grid_columns, teacher_from_checkpoint
from ibmd_pipeline.teacher.plots import smooth


def oracle_for(bundle):
    """An x0-predictor that knows the answer: the clean image of each corrupted input."""
    corrupted, clean = bundle["corrupted"].flatten(1), bundle["clean"]

    def predict(x_t, t, xT=None):
        index = (xT.flatten(1)[:, None, :] == corrupted[None]).all(-1).float().argmax(1)
        return clean[index]

    return predict


@pytest.mark.parametrize(
    ("kind", "bridge"),
    [("sr4x_pool", BridgeConfig()), ("inpaint_center", BridgeConfig(beta_max=1.0, ot_ode=True))],
)
@pytest.mark.parametrize("mode", ["ancestral", "deterministic"])
def test_restore_with_an_oracle_returns_the_clean_images(make_bundle, kind, bridge, mode):
    bundle = make_bundle(kind, 5, seed=0)
    schedule = make_schedule(bridge)
    for nfe in (1, 7):
        restored = restore(
            oracle_for(bundle), schedule, bundle["corrupted"], nfe=nfe, mode=mode, mask=bundle.get("mask"),
            batch_size=2, device="cpu",
        )
        torch.testing.assert_close(restored, bundle["clean"], atol=1e-5, rtol=0)


def test_inpainting_samples_keep_the_known_pixels(make_bundle, tiny_params):
    from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

    bundle = make_bundle("inpaint_center", 6, seed=0)
    checkpoint, _ = train_teacher(
        parse_teacher_config(tiny_params(train={"steps": 2, "warmup_steps": 0})), bundle, bundle,
        task={"kind": "inpaint_center"}, device="cpu", progress=False,
    )
    teacher = teacher_from_checkpoint(checkpoint)
    columns = sample_grid_columns(teacher.predictor, teacher.schedule, bundle, nfes=(1, 5), n_examples=4)
    known = bundle["mask"][:4] == 0
    for restored in columns[1:3]:
        known_pixels = known.expand_as(restored)
        assert torch.equal(restored[known_pixels], bundle["corrupted"][:4][known_pixels])
        assert not torch.equal(restored, bundle["corrupted"][:4])  # the hole was filled


def test_grid_columns_are_corrupted_restored_clean_and_reproducible(sr_teacher, sr_bundles):
    teacher = teacher_from_checkpoint(sr_teacher)
    val = sr_bundles[1]
    def columns_for(nfes, seed):
        return sample_grid_columns(
            teacher.predictor, teacher.schedule, val, nfes=nfes, n_examples=3, seed=seed
        )

    columns = columns_for((1, 4, 9), seed=5)
    assert len(columns) == 5 and all(c.shape == (3, 1, 16, 16) for c in columns)
    assert torch.equal(columns[0], val["corrupted"][:3]) and torch.equal(columns[-1], val["clean"][:3])
    again = columns_for((1, 4, 9), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(columns, again, strict=True))
    other_seed = columns_for((4,), seed=6)
    assert not torch.equal(other_seed[1], columns[2])  # the ancestral sampler draws noise


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    values = smooth([1.0, 0.0], weight=0.5)
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(0.5 * 0.5 / 0.75)
    with pytest.raises(ValueError):
        smooth([1.0], weight=1.0)


def test_loss_figure_has_smoothed_train_and_val_curves_on_a_log_axis():
    history = [{"step": float(s), "loss": 1.0 / s} for s in range(1, 11)]
    for record in history[4::5]:
        record["val_loss"] = 2.0 / record["step"]
    figure = plot_loss_curves(history)
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    raw, smoothed, val = axes.get_lines()
    assert list(raw.get_ydata()) == [1.0 / s for s in range(1, 11)]
    assert list(smoothed.get_ydata()) == pytest.approx(smooth([1.0 / s for s in range(1, 11)]))
    assert list(val.get_xdata()) == [5.0, 10.0] and list(val.get_ydata()) == [0.4, 0.2]
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == ["train loss (smoothed)", "val loss (EMA weights)"]
    empty = plot_loss_curves([{"step": 1.0, "loss": math.nan}])
    assert not empty.axes[0].get_lines()
