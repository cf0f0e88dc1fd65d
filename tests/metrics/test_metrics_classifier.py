"""CA classifier: learns a toy task, is deterministic, round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from ibmd_pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.metrics import classifier as clf

SMALL = clf.ClassifierConfig(channels=(8, 16), epochs=4, batch_size=32, lr=1e-2, seed=3)


def bars_and_disks(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes at random positions: horizontal bar, vertical bar, disk; [-1, 1] images."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.arange(n) % 3
    images = torch.full((n, 1, size, size), -1.0)
    for i, label in enumerate(labels.tolist()):
        cy, cx = torch.randint(4, size - 4, (2,), generator=generator)
        if label == 0:
            shape = ((yy - cy).abs() <= 1) & ((xx - cx).abs() <= 4)
        elif label == 1:
            shape = ((yy - cy).abs() <= 4) & ((xx - cx).abs() <= 1)
        else:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
        images[i, 0][shape] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def trained():
    train_x, train_y = bars_and_disks(240, seed=0)
    test_x, test_y = bars_and_disks(60, seed=1)
    checkpoint = clf.train_classifier(
        train_x, train_y, SMALL, class_names=["hbar", "vbar", "disk"], test_images=test_x, test_labels=test_y
    )
    return checkpoint, (train_x, train_y), (test_x, test_y)


def test_classifier_learns_the_toy_task_and_records_the_ceiling(trained):
    checkpoint, _, (test_x, test_y) = trained
    assert set(checkpoint) == {"config", "model", "class_names", "clean_test_accuracy"}
    assert checkpoint["class_names"] == ["hbar", "vbar", "disk"]
    model = clf.load_classifier(checkpoint)
    accuracy = clf.classifier_accuracy(model, test_x, test_y)
    assert accuracy >= 90.0
    assert checkpoint["clean_test_accuracy"] == pytest.approx(accuracy)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(trained):
    checkpoint, (train_x, train_y), _ = trained
    state_before = torch.get_rng_state()
    again = clf.train_classifier(train_x, train_y, SMALL, class_names=["hbar", "vbar", "disk"])
    assert torch.equal(torch.get_rng_state(), state_before)
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert again["clean_test_accuracy"] is None


def test_checkpoint_round_trips_weights_only(trained, tmp_path):
    checkpoint, _, (test_x, _) = trained
    path = save_checkpoint(tmp_path / "classifier.pt", checkpoint)
    restored = clf.load_classifier(load_checkpoint(path))
    assert torch.equal(clf.predict(restored, test_x), clf.predict(clf.load_classifier(checkpoint), test_x))


def test_accuracy_counts_matches_and_reports_ceiling_and_floor(trained):
    checkpoint, _, (test_x, test_y) = trained
    model = clf.load_classifier(checkpoint)
    predictions = clf.predict(model, test_x)
    wrong = predictions.clone()
    wrong[:15] = (wrong[:15] + 1) % 3  # exactly 15 of 60 predictions now disagree
    assert clf.classifier_accuracy(model, test_x, wrong) == pytest.approx(75.0)

    corrupted = torch.full_like(test_x, -1.0)  # everything erased: no class information left
    bundle = {"clean": test_x, "corrupted": corrupted, "labels": test_y}
    bounds = clf.reference_accuracies(model, bundle)
    assert bounds["reason"] is None
    assert bounds["ceiling"] == pytest.approx(checkpoint["clean_test_accuracy"])
    assert bounds["floor"] == pytest.approx(100.0 / 3, abs=0.01)  # one constant prediction, balanced classes


def test_missing_labels_or_classifier_give_none_with_a_reason(trained):
    checkpoint, _, (test_x, _) = trained
    model = clf.load_classifier(checkpoint)
    value, reason = clf.accuracy_or_reason(model, test_x, None)
    assert value is None and "no class labels" in reason
    bounds = clf.reference_accuracies(None, {"clean": test_x, "corrupted": test_x})
    assert bounds["ceiling"] is None and bounds["floor"] is None and "no classifier" in bounds["reason"]
    with pytest.raises(ValueError, match="labels must lie"):
        clf.classifier_accuracy(model, test_x, torch.full((60,), 7))


def test_shift_augmentation_translates_within_the_limit():
    images = torch.full((50, 1, 9, 9), -1.0)
    images[:, 0, 4, 4] = 1.0
    shifted = clf._random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    rows, cols = (shifted[:, 0] == 1.0).nonzero()[:, 1:].T
    assert ((shifted == 1.0).flatten(1).sum(1) == 1).all()  # the pixel moved, nothing was smeared
    assert rows.sub(4).abs().max() <= 2 and cols.sub(4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5  # and it really moves


def test_config_is_validated_with_dotted_keys():
    config = parse_config(clf.ClassifierConfig, {"channels": [4, 8], "epochs": 2}, "evaluate.classifier")
    assert config.channels == (4, 8)
    with pytest.raises(ConfigError, match="evaluate.classifier.epochs"):
        parse_config(clf.ClassifierConfig, {"epochs": 0}, "evaluate.classifier")
    with pytest.raises(ConfigError, match="allowed keys"):
        parse_config(clf.ClassifierConfig, {"epoch": 3}, "evaluate.classifier")


def test_penultimate_features_feed_the_head_and_predictions(trained):
    checkpoint, _, (test_x, _) = trained
    model = clf.load_classifier(checkpoint)
    features, predictions = clf.features_and_predictions(model, test_x, batch_size=7)
    assert features.shape == (60, SMALL.embedding_dim) and features.dtype == torch.float32
    assert bool((features >= 0).all())  # after the ReLU
    torch.testing.assert_close(predictions, clf.predict(model, test_x))
    with torch.inference_mode():
        torch.testing.assert_close(model.head(features), model(test_x))


def test_minimum_image_size_is_one_halving_per_stage():
    assert clf.min_image_size(SMALL) == 4
    assert clf.min_image_size(clf.ClassifierConfig(channels=(4, 4, 4, 4))) == 16
