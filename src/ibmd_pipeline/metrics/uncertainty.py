"""Confidence intervals over test images, verdicts from them, and McNemar's test.

Every model restores the same test images, so comparisons are *paired*: one resample of image
indices is applied to every model (and to a paired reference) at once, and the interval of a
difference comes from the differences on the same resamples.

* **Means of per-image values** (PSNR, SSIM, LPIPS, accuracy, energy distance, ...): the paired
  bootstrap (Efron & Tibshirani 1993, ch. 13): resample the images with replacement, take the
  mean; the interval is the percentile interval of the resampled means.
* **Statistics of a whole set** (FID, KID): a bootstrap with replacement would put duplicate
  images into a set, which biases FID (a duplicate shrinks the spread, as in a set of fewer
  images). They are resampled *without* replacement, as half-samples (McCarthy 1969): for a
  mean, a half-sample without replacement has variance ``s^2/(n/2) * (1 - 1/2) = s^2/n``, the
  variance of the full-sample estimate, so the spread of the half-sample values estimates the
  full-sample spread. Their centre is off by the extra small-sample bias of a half-sized set
  (FID's grows as 1/n), so the interval is the full-sample estimate plus the quantiles of the
  half-sample values around their own mean: :func:`centred_interval`.

A verdict (:func:`verdict`) comes only from the interval of a difference: *better* or *worse*
when it excludes 0, otherwise *tie*; never from two point values. For classifier accuracy,
:func:`mcnemar_exact` also gives McNemar's exact test of the paired correct/incorrect outcomes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy.stats import binomtest

__all__ = [
    "Direction",
    "Verdict",
    "bootstrap_indices",
    "centred_interval",
    "half_sample_indices",
    "mcnemar_exact",
    "mean_with_interval",
    "percentile_interval",
    "resample_generator",
    "statistic_with_interval",
    "verdict",
]

Direction = Literal["lower", "higher"]
Verdict = Literal["better", "tie", "worse"]


def resample_generator(seed: int, size: int, kind: str) -> np.random.Generator:
    """The generator of one family of resamples: a function of the bootstrap seed, the number of
    images and the kind of resample, so every model (and the reference) of that size gets the
    same index draws."""
    return np.random.default_rng([seed, size, sum(kind.encode())])


def bootstrap_indices(n: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` image indices drawn with replacement."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got {n} and {resamples}")
    return generator.integers(0, n, size=(resamples, n))


def half_sample_indices(n: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """``(resamples, n // 2)`` image indices drawn without replacement, each row a half-sample."""
    if n < 4 or resamples < 1:
        raise ValueError(f"half-samples need n >= 4 and resamples >= 1, got {n} and {resamples}")
    return np.stack([generator.permutation(n)[: n // 2] for _ in range(resamples)])


def _tails(confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    return 100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)


def percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of resampled values."""
    low, high = np.percentile(np.asarray(resampled, np.float64), _tails(confidence))
    return float(low), float(high)


def centred_interval(estimate: float, resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """``estimate`` plus the quantiles of the resampled values around their mean (half-samples)."""
    values = np.asarray(resampled, np.float64)
    low, high = np.percentile(values - values.mean(), _tails(confidence))
    return float(estimate + low), float(estimate + high)


def mean_with_interval(
    per_image: np.ndarray, indices: np.ndarray, confidence: float
) -> tuple[float, tuple[float, float]]:
    """``(mean, percentile interval)`` of per-image values under bootstrap ``indices`` ``(B, n)``."""
    values = np.asarray(per_image, np.float64)
    if values.ndim != 1 or indices.shape[1] != values.shape[0]:
        raise ValueError(f"per-image values {values.shape} do not fit resample indices {indices.shape}")
    return float(values.mean()), percentile_interval(values[indices].mean(axis=1), confidence)


def statistic_with_interval(
    statistic: Callable[[np.ndarray], float], n: int, half_samples: np.ndarray, confidence: float
) -> tuple[float, tuple[float, float]]:
    """``(statistic(all n indices), centred half-sample interval)`` of a whole-set statistic."""
    estimate = statistic(np.arange(n))
    resampled = np.array([statistic(rows) for rows in half_samples])
    return estimate, centred_interval(estimate, resampled, confidence)


def verdict(interval: tuple[float, float], direction: Direction) -> Verdict:
    """The verdict on ``candidate - baseline`` from its interval: better / worse when the interval
    excludes 0 on that side (``direction``: which way is better), else tie."""
    low, high = interval
    if low > 0.0:
        return "worse" if direction == "lower" else "better"
    if high < 0.0:
        return "better" if direction == "lower" else "worse"
    return "tie"


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact test of paired classifications (``(n,)`` or ``(seeds, n)`` booleans).

    With one seed, the discordant images are those one model classifies correctly and the other
    not; under H0 (equal accuracy) each is equally likely to favour either model, so the count
    favouring ``a`` is Binomial(discordant, 1/2) (scipy's exact ``binomtest``, two-sided). With
    several seeds an image favours the model with more correct seeds (the sign test, which is
    McNemar's for one seed); images are the independent units either way.
    Returns ``{"a_only": int, "b_only": int, "p_value": float}`` (p = 1 with no discordant image).
    """
    a, b = np.atleast_2d(np.asarray(correct_a, bool)), np.atleast_2d(np.asarray(correct_b, bool))
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    difference = a.sum(axis=0).astype(np.int64) - b.sum(axis=0).astype(np.int64)
    a_only, b_only = int((difference > 0).sum()), int((difference < 0).sum())
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value}
