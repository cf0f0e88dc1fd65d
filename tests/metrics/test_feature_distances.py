"""Fréchet distance in the exact trace form, and KID, against pytorch-fid, torchmetrics and the
formulas written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numerics import sum_rtol
from scipy import linalg
from torchmetrics.image.kid import KernelInceptionDistance

from ibmd_pipeline.metrics import fid
from ibmd_pipeline.metrics.feature_distances import (
    frechet_distance_from_features,
    kid_subsets,
    kid_unbiased,
)


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``n`` draws of correlated Gaussian features: one fixed mixing for every call, so equal
    ``shift`` and ``scale`` mean one distribution."""
    mixing = np.random.default_rng(12345).standard_normal((d, d)) / np.sqrt(d)
    return (np.random.default_rng(seed).standard_normal((n, d)) @ mixing) * scale + shift


def _trace_sqrt_by_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), with symmetric eigendecompositions only:
    exact for singular covariances too (their eigenvalues are clipped at 0, not offset)."""
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def _fd_from_statistics(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_by_eigh(s1, s2))


def _tolerance(a: np.ndarray, b: np.ndarray) -> float:
    """Float64 rounding of either computation: sums of up to n*d products of numbers as large as
    the traces, so a relative ``N u`` of their magnitude (Higham ch. 4), N = the longest sum."""
    terms = max(a.shape[0], b.shape[0]) * a.shape[1]
    magnitude = np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False))
    return sum_rtol(terms, torch.float64) * magnitude


def test_exact_trace_fid_equals_pytorch_fids_value():
    # pytorch-fid's sqrtm is accurate for well-conditioned covariances: many more images than dims
    a, b = _features(400, 24, seed=0), _features(300, 24, seed=1, shift=0.3, scale=1.2)
    stats_a, stats_b = fid.statistics_from_features(a), fid.statistics_from_features(b)
    reference = fid.frechet_distance(stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"])
    ours = frechet_distance_from_features(a, b)
    assert reference > 1.0 and abs(ours - reference) <= _tolerance(a, b)


def test_exact_trace_fid_is_exact_with_fewer_images_than_dimensions():
    # rank-deficient covariances (n < d), where pytorch-fid needs its diagonal offset: the
    # nuclear norm agrees with the eigendecomposition form, which needs none. That form is the
    # less accurate one here: each of the d eigenvalues that should be 0 comes out within N u of
    # the largest, and its square root within sqrt(N u lambda_max), so the two agree to 2 d times that.
    a, b = _features(30, 64, seed=2), _features(20, 64, seed=3, shift=0.1)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    largest = np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    tolerance = 2 * 64 * np.sqrt(sum_rtol(64, torch.float64) * largest) + _tolerance(a, b)
    assert frechet_distance_from_features(a, b) == pytest.approx(_fd_from_statistics(a, b), abs=tolerance)


def test_more_images_than_dimensions_take_the_qr_route_to_the_same_value():
    a, b = _features(90, 16, seed=4), _features(70, 16, seed=5, shift=-0.2)
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    direct = linalg.svdvals(centred_a @ centred_b.T).sum()  # 90 x 70, no reduction
    trace_sqrt = direct / np.sqrt(89 * 69)
    expected = float(
        (a.mean(0) - b.mean(0)) @ (a.mean(0) - b.mean(0))
        + np.trace(np.cov(a, rowvar=False))
        + np.trace(np.cov(b, rowvar=False))
        - 2 * trace_sqrt
    )
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, abs=_tolerance(a, b))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift_of_the_mean():
    a = _features(50, 8, seed=6)
    assert abs(frechet_distance_from_features(a, a)) <= _tolerance(a, a)
    # shifting every feature by c leaves the covariances: FD = |c|^2 d exactly
    shifted = a + 0.5
    assert frechet_distance_from_features(a, shifted) == pytest.approx(0.25 * 8, abs=_tolerance(a, shifted))


def test_set_sizes_and_shapes_are_checked():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="one d"):
        kid_unbiased(np.zeros((4, 3)), np.zeros((4, 5)))


def _kid_by_loops(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out term by term."""
    d = a.shape[1]

    def k(x, y):
        return (x @ y / d + 1.0) ** 3

    aa = sum(k(a[i], a[j]) for i in range(len(a)) for j in range(len(a)) if i != j) / (len(a) * (len(a) - 1))
    bb = sum(k(b[i], b[j]) for i in range(len(b)) for j in range(len(b)) if i != j) / (len(b) * (len(b) - 1))
    ab = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
    return aa + bb - 2 * ab


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    a, b = _features(7, 5, seed=8), _features(9, 5, seed=9, shift=0.4)
    assert kid_unbiased(a, b) == pytest.approx(_kid_by_loops(a, b), rel=1e-12)


def test_kid_subsets_are_torchmetrics_kid():
    real, fake = _features(40, 6, seed=10), _features(30, 6, seed=11, shift=0.2)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=12)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(3)
    expected_mean, expected_std = metric.compute()
    torch.manual_seed(3)  # the same permutations, drawn in the same order
    mean, std = kid_subsets(fake, real, subset_size=12, subsets=7)
    assert mean == pytest.approx(expected_mean.item(), rel=1e-9) and std == pytest.approx(
        expected_std.item(), rel=1e-9
    )
    # a generator makes it reproducible without touching torch's global stream
    first = kid_subsets(fake, real, 12, 7, torch.Generator().manual_seed(1))
    assert first == kid_subsets(fake, real, 12, 7, torch.Generator().manual_seed(1))


def test_kid_of_one_distribution_averages_to_zero():
    # unbiased: over many independent pairs of samples from one distribution, the mean is 0
    # within 4 standard errors of that mean
    values = [
        kid_unbiased(_features(20, 4, seed=100 + i), _features(20, 4, seed=200 + i)) for i in range(200)
    ]
    values = np.array(values)
    assert abs(values.mean()) <= 4 * values.std(ddof=1) / np.sqrt(len(values))
    shifted = kid_unbiased(_features(200, 4, seed=1), _features(200, 4, seed=2, shift=1.0))
    assert shifted > values.mean() + 4 * values.std(ddof=1)
