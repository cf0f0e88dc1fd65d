"""Streamed data: the same images and batches as the in-memory path, per-image seeds, no clean
images for distillation, tar shards, pix2pix AB pairs, and one clear error for an unreadable file."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_pipeline.data import DataConfig, DataError, build_pair_bundles, corrupted_only
from ibmd_pipeline.data.stream import StepBatches, StreamedPairs, is_streamed, materialise, streams
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.training import epoch_batch_indices
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

SIZE = 16


def write_imagenet_layout(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` random RGB PNGs of assorted sizes in three class folders (the ImageNet layout)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"n0{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(SIZE, 2 * SIZE, size=2)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def write_ab_pairs(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` random RGB pix2pix files (A|B side by side, even widths) of assorted sizes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        height, half = rng.integers(SIZE, 2 * SIZE, size=2)
        pixels = rng.integers(0, 256, size=(height, 2 * half, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"pair{i:03d}.png")
    return root


def data_config(path: Path, stream: bool | str, **extra) -> DataConfig:
    values = {"source": "folder", "path": str(path), "image_size": SIZE, "channels": 3, "stream": stream}
    return parse_config(DataConfig, {**values, "workers": 0, **extra}, "data")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagenet_layout(tmp_path_factory.mktemp("imagenet"), 30)


@pytest.fixture(scope="module")
def ab_folder(tmp_path_factory) -> Path:
    return write_ab_pairs(tmp_path_factory.mktemp("edges2things"), 24)


#: (source fixture, data settings, task) of a degraded source and of a pix2pix AB source
SOURCES = {
    "folder": ("folder", {}, {"kind": "sr4x_bicubic"}),
    "paired_ab": ("ab_folder", {"source": "paired_ab"}, {"kind": "paired"}),
}


def test_streamed_splits_hold_the_in_memory_images_in_the_same_order(folder):
    task = TaskConfig(kind="sr4x_bicubic")
    memory = build_pair_bundles(data_config(folder, False), task, seed=3)
    streamed = build_pair_bundles(data_config(folder, True), task, seed=3)
    for split in ("train", "val", "test"):
        assert not is_streamed(memory[split]) and is_streamed(streamed[split])
        dataset = StreamedPairs(streamed[split])
        batch = materialise(dataset, range(len(dataset)))
        assert torch.equal(batch["clean"], memory[split]["clean"])
        assert torch.equal(batch["corrupted"], memory[split]["corrupted"])
        assert torch.equal(streamed[split]["labels"], memory[split]["labels"])
        assert streamed[split]["class_names"] == memory[split]["class_names"] == ["n00", "n01", "n02"]


@pytest.mark.parametrize(
    ("direction", "resize", "corrupted_resample"),
    [("a_to_b", "fit_bicubic", "same"), ("b_to_a", "ddbm", "nearest"), ("a_to_b", "i2sb", "same")],
)
def test_streamed_ab_pairs_are_the_in_memory_pairs(ab_folder, direction, resize, corrupted_resample):
    """Same halves, orientation, resize and [-1, 1] range, bit for bit; nothing is degraded."""
    settings = {"direction": direction, "resize": resize, "corrupted_resample": corrupted_resample}
    task = TaskConfig(kind="paired")
    memory = build_pair_bundles(data_config(ab_folder, False, source="paired_ab", **settings), task, seed=3)
    streamed = build_pair_bundles(data_config(ab_folder, True, source="paired_ab", **settings), task, seed=3)
    for split in ("train", "val", "test"):
        assert is_streamed(streamed[split]) and not is_streamed(memory[split])
        batch = materialise(StreamedPairs(streamed[split]), range(len(memory[split]["clean"])))
        assert set(batch) == {"index", "clean", "corrupted"}
        assert torch.equal(batch["clean"], memory[split]["clean"])
        assert torch.equal(batch["corrupted"], memory[split]["corrupted"])
        assert not torch.equal(batch["clean"], batch["corrupted"])


@pytest.mark.parametrize("source", SOURCES)
def test_a_teacher_trains_the_same_on_streamed_and_in_memory_pairs(request, source):
    """Same seed, same batches: the two paths give the same history and weights, bit for bit."""
    fixture, settings, task = SOURCES[source]
    root = request.getfixturevalue(fixture)
    params = {
        "model": {"network": {"preset": "tiny"}},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2, "ema_decay": 0.9},
        "validation": {"every": 2, "batch_size": 2},
    }
    results = []
    for stream in (False, True):
        bundles = build_pair_bundles(data_config(root, stream, **settings), TaskConfig(**task), seed=0)
        config = parse_teacher_config(params, seed=0)
        results.append(train_teacher(config, bundles["train"], bundles["val"], task=task, progress=False))
    (memory, memory_history), (streamed, streamed_history) = results
    drop = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in memory_history]
    assert drop == [{k: v for k, v in r.items() if k != "sec_per_step"} for r in streamed_history]
    for name, value in memory["models"]["model"].items():
        assert torch.equal(streamed["models"]["model"][name], value), name


def test_each_image_is_degraded_with_its_own_seed_whatever_the_order_or_worker_count(folder):
    bundles = build_pair_bundles(data_config(folder, True), TaskConfig(kind="inpaint_center"), seed=5)
    dataset = StreamedPairs(bundles["train"])
    forward = [dataset[i]["corrupted"] for i in range(len(dataset))]
    backward = [dataset[i]["corrupted"] for i in reversed(range(len(dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert not torch.equal(forward[0], forward[1])  # the hole's noise differs between images

    def plan(step: int) -> list[torch.Tensor]:
        return [epoch_batch_indices(len(dataset), 4, step, seed=0)]

    read = []
    for workers in (0, 2):
        reader = StepBatches(dataset, plan, steps=6, workers=workers)
        read.append([reader.get(step)["corrupted"] for step in range(6)])
    assert all(torch.equal(a, b) for a, b in zip(*read, strict=True))
    assert torch.equal(read[0][5], torch.stack([forward[i] for i in plan(5)[0]]))
    # A resume re-reads from the step it is asked for.
    reader = StepBatches(dataset, plan, steps=6, workers=0)
    assert torch.equal(reader.get(3)["corrupted"], read[0][3])


@pytest.mark.parametrize(
    ("fixture", "settings", "task", "keys"),
    [
        ("folder", {}, "inpaint_center", {"index", "corrupted", "mask"}),
        ("ab_folder", {"source": "paired_ab"}, "paired", {"index", "corrupted"}),
    ],
)
def test_the_distillation_reader_yields_no_clean_image(request, fixture, settings, task, keys):
    root = request.getfixturevalue(fixture)
    bundles = build_pair_bundles(data_config(root, True, **settings), TaskConfig(kind=task), seed=0)
    corrupted = corrupted_only(bundles["train"])
    assert "labels" not in corrupted and "class_names" not in corrupted
    dataset = StreamedPairs(corrupted, targets=False)
    reader = StepBatches(dataset, lambda step: [torch.arange(4) + 4 * step], steps=2, workers=1)
    for step in range(2):
        batch = reader.get(step)
        assert set(batch) == keys
        clean = materialise(StreamedPairs(bundles["train"]), range(4 * step, 4 * step + 4))["clean"]
        assert not any(torch.equal(value, clean) for value in batch.values())


def test_tar_shards_stream_the_same_images_as_their_folder(folder, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    for index, part in enumerate((files[:12], files[12:])):
        with tarfile.open(shards / f"part-{index}.tar", "w") as shard:
            for name in part:
                shard.add(folder / name, arcname=name)
    task = TaskConfig(kind="sr4x_bicubic")
    from_folder = build_pair_bundles(data_config(folder, True), task, seed=1)
    from_tar = build_pair_bundles(
        parse_config(
            DataConfig, {"source": "tar", "path": str(shards), "image_size": SIZE, "channels": 3}, "data"
        ),
        task,
        seed=1,
    )
    for split in ("train", "test"):
        a, b = StreamedPairs(from_folder[split]), StreamedPairs(from_tar[split])
        assert [f.split("::")[1] for f in b.manifest.files] == list(a.manifest.files)
        assert torch.equal(materialise(a, range(3))["clean"], materialise(b, range(3))["clean"])


def test_an_unreadable_image_or_shard_is_one_error_naming_it(tmp_path):
    root = write_imagenet_layout(tmp_path / "images", 12)
    broken = root / "n01" / "img004.png"
    broken.write_bytes(b"not a png")
    bundles = build_pair_bundles(data_config(root, True), TaskConfig(kind="sr4x_pool"), seed=0)
    dataset = StreamedPairs(bundles["train"])
    with pytest.raises(DataError, match="img004.png"):
        materialise(dataset, range(len(dataset)))

    shard = tmp_path / "bad.tar"
    shard.write_bytes(b"\x00garbage" * 100)
    config = parse_config(DataConfig, {"source": "tar", "path": str(shard), "image_size": SIZE}, "data")
    with pytest.raises(DataError, match="bad.tar"):
        build_pair_bundles(config, TaskConfig(kind="sr4x_pool"), seed=0)


@pytest.mark.parametrize("defect", ["odd_width", "unreadable"])
def test_a_bad_ab_file_is_one_error_naming_it(tmp_path, defect):
    root = write_ab_pairs(tmp_path / "pairs", 12)
    broken = root / "pair004.png"
    if defect == "odd_width":
        Image.fromarray(np.zeros((SIZE, 2 * SIZE + 1, 3), dtype=np.uint8)).save(broken)
    else:
        broken.write_bytes(b"not a png")
    config = data_config(root, True, source="paired_ab")
    bundles = build_pair_bundles(config, TaskConfig(kind="paired"), seed=0)
    split = next(s for s in ("train", "val", "test") if "pair004.png" in bundles[s]["stream"]["files"])
    for targets in (True, False):
        dataset = StreamedPairs(bundles[split], targets=targets)
        with pytest.raises(DataError, match="pair004.png") as raised:
            materialise(dataset, range(len(dataset)))
        assert ("odd width" in str(raised.value)) == (defect == "odd_width")


def test_data_stream_is_validated():
    with pytest.raises(ConfigError, match="data.stream"):
        parse_config(DataConfig, {"stream": True}, "data")  # the embedded set is never streamed
    with pytest.raises(ConfigError, match="data.stream"):
        parse_config(
            DataConfig,
            {"source": "paired_folders", "path": "c", "corrupted_path": "x", "stream": True},
            "data",
        )
    assert parse_config(DataConfig, {"source": "paired_ab", "path": "ab", "stream": True}, "data").stream
    with pytest.raises(ConfigError, match="data.stream"):
        parse_config(DataConfig, {"source": "tar", "path": "x.tar", "stream": False}, "data")
    with pytest.raises(ConfigError, match="data.stream"):
        parse_config(DataConfig, {"stream": "yes"}, "data")
    with pytest.raises(ConfigError, match="data.workers"):
        parse_config(DataConfig, {"workers": -1}, "data")


def test_auto_streams_tar_sources_and_folders_from_stream_min_images(folder, ab_folder):
    assert streams(data_config(ab_folder, "auto", source="paired_ab", stream_min_images=24))  # 24 pairs
    assert not streams(data_config(ab_folder, "auto", source="paired_ab", stream_min_images=25))
    assert streams(data_config(folder, "auto", stream_min_images=30))  # 30 images
    assert not streams(data_config(folder, "auto", stream_min_images=31))
    assert not streams(data_config(folder, "auto", stream_min_images=30, max_images=29))
    assert not streams(parse_config(DataConfig, {}, "data"))  # the embedded set stays in memory
    assert streams(parse_config(DataConfig, {"source": "tar", "path": "x.tar"}, "data"))
