"""Fréchet Inception Distance with pytorch-fid's network and protocol.

Protocol (pytorch-fid): images in ``[-1, 1]`` are mapped to ``[0, 1]``, gray images are
replicated to three channels, and pytorch-fid's ``InceptionV3`` resizes them to 299x299
(bilinear) and rescales to ``[-1, 1]`` itself. Its pool3 features (2048-d by default) give
the mean and covariance of each image set, and

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

When both sets' features are at hand (:meth:`FIDScorer.features`, a reference bundle with
``features``) the trace of the square root is computed exactly, as the nuclear norm of the
centred cross-feature product
(:func:`~ibmd_pipeline.metrics.feature_distances.frechet_distance_from_features`); from
statistics alone it is ``pytorch_fid.fid_score.calculate_frechet_distance``'s matrix square
root, which with fewer images than feature dimensions (singular covariances) falls back to a
small diagonal offset. Either way, FID is biased upwards at small sample counts, by an amount
that depends on each model's own spread: compare FIDs at equal counts, with intervals.

Cost: on a 2-core CPU the Inception forward at 299x299 is the slow part (0.15-0.3 s per
image, batched under ``torch.inference_mode``); the 2048x2048 matrix square root adds 15-25 s
per FID value, the exact form a fraction of a second for a few hundred images. An H200 runs
the forward at about 0.2 ms per image. On CUDA, PyTorch's
default TF32 convolutions move the features by up to ~1e-2 (FID by ~1e-3 on identical sets);
negligible next to FID's sampling noise, but FIDs from different devices are not bit-equal.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import adaptive_avg_pool2d
from tqdm.auto import tqdm

from ibmd_pipeline.metrics.feature_distances import frechet_distance_from_features
from ibmd_pipeline.metrics.image_quality import to_rgb, to_unit_range
from ibmd_pipeline.metrics.weights import build_fid_inception

FeatureStatistics = dict[str, Any]
"""``{"mu": float64 (d,), "sigma": float64 (d, d), "n": int}`` and, optionally, ``"features"``
float32 (n, d): a catalog-savable bundle."""


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images (1 or 3 channels) -> 3-channel ``[0, 1]`` float32, pytorch-fid's input."""
    return to_rgb(to_unit_range(images))


@torch.inference_mode()
def inception_features(
    images: torch.Tensor,
    model: nn.Module,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Pool features ``(N, d)`` float32 of ``[-1, 1]`` images, in batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    features = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="FID features", disable=not progress):
        batch = inception_input(images[start : start + batch_size].to(device))
        pooled = model(batch)[0]
        # Blocks before the last return spatial maps; pytorch-fid averages them as here.
        if pooled.shape[2] != 1 or pooled.shape[3] != 1:
            pooled = adaptive_avg_pool2d(pooled, output_size=(1, 1))
        features.append(pooled.flatten(1).cpu().numpy())
    return np.concatenate(features) if features else np.empty((0, 0), dtype=np.float32)


def statistics_from_features(features: np.ndarray) -> FeatureStatistics:
    """Mean and (unbiased) covariance of ``(N, d)`` features, as pytorch-fid computes them."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors, got shape {features.shape}")
    return {
        "mu": np.mean(features, axis=0, dtype=np.float64),
        "sigma": np.cov(features, rowvar=False).astype(np.float64),
        "n": int(features.shape[0]),
    }


def activation_statistics(
    images: torch.Tensor,
    model: nn.Module,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the Inception pool features of ``[-1, 1]`` images."""
    stats = statistics_from_features(inception_features(images, model, batch_size, device, progress))
    return stats["mu"], stats["sigma"]


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _restated_frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` step by step, for SciPy >= 1.18.

    pytorch-fid 0.3.0 passes ``disp=False`` to ``scipy.linalg.sqrtm``, an argument SciPy 1.18
    removed; the computation here is the same (same offset fallback, same imaginary check).
    """
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance of two Gaussians (numpy arrays or tensors), via pytorch-fid."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    args = (_as_numpy(mu1), _as_numpy(sigma1), _as_numpy(mu2), _as_numpy(sigma2))
    try:
        with warnings.catch_warnings():
            # pytorch-fid still passes scipy's deprecated `disp` argument to sqrtm ...
            warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
            return float(calculate_frechet_distance(*args))
    except TypeError as err:
        # ... which SciPy >= 1.18 no longer accepts.
        if "disp" not in str(err):
            raise
        return _restated_frechet_distance(*args)


def check_statistics(stats: Mapping[str, Any], dims: int | None = None) -> FeatureStatistics:
    """Validate a statistics bundle (e.g. loaded from the catalog) and return it as numpy."""
    missing = {"mu", "sigma", "n"} - set(stats)
    if missing:
        raise ValueError(f"FID statistics lack {sorted(missing)}; expected keys mu, sigma, n")
    mu, sigma = _as_numpy(stats["mu"]), _as_numpy(stats["sigma"])
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or (dims is not None and d != dims):
        raise ValueError(
            f"FID statistics have mu {mu.shape} and sigma {sigma.shape}; expected ({dims or 'd'},) "
            f"and ({dims or 'd'}, {dims or 'd'})"
        )
    checked: FeatureStatistics = {"mu": mu, "sigma": sigma, "n": int(stats["n"])}
    if stats.get("features") is not None:
        features = np.asarray(_as_numpy(stats["features"]), np.float32)
        if features.shape != (checked["n"], d):
            expected = (checked["n"], d)
            raise ValueError(f"FID reference features have shape {features.shape}, expected {expected}")
        checked["features"] = features
    return checked


class FIDScorer:
    """FID of image sets against cached reference statistics (and features, when cached).

    Holds pytorch-fid's Inception (``dims`` = 2048 pool3 features by default; 64, 192 or 768
    read earlier blocks) and, once set, the reference. ``weights_source`` says which weights
    file the network came from (see :mod:`ibmd_pipeline.metrics.weights`).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        progress: bool = False,
        dims: int = 2048,
        reference: Mapping[str, Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.dims = dims
        model, self.weights_source = build_fid_inception(dims)
        self.model = model.to(self.device)
        self.reference: FeatureStatistics | None = None
        if reference is not None:
            self.set_reference(reference)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Inception features ``(N, dims)`` float32 of ``[-1, 1]`` images."""
        return inception_features(images, self.model, self.batch_size, self.device, self.progress)

    def statistics(self, images: torch.Tensor) -> FeatureStatistics:
        """``{"mu", "sigma", "n"}`` of ``[-1, 1]`` images (at least 2)."""
        return statistics_from_features(self.features(images))

    def reference_statistics(self, images: torch.Tensor) -> FeatureStatistics:
        """Compute the statistics and features of the reference (clean) images, keep them, and
        return them."""
        features = self.features(images)
        self.reference = {**statistics_from_features(features), "features": features}
        return self.reference

    def set_reference(self, stats: Mapping[str, Any]) -> None:
        """Use previously computed reference statistics (e.g. a cached catalog bundle)."""
        self.reference = check_statistics(stats, self.dims)

    def score(self, images: torch.Tensor) -> float:
        """FID of ``images`` against the reference: the exact trace form when the reference has
        its features, else pytorch-fid's from the statistics."""
        if self.reference is None:
            raise RuntimeError("no FID reference: call reference_statistics() or set_reference() first")
        features = self.features(images)
        if "features" in self.reference:
            return frechet_distance_from_features(features, self.reference["features"])
        stats = statistics_from_features(features)
        return frechet_distance(stats["mu"], stats["sigma"], self.reference["mu"], self.reference["sigma"])
