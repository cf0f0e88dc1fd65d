"""The ``imagenet256`` environment end to end on streamed data: degrade -> teacher -> distill ->
evaluate through real KedroSessions, on a few hundred generated 256x256 RGB images in the ImageNet
layout, with size overrides (64-px crops, the tiny network, a few steps, one CPU process).

What it proves: the paper-scale configuration streams (``data.stream: auto`` on a folder above
``stream_min_images``), the catalog holds manifests and not images, and every later pipeline reads
its batches from the files; the same run on the images in an object store (``memory://``) keeps
the URL in the manifests and reads from the store.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from PIL import Image

from ibmd_pipeline.engine.catalog_files import read_bundle

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IMAGES, CLASSES = 240, 4

TINY_TRAIN = {"bf16": False, "compile": {"enabled": False}, "log_every": 2, "checkpoint_every": 0}
OVERRIDES: dict[str, Any] = {
    "engine": {"device": "cpu", "num_threads": 1},
    "data": {"image_size": 64, "val_fraction": 0.05, "test_fraction": 0.1, "stream_min_images": 100,
             "workers": 1},
    "teacher": {
        "model": {"network": {"preset": "tiny", "use_checkpoint": False}},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 0, **TINY_TRAIN},
        "sampler": {"grid_nfe": [1, 2], "n_examples": 2},
        "validation": {"every": 2, "batch_size": 4},
        "distributed": {"nproc_per_node": 1},
    },
    "distill": {
        "train": {"steps": 2, "batch_size": 4, **TINY_TRAIN},
        "validation": {"every": 2, "batch_size": 4, "draws": 4, "teacher_nfe": 2, "reference_nfes": [1],
                       "grid_examples": 2},
        "distributed": {"nproc_per_node": 1},
    },
    "evaluate": {
        "num_images": 8, "teacher_nfe": [1, 2], "batch_size": 8, "grid_rows": 2,
        "fid": {"dims": 64, "batch_size": 8, "reference_images": 16},
        "kid": {"subset_size": 4, "subsets": 5},
        "ca": {"classifier": {"channels": [8, 16], "embedding_dim": 16, "epochs": 1}},
        "closeness": {"num_images": 4},
        "bootstrap": {"resamples": 20},
        "speed": {"batch_size": 2, "repeats": 1, "min_seconds": 0.0},
    },
}  # fmt: skip


def write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.JPEG", format="JPEG", quality=90)


def test_imagenet256_env_runs_end_to_end_on_streamed_images(tmp_path: Path) -> None:
    images = tmp_path / "imagenet" / "train"
    write_images(images)
    params = {**OVERRIDES, "data": {**OVERRIDES["data"], "path": str(images)}}
    # A copy of conf/ whose imagenet256 data root is under tmp_path: the run writes nowhere else.
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf, ignore=shutil.ignore_patterns("credentials*"))
    data_root = tmp_path / "data"
    (conf / "imagenet256" / "globals.yml").write_text(f"data_root: {data_root}\n")
    outputs = {}
    with contextlib.chdir(tmp_path):
        bootstrap_project(PROJECT_ROOT)
        for pipeline in ("degrade", "teacher", "distill", "evaluate"):
            with KedroSession.create(
                project_path=PROJECT_ROOT, env="imagenet256", conf_source=str(conf), runtime_params=params
            ) as session:
                outputs[pipeline] = session.run(pipeline_names=[pipeline])
    (pairs_train,) = (data_root / "05_model_input" / "pairs_train.npz").glob("*/pairs_train.npz")
    bundle = read_bundle(pairs_train)
    assert "stream" in bundle and "clean" not in bundle and "corrupted" not in bundle
    assert pairs_train.stat().st_size < 20_000  # a manifest: paths and labels, not images
    (corrupted,) = (data_root / "05_model_input" / "corrupted_train.npz").glob("*/corrupted_train.npz")
    assert "labels" not in read_bundle(corrupted)
    (metrics,) = (data_root / "08_reporting" / "metrics.json").glob("*/metrics.json")
    assert metrics.stat().st_size > 0
    for name in ("teacher.pt", "student.pt"):
        assert list((data_root / "06_models" / name).glob(f"*/{name}")), name


def test_imagenet256_env_streams_the_same_layout_from_a_bucket(tmp_path: Path) -> None:
    """The same run on images in an object store (``memory://``): the manifests keep the URL and
    the teacher, distillation and evaluation read their batches from the store."""
    images = tmp_path / "imagenet" / "train"
    write_images(images)
    bucket = f"memory:///ibmd-{uuid.uuid4().hex[:12]}/imagenet/train"
    fs = fsspec.filesystem("memory")
    fs.put(str(images), bucket.removeprefix("memory://"), recursive=True)
    shutil.rmtree(images)  # nothing is read from the local copy
    params = {**OVERRIDES, "data": {**OVERRIDES["data"], "path": bucket}}
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf, ignore=shutil.ignore_patterns("credentials*"))
    data_root = tmp_path / "data"
    (conf / "imagenet256" / "globals.yml").write_text(f"data_root: {data_root}\n")
    try:
        with contextlib.chdir(tmp_path):
            bootstrap_project(PROJECT_ROOT)
            for pipeline in ("degrade", "teacher", "distill", "evaluate"):
                with KedroSession.create(
                    project_path=PROJECT_ROOT, env="imagenet256", conf_source=str(conf), runtime_params=params
                ) as session:
                    session.run(pipeline_names=[pipeline])
    finally:
        fs.rm(bucket.removeprefix("memory://").split("/imagenet")[0], recursive=True)
    (pairs_train,) = (data_root / "05_model_input" / "pairs_train.npz").glob("*/pairs_train.npz")
    manifest = read_bundle(pairs_train)["stream"]
    assert manifest["root"] == bucket and len(manifest["files"]) > 100
    (metrics,) = (data_root / "08_reporting" / "metrics.json").glob("*/metrics.json")
    assert metrics.stat().st_size > 0
    for name in ("teacher.pt", "student.pt"):
        assert list((data_root / "06_models" / name).glob(f"*/{name}")), name
