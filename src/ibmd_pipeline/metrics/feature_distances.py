"""Distances between two sets of feature vectors: Fréchet distance (exact trace form) and KID.

Both compare a model's features with a reference's, whatever network produced them (FID's
Inception, the task classifier's penultimate layer).

**Fréchet distance** of the Gaussians fitted to the two sets (Heusel et al. 2017)::

    FD = ||mu_a - mu_b||^2 + Tr S_a + Tr S_b - 2 Tr (S_a S_b)^{1/2}

With centred feature matrices ``A`` (n_a x d) and ``B`` (n_b x d), ``S_a = A^T A / (n_a - 1)``
and ``S_b = B^T B / (n_b - 1)``. The non-zero eigenvalues of ``S_a S_b`` are those of
``(A B^T)(A B^T)^T / ((n_a - 1)(n_b - 1))``, i.e. the squared singular values of the
cross-feature product ``A B^T`` over that factor, so::

    Tr (S_a S_b)^{1/2} = ||A B^T||_* / sqrt((n_a - 1)(n_b - 1))

(``||.||_*`` the nuclear norm). This is exact, needs an SVD of an ``n_a x n_b`` matrix (at most
``d x d``: a set with more images than dimensions is first reduced to the ``R`` of its QR
decomposition) instead of the square root of a ``d x d`` one (2048 x 2048 for FID, 15-25 s on 2
cores), and has no singular-matrix fallback: with fewer images than dimensions ``scipy.linalg.sqrtm`` (what
pytorch-fid uses) is ill-conditioned, the nuclear norm is not.

**Kernel Inception Distance** (Bińkowski et al. 2018): the unbiased estimate of the squared
maximum mean discrepancy with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``::

    MMD^2_u = sum_{i != j} k(a_i, a_j) / (n_a (n_a - 1)) + sum_{i != j} k(b_i, b_j) / (n_b (n_b - 1))
              - 2 sum_{i, j} k(a_i, b_j) / (n_a n_b)

Unbiased at any sample size (it may dip below 0 when the sets agree). :func:`kid_subsets` is
torchmetrics' procedure (mean and standard deviation over random equal-size subsets, with its
``poly_mmd``) driven by a seeded generator; :func:`kid_unbiased` is the estimate on all features,
for sets of different sizes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import svdvals
from torchmetrics.image.kid import poly_mmd

__all__ = ["frechet_distance_from_features", "kid_subsets", "kid_unbiased"]

#: KID's polynomial kernel: degree 3, coefficient 1, gamma = 1 / d (torchmetrics' defaults).
KID_DEGREE = 3
KID_COEF = 1.0


Features = np.ndarray | torch.Tensor


def _as_feature_pair(a: Features, b: Features) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, np.float64) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) feature sets of one d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(
            f"a distance between feature sets needs at least 2 of each, got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def _row_reduced(centred: np.ndarray) -> np.ndarray:
    """``centred`` itself, or, with more rows than columns, the ``R`` of its QR decomposition:
    ``A = Q R`` with orthonormal ``Q``, so ``A B^T = Q_a (R_a R_b^T) Q_b^T`` has the singular values
    of ``R_a R_b^T`` and the SVD stays at most ``d x d``."""
    rows, columns = centred.shape
    return np.linalg.qr(centred, mode="r") if rows > columns else centred


def frechet_distance_from_features(a: Features, b: Features) -> float:
    """Fréchet distance of the Gaussians fitted to feature sets ``a`` (n_a, d) and ``b`` (n_b, d),
    with the exact trace form (module docstring); float64 throughout."""
    a, b = _as_feature_pair(a, b)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    centred_a, centred_b = a - mean_a, b - mean_b
    trace_a = np.einsum("ij,ij->", centred_a, centred_a) / (a.shape[0] - 1)
    trace_b = np.einsum("ij,ij->", centred_b, centred_b) / (b.shape[0] - 1)
    cross = _row_reduced(centred_a) @ _row_reduced(centred_b).T
    trace_sqrt = svdvals(cross).sum() / np.sqrt((a.shape[0] - 1) * (b.shape[0] - 1))
    difference = mean_a - mean_b
    return float(difference @ difference + trace_a + trace_b - 2.0 * trace_sqrt)


def kid_unbiased(a: Features, b: Features) -> float:
    """Unbiased MMD^2 with KID's cubic kernel between all of ``a`` (n_a, d) and ``b`` (n_b, d)."""
    a, b = _as_feature_pair(a, b)
    gamma = 1.0 / a.shape[1]
    k_aa = (a @ a.T * gamma + KID_COEF) ** KID_DEGREE
    k_bb = (b @ b.T * gamma + KID_COEF) ** KID_DEGREE
    k_ab = (a @ b.T * gamma + KID_COEF) ** KID_DEGREE
    n_a, n_b = a.shape[0], b.shape[0]
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n_a * (n_a - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n_b * (n_b - 1))
    return float(within_a + within_b - 2.0 * k_ab.mean())


def kid_subsets(
    features: Features,
    reference: Features,
    subset_size: int,
    subsets: int,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID as torchmetrics reports it: ``(mean, std)`` of the unbiased MMD^2 over ``subsets`` random
    subsets of ``subset_size`` features of each set (at most the smaller set's size).

    Per subset the reference is permuted first, then the features, as torchmetrics'
    ``KernelInceptionDistance.compute`` does; ``generator`` (default: torch's global one) draws
    the permutations. The standard deviation is the population one (``unbiased=False``).
    """
    model, ref = (torch.from_numpy(x) for x in _as_feature_pair(features, reference))
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, model.shape[0], ref.shape[0])
    scores = []
    for _ in range(subsets):
        ref_subset = ref[torch.randperm(ref.shape[0], generator=generator)[:size]]
        model_subset = model[torch.randperm(model.shape[0], generator=generator)[:size]]
        scores.append(poly_mmd(ref_subset, model_subset, degree=KID_DEGREE, coef=KID_COEF))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))
