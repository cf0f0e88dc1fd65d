"""From measurements to values, intervals and comparisons, on synthetic measurements (no networks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ibmd_pipeline.evaluation.config import BootstrapSettings, KIDSettings
from ibmd_pipeline.evaluation.measure import RunMeasurement
from ibmd_pipeline.evaluation.summary import Summarizer
from ibmd_pipeline.metrics.feature_distances import frechet_distance_from_features, kid_subsets, kid_unbiased
from ibmd_pipeline.metrics.uncertainty import (
    bootstrap_indices,
    centred_interval,
    half_sample_indices,
    percentile_interval,
    resample_generator,
)

BOOTSTRAP = BootstrapSettings(resamples=60, confidence=0.9, seed=4)
KID = KIDSettings(subset_size=6, subsets=5)
N, SEEDS, DIM = 12, 2, 5


def measurement(label: str, seed: int, psnr_shift: float = 0.0, images: int = N) -> RunMeasurement:
    rng = np.random.default_rng(seed)
    return RunMeasurement(
        label=label,
        model=label.split("@")[0],
        nfe=int(label.split("@")[1]),
        sampler=None,
        seeds=tuple(range(SEEDS)),
        per_image={
            "psnr": 20 + psnr_shift + rng.standard_normal((SEEDS, images)),
            "correct": (rng.random((SEEDS, images)) < 0.7).astype(float),
        },
        classifier_features=rng.standard_normal((SEEDS, images, DIM)).astype(np.float32),
        inception_features=rng.standard_normal((1, images, DIM)).astype(np.float32) + 0.3,
        samples=torch.zeros(1, 1, 4, 4),
        energy_distance=rng.random(images // 2),
    )


@pytest.fixture
def summarizer():
    rng = np.random.default_rng(0)
    return Summarizer(
        BOOTSTRAP,
        KID,
        inception_reference=rng.standard_normal((20, DIM)).astype(np.float32),
        inception_paired=False,
        classifier_reference=rng.standard_normal((N, DIM)).astype(np.float32),
    )


def test_means_of_per_image_values_with_their_bootstrap_interval(summarizer):
    m = measurement("student@1", seed=1)
    summary = summarizer.summarize(m)
    per_image = m.per_image["psnr"].mean(0)  # each image's mean over the seeds
    indices = bootstrap_indices(N, 60, resample_generator(4, N, "boot"))
    assert summary["psnr"] == pytest.approx(per_image.mean())
    assert summary["intervals"]["psnr"] == pytest.approx(percentile_interval(per_image[indices].mean(1), 0.9))
    assert summary["ca"] == pytest.approx(100 * m.per_image["correct"].mean())
    assert summary["lpips"] is None and "lpips" not in summary["intervals"]
    assert summary["energy_distance"] == pytest.approx(m.energy_distance.mean()) and summary["images"] == N


def test_set_metrics_on_every_seeds_features_against_the_reference(summarizer):
    m = measurement("student@1", seed=2)
    summary = summarizer.summarize(m)
    model_classifier = m.classifier_features.reshape(-1, DIM)  # both seeds' features of the images
    assert summary["fd_classifier"] == pytest.approx(
        frechet_distance_from_features(model_classifier, summarizer.classifier_reference)
    )
    mean, std = kid_subsets(
        m.inception_features[0], summarizer.inception_reference, 6, 5, torch.Generator().manual_seed(4)
    )
    assert (summary["kid"], summary["kid_std"]) == pytest.approx((mean, std))
    # FID's interval: half-samples of the images (the unpaired reference half-sampled on its own)
    halves = half_sample_indices(N, 60, resample_generator(4, N, "half"))
    reference_halves = half_sample_indices(20, 60, resample_generator(4, 20, "reference-half"))
    values = [
        frechet_distance_from_features(m.inception_features[0][rows], summarizer.inception_reference[ref])
        for rows, ref in zip(halves, reference_halves, strict=True)
    ]
    assert summary["intervals"]["fid"] == pytest.approx(
        centred_interval(summary["fid"], np.array(values), 0.9)
    )
    # KID's half-samples use the unbiased estimate on all pairs
    kid_values = [
        kid_unbiased(m.inception_features[0][rows], summarizer.inception_reference[ref])
        for rows, ref in zip(halves, reference_halves, strict=True)
    ]
    assert summary["intervals"]["kid"] == pytest.approx(
        centred_interval(summary["kid"], np.array(kid_values), 0.9)
    )


def test_a_paired_reference_is_resampled_with_the_images():
    m = measurement("student@1", seed=3)
    reference = np.random.default_rng(9).standard_normal((N, DIM)).astype(np.float32)
    paired = Summarizer(BOOTSTRAP, KID, inception_reference=reference, inception_paired=True)
    summary = paired.summarize(m)
    halves = half_sample_indices(N, 60, resample_generator(4, N, "half"))
    values = [frechet_distance_from_features(m.inception_features[0][r], reference[r]) for r in halves]
    assert summary["intervals"]["fid"] == pytest.approx(
        centred_interval(summary["fid"], np.array(values), 0.9)
    )
    assert (
        summary["fd_classifier"] is None and summary["kid_classifier_std"] is None
    )  # no classifier reference


def test_a_comparison_is_paired_image_by_image_and_on_the_same_resamples(summarizer):
    student, teacher = measurement("student@1", seed=5, psnr_shift=3.0), measurement("teacher@100", seed=6)
    comparison = summarizer.compare(student, teacher)
    psnr = comparison["metrics"]["psnr"]
    differences = student.per_image["psnr"].mean(0) - teacher.per_image["psnr"].mean(0)
    indices = bootstrap_indices(N, 60, resample_generator(4, N, "boot"))
    assert psnr["difference"] == pytest.approx(differences.mean())
    assert psnr["interval"] == pytest.approx(percentile_interval(differences[indices].mean(1), 0.9))
    assert psnr["verdict"] == "better"  # 3 dB apart on every image's noise of 1 dB
    fid = comparison["metrics"]["fid"]
    student_fid, teacher_fid = summarizer.summarize(student)["fid"], summarizer.summarize(teacher)["fid"]
    assert fid["difference"] == pytest.approx(student_fid - teacher_fid)
    assert set(comparison["ca_mcnemar"]) == {"a_only", "b_only", "p_value"}
    assert "lpips_win_rate" not in comparison  # no LPIPS measured


def test_runs_of_different_sizes_are_compared_on_their_common_first_images(summarizer):
    student, capped = measurement("student@1", seed=7), measurement("teacher@999", seed=8, images=8)
    comparison = summarizer.compare(student, capped)
    assert comparison["images"] == 8
    differences = student.per_image["psnr"][:, :8].mean(0) - capped.per_image["psnr"].mean(0)
    assert comparison["metrics"]["psnr"]["difference"] == pytest.approx(differences.mean())
    common = frechet_distance_from_features(student.inception_features[0][:8], summarizer.inception_reference)
    assert comparison["metrics"]["fid"]["difference"] == pytest.approx(
        common - summarizer.summarize(capped)["fid"]
    )
    assert comparison["metrics"]["energy_distance"]["difference"] == pytest.approx(
        (student.energy_distance[:4] - capped.energy_distance[:4]).mean()
    )


def test_too_few_images_give_values_without_intervals():
    m = measurement("student@1", seed=9, images=3)
    summary = Summarizer(BOOTSTRAP, KID, classifier_reference=np.zeros((3, DIM), np.float32) + 1).summarize(m)
    assert summary["psnr"] is not None and "psnr" in summary["intervals"]  # 3 images: a bootstrap exists
    assert (
        summary["fd_classifier"] is not None and "fd_classifier" not in summary["intervals"]
    )  # no half-samples
