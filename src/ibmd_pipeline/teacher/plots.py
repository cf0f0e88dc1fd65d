"""Figures of a teacher run: training and validation loss against the step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

__all__ = ["plot_loss_curves", "smooth"]


def smooth(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing), ``weight`` in [0, 1)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight**i))
    return smoothed


def plot_loss_curves(
    history: Sequence[Mapping[str, float]], *, title: str = "teacher", smoothing: float = 0.6
) -> Figure:
    """Training loss (raw window means, faint, and smoothed) and validation loss vs step, log y.

    The records are already means over ``log_every`` steps, so the smoothing is light.

    ``history`` is the trainer's list of records (``step``, ``loss``, optionally ``val_loss``).
    Built on a bare :class:`~matplotlib.figure.Figure` (no pyplot state), ready for the
    catalog's ``MatplotlibDataset``.
    """
    train = [(r["step"], r["loss"]) for r in history if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r and math.isfinite(r["val_loss"])]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    if train:
        steps, losses = zip(*train, strict=True)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1.0)
        axes.plot(steps, smooth(losses, smoothing), color="tab:blue", label="train loss (smoothed)")
    if val:
        steps, losses = zip(*val, strict=True)
        axes.plot(steps, losses, "o-", color="tab:orange", markersize=4, label="val loss (EMA weights)")
    if train or val:
        axes.set_yscale("log")
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("bridge-matching loss")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    return figure
