"""Tiny stand-ins for everything an evaluation needs: pair bundles, teacher and student checkpoints.

Used by ``tests/evaluation`` and ``tests/pipelines/test_evaluate_pipeline.py``.

The teacher is a random ``tiny``-preset network in the teacher package's checkpoint format (its
weights perturbed, so that it is not the trivial predictor of a fresh UNet); the student is
made from it by the distill package itself (one IBMD update), so its checkpoint has exactly the
format the distill pipeline writes. Images are gray toy shapes (16x16 by default) labelled by
shape kind (box 0, disk 1).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from teacher_checkpoints import tiny_teacher_checkpoint

from ibmd_pipeline.degradations.config import TaskConfig
from ibmd_pipeline.degradations.ops import degrade
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.evaluation import EvaluateConfig, parse_evaluate_config

SIZE = 16
CLASS_NAMES = ["box", "disk"]


def toy_images(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright boxes (label 0) and disks (label 1) of random place, size and brightness, ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.full((n, 1, size, size), -1.0)
    labels = torch.arange(n) % 2
    for i in range(n):
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator)
        radius = int(torch.randint(2, max(3, size // 3), (1,), generator=generator))
        if labels[i]:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            shape = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius)
        images[i, 0][shape] = 0.2 + 0.8 * torch.rand(1, generator=generator).item()
    return images, labels


def make_pairs(
    n: int = 12,
    task_kind: str = "sr4x_bicubic",
    *,
    seed: int = 0,
    labelled: bool = True,
    split: str = "test",
    size: int = SIZE,
) -> dict[str, Any]:
    """A pair bundle in the degrade pipeline's format."""
    clean, labels = toy_images(n, seed, size)
    task = TaskConfig(kind=task_kind)
    degraded = degrade(clean, task, torch.Generator().manual_seed(seed + 100))
    bundle: dict[str, Any] = {"clean": clean, "corrupted": degraded.corrupted}
    if degraded.mask is not None:
        bundle["mask"] = degraded.mask
    if labelled:
        bundle["labels"] = labels
    bundle.update(
        task=config_to_dict(task),
        class_names=list(CLASS_NAMES) if labelled else [],
        image_size=size,
        channels=1,
        split=split,
    )
    return bundle


def make_teacher(task_kind: str = "sr4x_bicubic", *, image_size: int = SIZE, seed: int = 0) -> dict[str, Any]:
    """A random ``tiny`` teacher checkpoint as the catalog loads it (raw weights as EMA)."""
    return tiny_teacher_checkpoint(task_kind, image_size=image_size, seed=seed, catalog_version="teacher-v1")


def make_student(teacher: dict[str, Any], *, nfe: int = 1, task_kind: str | None = None) -> dict[str, Any]:
    """A student distilled from ``teacher`` by one IBMD update (distill package, its real format)."""
    task_kind = task_kind or teacher["config"]["task"]["kind"]
    size = teacher["config"]["image_size"]
    pairs = make_pairs(10, task_kind, seed=7, split="train", size=size)
    config = parse_distill_config(
        {
            "student_nfe": nfe,
            "aux_steps": 1,
            "workdir": None,
            "train": {"steps": 1, "batch_size": 4, "log_every": 1},
            "validation": {"every": 0, "batch_size": 2, "grid_examples": 1},
        }
    )
    student = distill_student(
        pairs["corrupted"],
        teacher,
        config,
        mask=pairs.get("mask"),
        task_kind=task_kind,
        device="cpu",
        progress=False,
    )
    student["catalog_version"] = "student-v1"
    return student


#: A tiny evaluation: 8 images, 64-d Inception features against 16 training images, a small
#: classifier, short teacher chains, closeness on 4 images with 4 draws, 40 resamples, one timing round.
TINY = {
    "num_images": 8,
    "teacher_nfe": [1, 3],
    "batch_size": 4,
    "grid_rows": 3,
    "fid": {"dims": 64, "batch_size": 8, "reference_images": 16},
    "kid": {"subset_size": 4, "subsets": 5},
    "ca": {"classifier": {"channels": [4, 8], "embedding_dim": 8, "epochs": 2, "batch_size": 16, "lr": 0.01}},
    "closeness": {"num_images": 4, "draws": 4},
    "bootstrap": {"resamples": 40},
    "speed": {"batch_size": 2, "repeats": 1, "warmup": 0, "min_seconds": 0.0},
}


def tiny_config(**overrides: Any) -> EvaluateConfig:
    """:data:`TINY` with top-level keys replaced (nested dicts merged one level deep)."""
    settings = {**TINY}
    for key, value in overrides.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings else value
    return parse_evaluate_config(settings)


@contextlib.contextmanager
def shared_metric_networks() -> Iterator[None]:
    """Within the block, the FID Inception and the LPIPS network are built once per feature size
    and shared by every scorer: building them (weights verified, torchvision's initialisation,
    then the real weights) costs seconds each time, and an evaluation test builds them again and
    again. The networks are frozen and stay on the CPU, so sharing them changes no number."""
    from ibmd_pipeline.metrics import fid, lpips

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid, "build_fid_inception", functools.cache(fid.build_fid_inception))
        patch.setattr(lpips, "build_lpips_alexnet", functools.cache(lpips.build_lpips_alexnet))
        yield
