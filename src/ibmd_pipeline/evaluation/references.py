"""What an evaluation of new students reuses, computed once and cached: the references and the
teacher's own evaluation.

* The CA classifier, trained on the clean *training* split (``classifier_model``).
* The Inception reference: features (and their mean and covariance) of clean images
  (``fid_reference_stats``): by default ``fid.reference_images`` clean images of the training
  split, none of which any model restores (``disjoint``); or the clean versions of the
  evaluated images (``evaluated``, I2SB's paired protocol); or the whole clean test split.
* The teacher's evaluation (``teacher_evaluation``, :mod:`ibmd_pipeline.evaluation.runner`):
  the teacher's restorations measured at every NFE, which do not change between students.

Each bundle carries a fingerprint of the test data and the settings it was computed with. An
evaluation of new models (``evaluate_models``) checks them against the ``pairs_test``, the
teacher and the settings it is given, and stops with :class:`StaleReferenceError` when they
differ (new data, another ``num_images``, other FID dims, another teacher...), so a metric
against another reference can never be reported by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.evaluation.config import EvaluateConfig
from ibmd_pipeline.metrics.classifier import min_image_size, train_classifier
from ibmd_pipeline.metrics.fid import FIDScorer, statistics_from_features
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.metrics.weights import WeightsUnavailableError

__all__ = [
    "CLASSIFIER_KIND",
    "REFRESH_HINT",
    "TEACHER_REFRESH_HINT",
    "StaleReferenceError",
    "build_fid_scorer",
    "build_lpips_scorer",
    "check_references",
    "check_teacher_evaluation",
    "compute_fid_reference",
    "evaluated_count",
    "evaluated_subset",
    "fid_reference_images",
    "images_fingerprint",
    "inception_count",
    "reference_fingerprint",
    "state_fingerprint",
    "train_reference_classifier",
]

logger = logging.getLogger(__name__)

#: ``kind`` of the classifier bundle (a trained classifier, or the reason there is none).
CLASSIFIER_KIND = "ca_classifier"
#: What a user does about stale references.
REFRESH_HINT = "re-run `kedro run --pipelines=evaluate_reference` (or the whole `evaluate` pipeline)"
#: What a user does about a stale teacher evaluation.
TEACHER_REFRESH_HINT = "re-run `kedro run --pipelines=evaluate_teacher` (or the whole `evaluate` pipeline)"


class StaleReferenceError(RuntimeError):
    """Cached references (classifier, FID statistics, the teacher's evaluation) were computed for
    other test data, another teacher or other settings."""


# ---------------------------------------------------------------------------------------------
# Which images, and their fingerprints


def evaluated_count(bundle: Mapping[str, Any], config: EvaluateConfig) -> int:
    """How many test images are evaluated: ``num_images``, or all of a smaller split."""
    return min(config.num_images, int(bundle["clean"].shape[0]))


def inception_count(bundle: Mapping[str, Any], config: EvaluateConfig) -> int:
    """How many of the evaluated images go through Inception (``fid.num_images``, at most all)."""
    evaluated = evaluated_count(bundle, config)
    return evaluated if config.fid.num_images is None else min(evaluated, config.fid.num_images)


def evaluated_subset(bundle: Mapping[str, Any], config: EvaluateConfig) -> dict[str, Any]:
    """The first :func:`evaluated_count` examples of a pair bundle (clean, corrupted, mask?, labels?)."""
    n = evaluated_count(bundle, config)
    keys = [key for key in ("clean", "corrupted", "mask", "labels") if bundle.get(key) is not None]
    subset = {key: bundle[key][:n] for key in keys}
    subset["clean"] = subset["clean"].float()
    subset["corrupted"] = subset["corrupted"].float()
    return subset


def fid_reference_images(
    pairs_test: Mapping[str, Any], config: EvaluateConfig, pairs_train: Mapping[str, Any] | None = None
) -> Tensor:
    """The clean images of the Inception reference (``evaluate.fid.reference``); the disjoint
    reference needs ``pairs_train``."""
    if config.fid.reference == "test_split":
        return pairs_test["clean"].float()
    if config.fid.reference == "evaluated":
        return pairs_test["clean"][: inception_count(pairs_test, config)].float()
    if pairs_train is None:
        raise ValueError("the disjoint FID reference (evaluate.fid.reference: disjoint) needs pairs_train")
    clean = pairs_train["clean"]
    count = clean.shape[0] if config.fid.reference_images is None else config.fid.reference_images
    return clean[:count].float()


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


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's names and values: identifies weights without a catalog version."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(images_fingerprint(torch.as_tensor(state[name])).encode())
    return digest.hexdigest()


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
        return LPIPSScorer(device=device, batch_size=config.batch_size, min_size=config.lpips.min_size)
    except WeightsUnavailableError as err:
        raise _weights_error("lpips", err) from err


# ---------------------------------------------------------------------------------------------
# Computing the references


def compute_fid_reference(
    pairs_test: Mapping[str, Any],
    config: EvaluateConfig,
    device: str | torch.device = "cpu",
    scorer: FIDScorer | None = None,
    pairs_train: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Inception reference of clean images (:func:`fid_reference_images`), as a catalog bundle.

    Returns ``{"features": float32 (n, d), "mu": float64 (d,), "sigma": float64 (d, d), "n",
    "dims", "reference", "reference_images" (the setting), "fingerprint" (of the reference
    images), "test_fingerprint" (of the clean test split), "weights", "enabled": True}``; with
    FID disabled only the description and ``"enabled": False`` (an evaluation with FID enabled
    then asks for a re-run).
    """
    images = fid_reference_images(pairs_test, config, pairs_train)
    dims = config.fid.dims if config.fid.enabled else None
    description = {
        "n": int(images.shape[0]),
        "dims": dims,
        "reference": config.fid.reference,
        "reference_images": config.fid.reference_images,
        "fingerprint": reference_fingerprint(images, dims),
        "test_fingerprint": images_fingerprint(pairs_test["clean"].float()),
        "enabled": config.fid.enabled,
    }
    if not config.fid.enabled:
        return {**description, "weights": None}
    if images.shape[0] < 4:
        raise ValueError(f"the FID reference needs at least 4 clean images, got {images.shape[0]}")
    scorer = scorer or build_fid_scorer(config, device)
    logger.info(
        "FID reference (%s): Inception features (%d-d) of %d clean images",
        config.fid.reference,
        dims,
        images.shape[0],
    )
    features = scorer.features(images)
    stats = statistics_from_features(features)
    return {
        **description,
        "features": features,
        "mu": stats["mu"],
        "sigma": stats["sigma"],
        "weights": scorer.weights_source,
    }


def train_reference_classifier(
    pairs_train: Mapping[str, Any],
    pairs_test: Mapping[str, Any],
    config: EvaluateConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the CA classifier on the clean training split; returns its checkpoint bundle.

    The bundle is :func:`~ibmd_pipeline.metrics.classifier.train_classifier`'s checkpoint plus
    ``kind``, ``fingerprint`` (of the clean test images its ``clean_test_accuracy`` was measured
    on) and ``reason`` (None). Without labels, with images smaller than the classifier takes,
    or with CA disabled, no classifier is trained: ``model`` is None and ``reason`` says why.
    """
    test_clean = pairs_test["clean"].float()
    base = {
        "kind": CLASSIFIER_KIND,
        "fingerprint": images_fingerprint(test_clean),
        "test_images": len(test_clean),
        "disabled": not config.ca.enabled,
    }
    smallest = min_image_size(config.ca.classifier)
    side = min(test_clean.shape[-2:])
    if not config.ca.enabled:
        reason = "CA was disabled (evaluate.ca.enabled: false) when the references were computed"
    elif pairs_train.get("labels") is None or pairs_test.get("labels") is None:
        reason = "the data has no class labels (CA needs a labelled source, e.g. class sub-folders)"
    elif side < smallest:
        reason = (
            f"the images ({side} px) are smaller than the classifier's {len(config.ca.classifier.channels)} "
            f"pooling stages take ({smallest} px)"
        )
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


def _fid_reference_problem(
    pairs_test: Mapping[str, Any], config: EvaluateConfig, fid_reference: Mapping[str, Any] | None
) -> str | None:
    if fid_reference is None or not fid_reference.get("enabled", False) or "mu" not in fid_reference:
        return "FID is enabled but the cached FID reference has no statistics (FID was disabled then)"
    if fid_reference.get("features") is None:
        return "the cached FID reference has no features (it was computed by an older version)"
    stored = (fid_reference.get("reference"), fid_reference.get("dims"))
    wanted = (config.fid.reference, config.fid.dims)
    if stored != wanted:
        return f"the FID reference is {stored[0]}, {stored[1]}-d (now {wanted[0]}, {wanted[1]}-d)"
    if config.fid.reference == "disjoint":
        if fid_reference.get("test_fingerprint") != images_fingerprint(pairs_test["clean"].float()):
            return "the FID reference belongs to other data"
        stored_n, wanted_n = fid_reference.get("reference_images"), config.fid.reference_images
        if stored_n != wanted_n:
            return f"the FID reference was taken with reference_images {stored_n} (now {wanted_n})"
        return None
    images = fid_reference_images(pairs_test, config)
    if fid_reference.get("fingerprint") != reference_fingerprint(images, config.fid.dims):
        stored_n, wanted_n = fid_reference.get("n"), images.shape[0]
        detail = "other clean test images" if stored_n == wanted_n else f"{stored_n} images (now {wanted_n})"
        return f"the FID reference statistics belong to {detail}"
    return None


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
        problem = _fid_reference_problem(pairs_test, config, fid_reference)
        if problem is not None:
            problems.append(problem)
    if config.ca.enabled:
        if classifier is None or classifier.get("kind") != CLASSIFIER_KIND:
            problems.append("there is no cached CA classifier bundle")
        elif classifier.get("fingerprint") != images_fingerprint(pairs_test["clean"].float()):
            problems.append("the CA classifier was trained and tested for other data")
        elif (
            classifier.get("model") is None
            and pairs_test.get("labels") is not None
            and classifier.get("disabled", False)
        ):
            problems.append(f"no CA classifier was trained ({classifier.get('reason')})")
        elif classifier.get("model") is not None and classifier.get("config") != config_to_dict(
            config.ca.classifier
        ):
            problems.append("the CA classifier was trained with other evaluate.ca.classifier settings")
    if problems:
        raise StaleReferenceError(
            "the cached evaluation references do not fit this test data and these settings: "
            + "; ".join(problems)
            + f". {REFRESH_HINT}."
        )


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"settings.fid.dims": 2048, ...}``: nested mappings as dotted keys, values as JSON sees them."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def check_teacher_evaluation(cached: Mapping[str, Any], expected_key: Mapping[str, Any]) -> None:
    """Raise :class:`StaleReferenceError` naming every setting in which the cached teacher
    evaluation differs from the one this evaluation needs."""
    stored, expected_key = _flat(cached.get("key") or {}), _flat(expected_key)
    differing = sorted(k for k in set(stored) | set(expected_key) if stored.get(k) != expected_key.get(k))
    if differing:
        shown = "; ".join(
            f"{k}: cached {json.dumps(stored.get(k))}, needed {json.dumps(expected_key.get(k))}"
            for k in differing
        )
        raise StaleReferenceError(
            f"the cached teacher evaluation was made for another teacher, data or settings ({shown}). "
            f"{TEACHER_REFRESH_HINT}."
        )


def feature_array(value: Any) -> np.ndarray:
    """A cached feature array (tensor or array) as float32 numpy."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, np.float32)
