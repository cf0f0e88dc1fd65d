"""Seeded subsets and splits, and the pair bundles built from them."""

import pytest
import torch
from PIL import Image

from ibmd_pipeline.data import (
    DataConfig,
    DataError,
    ImageSet,
    build_pair_bundles,
    corrupted_only,
    select_indices,
    split_image_set,
    split_sizes,
)
from ibmd_pipeline.data import pairs as pairs_module
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError


def numbered_images(count: int) -> ImageSet:
    """Image i is the constant i / count, so that images can be identified after a split."""
    values = torch.arange(count, dtype=torch.float32) / count
    clean = values.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return ImageSet(clean=clean, labels=torch.arange(count))


def test_split_sizes_round_and_keep_one_image_per_split():
    assert split_sizes(10000, 0.05, 0.1) == {"train": 8500, "val": 500, "test": 1000}
    assert split_sizes(300, 0.05, 0.1) == {"train": 255, "val": 15, "test": 30}
    assert split_sizes(3, 0.05, 0.1) == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(DataError, match="no training images"):
        split_sizes(2, 0.05, 0.1)


def test_split_is_a_seeded_partition():
    images = numbered_images(50)
    splits = split_image_set(images, 0.2, 0.2, seed=5)
    ids = torch.cat([splits[name].labels for name in ("train", "val", "test")])
    assert sorted(ids.tolist()) == list(range(50))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [30, 10, 10]
    for name, part in splits.items():
        torch.testing.assert_close(part.clean[:, 0, 0, 0], part.labels.float() / 50, msg=name)
    again = split_image_set(images, 0.2, 0.2, seed=5)
    other = split_image_set(images, 0.2, 0.2, seed=6)
    assert torch.equal(again["test"].labels, splits["test"].labels)
    assert not torch.equal(other["test"].labels, splits["test"].labels)


def test_select_indices_is_sorted_seeded_and_all_when_uncapped():
    assert select_indices(5, None, 0).tolist() == [0, 1, 2, 3, 4]
    assert select_indices(5, 9, 0).tolist() == [0, 1, 2, 3, 4]
    chosen = select_indices(100, 10, 0)
    assert len(set(chosen.tolist())) == 10 and chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == select_indices(100, 10, 0).tolist() != select_indices(100, 10, 1).tolist()


def test_pair_bundles_are_deterministic_and_complete():
    data = DataConfig(max_images=60)
    task = TaskConfig(kind="inpaint_center")
    first = build_pair_bundles(data, task, seed=1)
    second = build_pair_bundles(data, task, seed=1)
    for split in ("train", "val", "test"):
        bundle = first[split]
        assert set(bundle) == {
            *("clean", "corrupted", "mask", "labels"),
            *("task", "class_names", "image_size", "channels", "split"),
        }
        assert bundle["task"] == {
            "kind": "inpaint_center", "jpeg_quality": 10, "sketch_sigma": 1.0, "operators": "project"
        }
        assert bundle["image_size"] == 32 and bundle["channels"] == 1 and len(bundle["class_names"]) == 10
        for key in ("clean", "corrupted", "mask", "labels"):
            assert torch.equal(bundle[key], second[split][key])
    # Different splits draw different noise.
    hole = first["val"]["mask"][0, 0].bool()
    assert not torch.equal(first["val"]["corrupted"][0, 0][hole], first["test"]["corrupted"][0, 0][hole])


def test_corrupted_only_drops_the_targets():
    bundle = build_pair_bundles(DataConfig(max_images=20), TaskConfig(kind="jpeg"), seed=0)["train"]
    stripped = corrupted_only(bundle)
    assert "clean" not in stripped and "labels" not in stripped and "class_names" not in stripped
    assert stripped["corrupted"] is bundle["corrupted"] and stripped["task"]["kind"] == "jpeg"


def test_paired_sources_need_the_paired_task_and_vice_versa(tmp_path):
    for i in range(4):
        Image.new("L", (64, 32), 40 * i).save(tmp_path / f"{i}.png")
    ab = DataConfig(source="paired_ab", path=str(tmp_path))
    with pytest.raises(ConfigError) as err:
        build_pair_bundles(ab, TaskConfig(kind="sr4x_pool"), seed=0)
    assert err.value.key == "task.kind"
    with pytest.raises(ConfigError) as err:
        build_pair_bundles(DataConfig(), TaskConfig(kind="paired"), seed=0)
    assert err.value.key == "data.source" and "'paired_ab'" in str(err.value)
    bundles = build_pair_bundles(ab, TaskConfig(kind="paired"), seed=0)
    assert sum(len(b["clean"]) for b in bundles.values()) == 4
    assert "mask" not in bundles["train"] and "labels" not in bundles["train"]


def test_every_check_runs_before_any_image_is_loaded(monkeypatch, tmp_path):
    def no_loading(*args, **kwargs):
        raise AssertionError("images were loaded before the configuration was checked")

    monkeypatch.setattr(pairs_module, "load_images", no_loading)
    failing = [
        (DataConfig(image_size=30), TaskConfig(kind="sr4x_bicubic"), 0, "data.image_size"),
        (DataConfig(source="folder", path=str(tmp_path / "missing")), TaskConfig(), 0, "data.path"),
        (DataConfig(), TaskConfig(), -1, "seed"),
    ]
    for data, task, seed, key in failing:
        with pytest.raises(ConfigError) as err:
            build_pair_bundles(data, task, seed)
        assert err.value.key == key
