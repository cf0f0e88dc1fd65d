"""FID: the Fréchet distance formula, pytorch-fid's preprocessing, and FID's basic properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ibmd_pipeline.metrics import fid, weights


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # For commuting covariances (same eigenvectors Q) the trace term is sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # Tensors are accepted as well (statistics loaded back from the catalog are tensors).
    as_tensors = [torch.from_numpy(v) for v in (mu1, sigma1, mu2, sigma2)]
    assert fid.frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_restated_distance_equals_pytorch_fid_and_serves_newer_scipy(monkeypatch):
    from pytorch_fid import fid_score

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((12, 20)), rng.standard_normal((12, 20)) + 0.2  # singular covariances
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    expected = fid.frechet_distance(*stats)
    assert fid._restated_frechet_distance(*stats) == pytest.approx(expected, rel=1e-9)

    def scipy_118(*args, **kwargs):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", scipy_118)
    assert fid.frechet_distance(*stats) == pytest.approx(expected, rel=1e-9)


def test_statistics_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    stats = fid.statistics_from_features(features)
    centred = features.astype(np.float64) - features.mean(0, dtype=np.float64)
    np.testing.assert_allclose(stats["mu"], features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], centred.T @ centred / 9, rtol=1e-6)
    assert stats["n"] == 10 and stats["sigma"].dtype == np.float64
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics_from_features(features[:1])


def test_inception_input_maps_range_and_replicates_gray():
    gray = torch.tensor([-1.0, 0.0, 1.0, 1.5]).reshape(1, 1, 2, 2)
    out = fid.inception_input(gray)
    assert out.shape == (1, 3, 2, 2)
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 0.5], [1.0, 1.0]]))  # clamped overshoot
    assert torch.equal(out[0, 0], out[0, 2])


def test_features_follow_pytorch_fid_protocol(inception_2048, fid_torchscript, make_shapes):
    # Small gray images in [-1, 1]: our statistics must equal those of the TF-graph network fed
    # what pytorch-fid feeds it: 3 channels, bilinear resize to 299 in [0, 1], then 2u - 1.
    images = make_shapes(3, size=32, seed=3)
    mu, sigma = fid.activation_statistics(images, inception_2048, batch_size=2)
    u = F.interpolate(
        ((images + 1) / 2).repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False
    )
    with torch.inference_mode():
        reference = fid_torchscript(2 * u - 1).double().numpy()
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(mu, reference.mean(0), atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(reference, rowvar=False), atol=1e-5)


@pytest.fixture(scope="module")
def fid64():
    # The 64-d features (first block) keep the property test fast: the forward costs a fraction
    # of the full network and the matrix square root is tiny. The 2048-d path is checked above.
    return fid.FIDScorer(dims=64, batch_size=16)


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_is_zero_on_the_reference_and_grows_with_noise(fid64, make_shapes):
    images = make_shapes(32, size=32, seed=0)
    reference = fid64.reference_statistics(images)
    assert fid64.weights_source == weights.locate_fid_inception_weights().label
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=generator)
    scores = [fid64.score(images)] + [
        fid64.score((images + level * noise).clamp(-1, 1)) for level in (0.1, 0.3, 0.6)
    ]
    assert abs(scores[0]) < 1e-4
    assert all(a < b for a, b in zip(scores[:-1], scores[1:], strict=True)), scores

    # Cached statistics come back from the catalog as tensors; they are taken as they were.
    cached = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in reference.items()}
    fid64.reference = None
    fid64.set_reference(cached)
    assert fid64.reference["n"] == 32 and isinstance(fid64.reference["sigma"], np.ndarray)
    np.testing.assert_array_equal(fid64.reference["sigma"], reference["sigma"])
    np.testing.assert_array_equal(fid64.reference["mu"], reference["mu"])


def test_scorer_rejects_missing_or_mismatched_reference():
    fresh = fid.FIDScorer(dims=64)
    with pytest.raises(RuntimeError, match="no FID reference"):
        fresh.score(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        fresh.set_reference({"mu": np.zeros(2048), "sigma": np.eye(2048), "n": 5})
    with pytest.raises(ValueError, match="lack"):
        fresh.set_reference({"mu": np.zeros(64)})
    with pytest.raises(ValueError, match="must be one of"):
        fid.FIDScorer(dims=100)
