"""Intervals over images (paired bootstrap, half-samples), verdicts and McNemar's test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ibmd_pipeline.metrics.uncertainty import (
    bootstrap_indices,
    centred_interval,
    half_sample_indices,
    mcnemar_exact,
    mean_with_interval,
    percentile_interval,
    resample_generator,
    statistic_with_interval,
    verdict,
)

#: Monte-Carlo trials of the coverage tests; the observed coverage of a 95% interval lies within
#: 3 binomial standard errors of 95% (plus the intervals' own O(1/n) coverage error, Hall 1992).
TRIALS = 300
COVERAGE_MARGIN = 3 * math.sqrt(0.95 * 0.05 / TRIALS) + 0.02


def test_resample_families_are_shared_by_size_and_kind_and_reproducible():
    same = [resample_generator(0, 10, "boot").integers(0, 10, 5) for _ in range(2)]
    assert np.array_equal(*same)
    others = [
        resample_generator(1, 10, "boot"),
        resample_generator(0, 11, "boot"),
        resample_generator(0, 10, "half"),
    ]
    assert all(not np.array_equal(g.integers(0, 10, 5), same[0]) for g in others)


def test_bootstrap_draws_with_replacement_and_half_samples_without():
    generator = np.random.default_rng(0)
    boot = bootstrap_indices(20, 50, generator)
    assert boot.shape == (50, 20) and boot.min() >= 0 and boot.max() < 20
    assert any(len(set(row)) < 20 for row in boot)  # duplicates happen
    halves = half_sample_indices(21, 50, generator)
    assert halves.shape == (50, 10) and all(len(set(row)) == 10 for row in halves)
    with pytest.raises(ValueError, match="n >= 4"):
        half_sample_indices(3, 5, generator)


def test_percentile_and_centred_intervals():
    values = np.arange(101, dtype=float)  # 0..100: the 2.5th and 97.5th percentiles are 2.5 and 97.5
    assert percentile_interval(values, 0.95) == pytest.approx((2.5, 97.5))
    # centred: the spread of the resampled values around their own mean, moved to the estimate
    assert centred_interval(10.0, values, 0.95) == pytest.approx((10.0 - 47.5, 10.0 + 47.5))
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(values, 1.0)


def test_bootstrap_interval_of_a_mean_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(TRIALS):
        sample = rng.exponential(1.0, 100)  # skewed, true mean 1
        indices = bootstrap_indices(100, 400, rng)
        mean, (low, high) = mean_with_interval(sample, indices, 0.95)
        assert mean == pytest.approx(sample.mean())
        covered += low <= 1.0 <= high
    assert abs(covered / TRIALS - 0.95) <= COVERAGE_MARGIN


def test_half_sample_interval_of_a_set_statistic_covers_at_its_level():
    # the statistic of a whole set here is the variance (a smooth statistic, like FID): half-samples
    # without replacement have the full-sample spread, centring removes their extra bias
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(TRIALS):
        sample = rng.normal(0.0, 2.0, 200)  # true variance 4

        def variance(rows, sample=sample):
            return float(np.var(sample[rows], ddof=1))

        halves = half_sample_indices(200, 300, rng)
        estimate, (low, high) = statistic_with_interval(variance, 200, halves, 0.95)
        assert estimate == pytest.approx(np.var(sample, ddof=1))
        covered += low <= 4.0 <= high
    assert abs(covered / TRIALS - 0.95) <= COVERAGE_MARGIN


@pytest.mark.parametrize(
    ("interval", "direction", "expected"),
    [
        ((-2.0, -0.5), "lower", "better"),
        ((-2.0, -0.5), "higher", "worse"),
        ((0.1, 3.0), "lower", "worse"),
        ((0.1, 3.0), "higher", "better"),
        ((-1.0, 1.0), "lower", "tie"),
        ((0.0, 1.0), "higher", "tie"),  # touching 0 is not excluding it
    ],
)
def test_verdicts_come_from_the_interval_of_the_difference(interval, direction, expected):
    assert verdict(interval, direction) == expected


def test_mcnemar_on_a_known_table():
    # 12 discordant images, 10 favour a: two-sided exact p = 2 * P(X >= 10), X ~ Bin(12, 1/2)
    a = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, bool)
    result = mcnemar_exact(a, b)
    expected = 2 * sum(math.comb(12, k) for k in range(10, 13)) / 2**12
    assert (result["a_only"], result["b_only"]) == (10, 2)
    assert result["p_value"] == pytest.approx(expected, rel=1e-12)  # 158 / 4096
    assert mcnemar_exact(a, a) == {"a_only": 0, "b_only": 0, "p_value": 1.0}


def test_mcnemar_with_seeds_counts_images_not_draws():
    # 3 seeds: image 0 is right 3 times for a and once for b (favours a), image 1 ties 2 : 2
    a = np.array([[1, 1], [1, 0], [1, 1]], bool)
    b = np.array([[1, 1], [0, 1], [0, 0]], bool)
    assert mcnemar_exact(a, b)["a_only"] == 1 and mcnemar_exact(a, b)["b_only"] == 0
    with pytest.raises(ValueError, match="one shape"):
        mcnemar_exact(a, b[:2])
