"""Clean/corrupted pairs for every split, as the bundles the rest of the project reads.

A pair bundle is ``{"clean": x0, "corrupted": xT, "mask"?: (N,1,H,W) 1 = missing, "labels"?:
int64 (N,), "task": dict, "class_names": list, "image_size": int, "channels": int,
"split": str}``. The corrupted-only bundle used for distillation drops ``clean``, ``labels``
and ``class_names``: IBMD needs nothing but corrupted images (docs/method.md sec. 4.1; IBMD sec. 3.1).
"""

from __future__ import annotations

from typing import Any

import torch

from ibmd_pipeline.data.config import DataConfig
from ibmd_pipeline.data.embedded import load_embedded
from ibmd_pipeline.data.folders import check_sources, load_folder_images
from ibmd_pipeline.data.image_set import (
    SPLITS,
    STREAM_DEGRADE,
    ImageSet,
    split_image_set,
    torch_generator,
)
from ibmd_pipeline.data.stream import build_manifests, streams
from ibmd_pipeline.degradations.config import TaskConfig, check_image_size
from ibmd_pipeline.degradations.ops import degrade
from ibmd_pipeline.engine.config import ConfigError, config_to_dict

#: Keys a corrupted-only bundle must not carry.
TARGET_KEYS: tuple[str, ...] = ("clean", "labels", "class_names")


def check_seed(seed: Any, key: str = "seed") -> int:
    """The project seed as a non-negative int, or a :class:`ConfigError` naming ``key``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(key, f"must be a non-negative integer, got {seed!r}")
    return seed


def check_data_and_task(data: DataConfig, task: TaskConfig) -> None:
    """Cross-checks between ``data`` and ``task`` and of the source folders; all cheap.

    A paired source brings its own corrupted images, so it goes with ``task.kind: paired`` and
    only with it: silently replacing the pair's corrupted side by a synthetic degradation (or the
    reverse) would train on something other than what the configuration says.
    """
    if data.paired and task.kind != "paired":
        raise ConfigError(
            "task.kind",
            f"data.source '{data.source}' provides the corrupted images, so task.kind must be 'paired', "
            f"got '{task.kind}'",
        )
    if task.kind == "paired" and not data.paired:
        raise ConfigError(
            "data.source",
            "task.kind 'paired' needs a paired source; allowed values: 'paired_ab', 'paired_folders', "
            f"'paired_suffix'; "
            f"got '{data.source}'",
        )
    check_image_size(task, data.image_size)
    if task.kind == "jpeg" and task.operators == "i2sb" and data.channels != 3:
        raise ConfigError(
            "task.operators",
            f"I2SB's JPEG codes RGB images (data.channels: 3), got data.channels={data.channels}",
        )
    check_sources(data)


def load_images(data: DataConfig, seed: int) -> ImageSet:
    """All images of the configured source (capped at ``data.max_images``)."""
    if data.source == "embedded":
        return load_embedded(data.image_size, data.channels, data.max_images, seed)
    return load_folder_images(data, seed)


def make_pair_bundle(
    images: ImageSet, task: TaskConfig, generator: torch.Generator, split: str
) -> dict[str, Any]:
    """Degrade ``images`` (or take their paired corrupted side) into one pair bundle."""
    bundle: dict[str, Any] = {"clean": images.clean}
    if task.kind == "paired":
        if images.corrupted is None:
            raise ValueError("task.kind 'paired' needs images with a corrupted side")
        bundle["corrupted"] = images.corrupted
    else:
        degraded = degrade(images.clean, task, generator)
        bundle["corrupted"] = degraded.corrupted
        if degraded.mask is not None:
            bundle["mask"] = degraded.mask
    if images.labels is not None:
        bundle["labels"] = images.labels
    bundle.update(
        task=config_to_dict(task),
        class_names=list(images.class_names),
        image_size=int(images.clean.shape[-1]),
        channels=int(images.clean.shape[1]),
        split=split,
    )
    return bundle


def build_pair_bundles(data: DataConfig, task: TaskConfig, seed: int) -> dict[str, dict[str, Any]]:
    """Pair bundles for ``train``, ``val`` and ``test``; deterministic in ``seed``.

    Everything that can be checked without decoding images is checked first. Each split draws
    its degradation noise from its own seeded stream. A streamed source (``data.stream``) gives
    streamed bundles: a manifest of each split's files, read and degraded batch by batch later
    (``data.stream``).
    """
    check_seed(seed)
    check_data_and_task(data, task)
    if streams(data):
        return build_manifests(data, task, seed)
    splits = split_image_set(load_images(data, seed), data.val_fraction, data.test_fraction, seed)
    return {
        name: make_pair_bundle(splits[name], task, torch_generator(seed, STREAM_DEGRADE, index), name)
        for index, name in enumerate(SPLITS)
    }


def corrupted_only(bundle: dict[str, Any]) -> dict[str, Any]:
    """A pair bundle without its targets: the corrupted images (and mask) plus plain values.

    For a streamed bundle, its manifest: the distillation's reader yields corrupted images only.
    """
    return {key: value for key, value in bundle.items() if key not in TARGET_KEYS}
