"""The expensive, model-independent references of an evaluation, computed once and cached.

* The CA classifier, trained on the clean *training* split (``classifier_model``).
* FID reference statistics of clean *test* images (``fid_reference_stats``).

Both bundles carry a fingerprint of the test data they belong to. An evaluation of new models
(``evaluate_models``) checks the fingerprints against the ``pairs_test`` it is given and stops
with :class:`StaleReferenceError` when they differ (new data, another ``num_images``, other FID
dims...), so a FID against statistics of other images can never be reported by mistake.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ibmd_pipeline.evaluation.config import EvaluateConfig
from ibmd_pipeline.metrics.classifier import train_classifier
from ibmd_pipeline.metrics.fid import FIDScorer
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.metrics.weights import WeightsUnavailableError

__all__ = [
    "CLASSIFIER_KIND",
    "REFRESH_HINT",
    "StaleReferenceError",
    "build_fid_scorer",
    "build_lpips_scorer",
    "check_references",
    "compute_fid_reference",
    "evaluated_count",
    "evaluated_subset",
    "fid_reference_images",
    "images_fingerprint",
    "reference_fingerprint",
    "train_reference_classifier",
]

logger = logging.getLogger(__name__)

#: ``kind`` of the classifier bundle (a trained classifier, or the reason there is none).
CLASSIFIER_KIND = "ca_classifier"
#: What a user does about stale references.
REFRESH_HINT = "re-run `kedro run --pipelines=evaluate_reference` (or the whole `evaluate` pipeline)"


class StaleReferenceError(RuntimeError):
    """Cached references (classifier, FID statistics) were computed for other test data or settings."""


# ---------------------------------------------------------------------------------------------
# Which images, and their fingerprints


def evaluated_count(bundle: Mapping[str, Any], config: EvaluateConfig) -> int:
    """How many test images are evaluated: ``num_images``, or all of a smaller split."""
    return min(config.num_images, int(bundle["clean"].shape[0]))


def evaluated_subset(bundle: Mapping[str, Any], config: EvaluateConfig) -> dict[str, Any]:
    """The first :func:`evaluated_count` examples of a pair bundle (clean, corrupted, mask?, labels?)."""
    n = evaluated_count(bundle, config)
    keys = [key for key in ("clean", "corrupted", "mask", "labels") if bundle.get(key) is not None]
    subset = {key: bundle[key][:n] for key in keys}
    subset["clean"] = subset["clean"].float()
    subset["corrupted"] = subset["corrupted"].float()
    return subset


def fid_reference_images(pairs_test: Mapping[str, Any], config: EvaluateConfig) -> Tensor:
    """The clean test images the FID reference is computed from (``evaluate.fid.reference``)."""
    clean = pairs_test["clean"].float()
    return clean if config.fid.reference == "test_split" else clean[: evaluated_count(pairs_test, config)]


def images_fingerprint(images: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (equal tensors give equal fingerprints)."""
    array = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(array.shape)}|{array.dtype}|".encode())
    digest.update(array.numpy().tobytes())
    return digest.hexdigest()


def reference_fingerprint(clean: Tensor, dims: int | None) -> str:
    """Fingerprint of a FID reference: the clean images' bytes, their count and the feature size."""
    text = f"{images_fingerprint(clean)}|n={clean.shape[0]}|dims={dims}"
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Metric networks, with an error that says how to get their weights


def _weights_error(metric: str, err: WeightsUnavailableError) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{err} To evaluate without {metric.upper()}, set `evaluate.{metric}.enabled: false` "
        f"(e.g. `kedro run --params evaluate.{metric}.enabled=false`); its values are then null."
    )


def build_fid_scorer(
    config: EvaluateConfig, device: str | torch.device = "cpu", progress: bool = True
) -> FIDScorer:
    """The FID Inception for ``evaluate.fid`` (raises a :class:`WeightsUnavailableError` that says
    how to provide the weights or to disable FID)."""
    try:
        return FIDScorer(
            device=device, batch_size=config.fid.batch_size, progress=progress, dims=config.fid.dims
        )
    except WeightsUnavailableError as err:
        raise _weights_error("fid", err) from err


def build_lpips_scorer(config: EvaluateConfig, device: str | torch.device = "cpu") -> LPIPSScorer:
    """The LPIPS network (raises a :class:`WeightsUnavailableError` that says how to provide the
    weights or to disable LPIPS)."""
    try:
        return LPIPSScorer(device=device, batch_size=config.batch_size)
    except WeightsUnavailableError as err:
        raise _weights_error("lpips", err) from err


# ---------------------------------------------------------------------------------------------
# Computing the references


def compute_fid_reference(
    pairs_test: Mapping[str, Any],
    config: EvaluateConfig,
    device: str | torch.device = "cpu",
    scorer: FIDScorer | None = None,
) -> dict[str, Any]:
    """FID reference statistics of clean test images, as a catalog bundle.

    Returns ``{"mu": float64 (d,), "sigma": float64 (d, d), "n", "dims", "fingerprint",
    "reference", "weights", "enabled": True}``; with FID disabled only the description and
    ``"enabled": False`` (an evaluation with FID enabled then asks for a re-run).
    """
    images = fid_reference_images(pairs_test, config)
    dims = config.fid.dims if config.fid.enabled else None
    description = {
        "n": int(images.shape[0]),
        "dims": dims,
        "reference": config.fid.reference,
        "fingerprint": reference_fingerprint(images, dims),
        "enabled": config.fid.enabled,
    }
    if not config.fid.enabled:
        return {**description, "weights": None}
    scorer = scorer or build_fid_scorer(config, device)
    logger.info("FID reference: Inception features (%d-d) of %d clean test images", dims, images.shape[0])
    stats = scorer.statistics(images)
    return {**description, "mu": stats["mu"], "sigma": stats["sigma"], "weights": scorer.weights_source}


def train_reference_classifier(
    pairs_train: Mapping[str, Any],
    pairs_test: Mapping[str, Any],
    config: EvaluateConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the CA classifier on the clean training split; returns its checkpoint bundle.

    The bundle is :func:`~ibmd_pipeline.metrics.classifier.train_classifier`'s checkpoint plus
    ``kind``, ``fingerprint`` (of the clean test images its ``clean_test_accuracy`` was measured
    on) and ``reason`` (None). Without labels, or with CA disabled, no classifier is trained:
    ``model`` is None and ``reason`` says why.
    """
    test_clean = pairs_test["clean"].float()
    base = {
        "kind": CLASSIFIER_KIND,
        "fingerprint": images_fingerprint(test_clean),
        "test_images": len(test_clean),
    }
    if not config.ca.enabled:
        reason = "CA was disabled (evaluate.ca.enabled: false) when the references were computed"
    elif pairs_train.get("labels") is None or pairs_test.get("labels") is None:
        reason = "the data has no class labels (CA needs a labelled source, e.g. class sub-folders)"
    else:
        reason = None
    if reason is not None:
        none = {"model": None, "config": None, "class_names": [], "clean_test_accuracy": None}
        return {**base, **none, "reason": reason}
    checkpoint = train_classifier(
        pairs_train["clean"].float(),
        pairs_train["labels"],
        config.ca.classifier,
        progress=progress,
        class_names=pairs_train.get("class_names") or None,
        test_images=test_clean,
        test_labels=pairs_test["labels"],
    )
    logger.info("CA classifier: %.1f%% on the clean test split", checkpoint["clean_test_accuracy"])
    return {**checkpoint, **base, "reason": None}


# ---------------------------------------------------------------------------------------------
# Checking cached references against the data


def check_references(
    pairs_test: Mapping[str, Any],
    config: EvaluateConfig,
    fid_reference: Mapping[str, Any] | None,
    classifier: Mapping[str, Any] | None,
) -> None:
    """Raise :class:`StaleReferenceError` when a cached reference that an enabled metric needs
    was made for other test images or settings; says what differs and how to refresh it."""
    problems = []
    if config.fid.enabled:
        images = fid_reference_images(pairs_test, config)
        if fid_reference is None or not fid_reference.get("enabled", False) or "mu" not in fid_reference:
            problems.append(
                "FID is enabled but the cached FID reference has no statistics (FID was disabled then)"
            )
        elif fid_reference.get("fingerprint") != reference_fingerprint(images, config.fid.dims):
            stored = f"{fid_reference.get('n')} images, {fid_reference.get('dims')}-d"
            wanted = f"{images.shape[0]} images, {config.fid.dims}-d"
            detail = "other clean test images" if stored == wanted else f"{stored} (now {wanted})"
            problems.append(f"the FID reference statistics belong to {detail}")
    if config.ca.enabled:
        if classifier is None or classifier.get("kind") != CLASSIFIER_KIND:
            problems.append("there is no cached CA classifier bundle")
        elif classifier.get("fingerprint") != images_fingerprint(pairs_test["clean"].float()):
            problems.append("the CA classifier was trained and tested for other data")
        elif classifier.get("model") is None and pairs_test.get("labels") is not None:
            problems.append(f"no CA classifier was trained ({classifier.get('reason')})")
    if problems:
        raise StaleReferenceError(
            "the cached evaluation references do not fit this test data and these settings: "
            + "; ".join(problems)
            + f". {REFRESH_HINT}."
        )
