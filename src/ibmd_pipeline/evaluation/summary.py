"""From per-image measurements to the report's numbers: point values, 95% intervals, differences
between models and the verdicts drawn from them.

Means of per-image values (PSNR, SSIM, LPIPS, CA, consistency, energy distance, diversity) use
the paired bootstrap over images; FID and KID (on Inception and on classifier features) use
half-samples without replacement (:mod:`ibmd_pipeline.metrics.uncertainty`). The resample of
``n`` images is one and the same for every model, and for a paired reference, so a difference
between two models is computed on the same resamples. With several sampler seeds, an image's
value is its mean over the seeds (images are the independent units); Inception and classifier
feature sets hold every seed's features of the resampled images.

The reference of the Inception metrics is the cached reference set (disjoint training images by
default: resampled independently of the models, with one resample per index shared by all
models; or the clean evaluated images: resampled with them). The reference of the classifier
metrics is the classifier's features of the clean evaluated images, paired with the models'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ibmd_pipeline.evaluation.config import BootstrapSettings, KIDSettings
from ibmd_pipeline.evaluation.measure import RunMeasurement
from ibmd_pipeline.metrics.feature_distances import frechet_distance_from_features, kid_subsets, kid_unbiased
from ibmd_pipeline.metrics.uncertainty import (
    Direction,
    bootstrap_indices,
    centred_interval,
    half_sample_indices,
    mcnemar_exact,
    percentile_interval,
    resample_generator,
    verdict,
)

__all__ = [
    "DIRECTIONS",
    "MEAN_METRICS",
    "SET_METRICS",
    "Summarizer",
]

#: Which way each metric is better; diversity has no better direction.
DIRECTIONS: dict[str, Direction] = {
    "fid": "lower",
    "kid": "lower",
    "fd_classifier": "lower",
    "kid_classifier": "lower",
    "lpips": "lower",
    "ca": "higher",
    "psnr": "higher",
    "ssim": "higher",
    "consistency": "lower",
    "energy_distance": "lower",
}
#: Report metric -> the per-image value it is the mean of (CA: percent correct).
MEAN_METRICS: dict[str, str] = {
    "lpips": "lpips",
    "ca": "correct",
    "psnr": "psnr",
    "ssim": "ssim",
    "consistency": "consistency",
}
#: Metrics of a whole feature set.
SET_METRICS: tuple[str, ...] = ("fid", "kid", "fd_classifier", "kid_classifier")

Interval = list[float]


def _seed_mean(values: np.ndarray) -> np.ndarray:
    """``(seeds, images)`` -> ``(images,)``: each image's mean over the seeds."""
    return np.asarray(values, np.float64).mean(axis=0)


@dataclass
class _SetStatistic:
    estimate: float
    resampled: np.ndarray | None  # (resamples,) half-sample values, None with too few images
    spread: float | None = None  # KID: the standard deviation over subsets


@dataclass
class Summarizer:
    """Point values, intervals and comparisons of measurements, with shared resamples.

    inception_reference: reference Inception features ``(R, d)``; ``inception_paired``: whether
    row ``i`` is the clean version of evaluated image ``i`` (then resampled with the models).
    classifier_reference: classifier features of the clean evaluated images ``(N, E)``.
    blas_threads: BLAS threads of the whole-set metrics (module docstring); None = the library's
        own setting.
    """

    bootstrap: BootstrapSettings
    kid: KIDSettings
    inception_reference: np.ndarray | None = None
    inception_paired: bool = False
    classifier_reference: np.ndarray | None = None
    blas_threads: int | None = 1
    _indices: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    _sets: dict[tuple[str, str, int], _SetStatistic] = field(default_factory=dict)

    # ------------------------------------------------------------------ resamples

    def _resamples(self, kind: str, n: int) -> np.ndarray | None:
        """Bootstrap (``boot``) or half-sample (``half``) indices of ``n`` images, shared by every
        caller; None when ``n`` is too small for them."""
        if (kind == "boot" and n < 2) or (kind != "boot" and n < 4):
            return None
        key = (kind, n)
        if key not in self._indices:
            generator = resample_generator(self.bootstrap.seed, n, kind)
            draw = bootstrap_indices if kind == "boot" else half_sample_indices
            self._indices[key] = draw(n, self.bootstrap.resamples, generator)
        return self._indices[key]

    def _interval(self, values: np.ndarray) -> tuple[float, Interval | None]:
        """Mean of per-image values and its bootstrap percentile interval."""
        indices = self._resamples("boot", len(values))
        if indices is None:
            return float(values.mean()), None
        return float(values.mean()), list(
            percentile_interval(values[indices].mean(1), self.bootstrap.confidence)
        )

    # ------------------------------------------------------------------ whole-set statistics

    def _feature_sets(
        self, measurement: RunMeasurement, metric: str
    ) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """``(model features (seeds, images, dim), reference (rows, dim), paired)`` of a set metric."""
        if metric in ("fid", "kid"):
            features, reference, paired = (
                measurement.inception_features,
                self.inception_reference,
                self.inception_paired,
            )
        else:
            features, reference, paired = measurement.classifier_features, self.classifier_reference, True
        if features is None or reference is None:
            return None
        return np.asarray(features), np.asarray(reference), paired

    def _point_value(
        self, metric: str, model: np.ndarray, reference: np.ndarray
    ) -> tuple[float, float | None]:
        """The reported value (and KID's spread over subsets) of a whole feature set."""
        if metric in ("fid", "fd_classifier"):
            return frechet_distance_from_features(model, reference), None
        generator = torch.Generator().manual_seed(self.bootstrap.seed)
        return kid_subsets(model, reference, self.kid.subset_size, self.kid.subsets, generator)

    @staticmethod
    def _half_sample_value(metric: str, model: np.ndarray, reference: np.ndarray) -> float:
        if metric in ("fid", "fd_classifier"):
            return frechet_distance_from_features(model, reference)
        return kid_unbiased(model, reference)

    def _set_statistic(self, measurement: RunMeasurement, metric: str, n: int) -> _SetStatistic | None:
        """``metric`` of the first ``n`` images of ``measurement``, and its half-sample values."""
        key = (measurement.label, metric, n)
        if key in self._sets:
            return self._sets[key]
        sets = self._feature_sets(measurement, metric)
        if sets is None:
            return None
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            statistic = self._compute_set_statistic(metric, n, *sets)
        self._sets[key] = statistic
        return statistic

    def _compute_set_statistic(
        self, metric: str, n: int, features: np.ndarray, reference: np.ndarray, paired: bool
    ) -> _SetStatistic:
        dim = features.shape[-1]
        model_rows = features[:, :n].reshape(-1, dim)
        reference_rows = reference[:n] if paired else reference
        estimate, spread = self._point_value(metric, model_rows, reference_rows)
        halves = self._resamples("half", n)
        reference_halves = None if paired else self._resamples("reference-half", len(reference))
        resampled = None
        if halves is not None and (paired or reference_halves is not None):
            values = []
            for b, rows in enumerate(halves):
                ref = reference[rows] if paired else reference[reference_halves[b]]
                values.append(self._half_sample_value(metric, features[:, rows].reshape(-1, dim), ref))
            resampled = np.array(values)
        return _SetStatistic(estimate, resampled, spread)

    # ------------------------------------------------------------------ one measurement

    def summarize(self, measurement: RunMeasurement) -> dict[str, Any]:
        """``{metric: value}`` for every metric of the report (None when not measured), plus
        ``kid_std``, ``kid_classifier_std`` and ``intervals: {metric: [low, high]}``."""
        values: dict[str, Any] = {}
        intervals: dict[str, Interval | None] = {}
        for metric, source in MEAN_METRICS.items():
            per_image = measurement.per_image.get(source)
            if per_image is None:
                values[metric] = None
                continue
            scale = 100.0 if metric == "ca" else 1.0
            mean, interval = self._interval(scale * _seed_mean(per_image))
            values[metric], intervals[metric] = mean, interval
        for metric, per_image in (
            ("energy_distance", measurement.energy_distance),
            ("diversity", measurement.diversity),
        ):
            if per_image is None:
                values[metric] = None
                continue
            values[metric], intervals[metric] = self._interval(np.asarray(per_image, np.float64))
        n = measurement.num_images
        for metric in SET_METRICS:
            statistic = self._set_statistic(measurement, metric, self._set_count(measurement, metric))
            if statistic is None:
                values[metric] = None
                if metric.startswith("kid"):
                    values[f"{metric}_std"] = None
                continue
            values[metric] = statistic.estimate
            if metric.startswith("kid"):
                values[f"{metric}_std"] = statistic.spread
            if statistic.resampled is not None:
                intervals[metric] = list(
                    centred_interval(statistic.estimate, statistic.resampled, self.bootstrap.confidence)
                )
        values["intervals"] = {k: v for k, v in intervals.items() if v is not None}
        values["images"] = n
        return values

    def _set_count(self, measurement: RunMeasurement, metric: str) -> int:
        features = (
            measurement.inception_features if metric in ("fid", "kid") else measurement.classifier_features
        )
        return 0 if features is None else int(features.shape[1])

    # ------------------------------------------------------------------ two measurements

    def compare(self, candidate: RunMeasurement, baseline: RunMeasurement) -> dict[str, Any]:
        """``candidate - baseline`` on their common first images, for every metric both measured:
        ``{metric: {"difference", "interval", "verdict"}}``, McNemar's test of CA
        (``ca_mcnemar``) and the candidate's per-image LPIPS win rate over the baseline."""
        result: dict[str, Any] = {"candidate": candidate.label, "baseline": baseline.label, "metrics": {}}
        n = min(candidate.num_images, baseline.num_images)
        result["images"] = n
        for metric, source in MEAN_METRICS.items():
            a, b = candidate.per_image.get(source), baseline.per_image.get(source)
            if a is None or b is None:
                continue
            scale = 100.0 if metric == "ca" else 1.0
            self._put_mean_difference(result, metric, scale * (_seed_mean(a[:, :n]) - _seed_mean(b[:, :n])))
        if candidate.energy_distance is not None and baseline.energy_distance is not None:
            m = min(len(candidate.energy_distance), len(baseline.energy_distance))
            self._put_mean_difference(
                result, "energy_distance", candidate.energy_distance[:m] - baseline.energy_distance[:m]
            )
        for metric in SET_METRICS:
            common = min(self._set_count(candidate, metric), self._set_count(baseline, metric))
            a, b = (
                self._set_statistic(candidate, metric, common),
                self._set_statistic(baseline, metric, common),
            )
            if a is None or b is None:
                continue
            difference = a.estimate - b.estimate
            interval = None
            if a.resampled is not None and b.resampled is not None:
                interval = list(
                    centred_interval(difference, a.resampled - b.resampled, self.bootstrap.confidence)
                )
            self._put(result, metric, difference, interval)
        if "correct" in candidate.per_image and "correct" in baseline.per_image:
            result["ca_mcnemar"] = mcnemar_exact(
                candidate.per_image["correct"][:, :n], baseline.per_image["correct"][:, :n]
            )
        if "lpips" in candidate.per_image and "lpips" in baseline.per_image:
            a, b = (
                _seed_mean(candidate.per_image["lpips"][:, :n]),
                _seed_mean(baseline.per_image["lpips"][:, :n]),
            )
            wins = np.where(a < b, 1.0, np.where(a == b, 0.5, 0.0))
            rate, interval = self._interval(wins)
            result["lpips_win_rate"] = {"rate": rate, "interval": interval}
        return result

    def _put_mean_difference(self, result: dict[str, Any], metric: str, differences: np.ndarray) -> None:
        difference, interval = self._interval(differences)
        self._put(result, metric, difference, interval)

    @staticmethod
    def _put(result: dict[str, Any], metric: str, difference: float, interval: Interval | None) -> None:
        result["metrics"][metric] = {
            "difference": difference,
            "interval": interval,
            "verdict": None if interval is None else verdict(tuple(interval), DIRECTIONS[metric]),
        }
