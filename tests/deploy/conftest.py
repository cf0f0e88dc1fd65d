"""Tiny random students for the deployment tests: no trained model is ever needed.

``make_student_checkpoint`` builds a ``tiny``-preset teacher for the task as the teacher package
resolves it (I2SB for SR/inpainting, OT-ODE for inpainting, DDBM for sketch), turns it into a
generator with ``BridgeGenerator.from_teacher`` and perturbs every weight (the fresh zero-init
output heads and z channels would make the output ignore the network and z), then assembles a
checkpoint in the format documented in ``distill.student``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from teacher_checkpoints import teacher_config

from ibmd_pipeline.bridges.schedules import make_schedule
from ibmd_pipeline.distill.generator import BridgeGenerator
from ibmd_pipeline.engine.checkpoint import save_checkpoint
from ibmd_pipeline.teacher.model import NetworkConfig, TeacherModelConfig, build_predictor, resolve_teacher

IMAGE_SIZE = 16
TEACHER_VERSION = "2026-01-02T03.04.05.678Z"


def _teacher(task_kind: str, image_size: int, channels: int) -> tuple[Any, dict[str, Any]]:
    model_config = TeacherModelConfig(network=NetworkConfig(preset="tiny"))
    resolved = resolve_teacher(model_config, task_kind=task_kind, image_size=image_size, channels=channels)
    predictor = build_predictor(resolved.unet, make_schedule(resolved.bridge), resolved.conditional)
    return predictor, teacher_config(model_config, resolved, task_kind, image_size, channels)


def make_teacher_checkpoint(
    task_kind: str = "sr4x_bicubic", *, image_size: int = IMAGE_SIZE
) -> dict[str, Any]:
    """A random teacher checkpoint (what a user might pass by mistake)."""
    predictor, config = _teacher(task_kind, image_size, 1)
    weights = predictor.net.state_dict()
    return {
        "kind": "teacher",
        "config": config,
        "models": {"model": weights},
        "ema": {"model": weights},
        "step": 1,
        "history": [],
    }


def make_student_checkpoint(
    task_kind: str = "sr4x_bicubic",
    *,
    nfe: int = 1,
    noise: bool = True,
    image_size: int = IMAGE_SIZE,
    channels: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """A random student checkpoint; its EMA weights differ from its raw ones."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher, teacher_config = _teacher(task_kind, image_size, channels)
        generator = BridgeGenerator.from_teacher(teacher, nfe=nfe, noise=noise)
        with torch.no_grad():
            for parameter in generator.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        raw = {k: v.detach().clone() for k, v in generator.predictor.net.state_dict().items()}
        ema = {k: v + 0.01 * torch.randn_like(v) for k, v in raw.items()}
    return {
        "kind": "student",
        "config": {
            "teacher": teacher_config,
            "teacher_version": TEACHER_VERSION,
            "distill": {},
            "resolved": {},
            "generator": {**generator.spec(), "multistep_mode": "chain"},
            "task": teacher_config["task"],
            "image_size": image_size,
            "channels": channels,
        },
        "models": {"generator": raw, "aux": teacher.net.state_dict()},
        "ema": {"generator": ema},
        "step": 7,
        "history": [],
    }


@pytest.fixture
def student_checkpoint() -> Callable[..., dict[str, Any]]:
    """``student_checkpoint(task_kind, nfe=, noise=, ...)``: a random student checkpoint dict."""
    return make_student_checkpoint


@pytest.fixture
def teacher_checkpoint() -> Callable[..., dict[str, Any]]:
    """``teacher_checkpoint(task_kind)``: a random teacher checkpoint dict."""
    return make_teacher_checkpoint


@pytest.fixture
def student_file(tmp_path: Path) -> Callable[..., Path]:
    """``student_file(name, **kwargs) -> Path``: a student checkpoint saved as a ``.pt`` file."""

    def write(name: str = "student.pt", **kwargs: Any) -> Path:
        return save_checkpoint(tmp_path / "models" / name, make_student_checkpoint(**kwargs))

    return write


def write_image(path: Path, size: tuple[int, int], mode: str = "L", seed: int = 0) -> Path:
    """A random image file (format from the suffix)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A nested folder of inputs: three good images, a truncated PNG, a text file, a hidden file.

    ``a.png`` 16x16 gray, ``sub/b.jpg`` 24x20 RGB (needs resizing), ``sub/deeper/c.png`` 4x4
    (a quarter size), ``broken.png`` (its first 60 bytes), ``notes.txt``, ``.hidden/d.png``.
    """
    root = tmp_path / "inputs"
    write_image(root / "a.png", (IMAGE_SIZE, IMAGE_SIZE), seed=1)
    write_image(root / "sub" / "b.jpg", (24, 20), mode="RGB", seed=2)
    write_image(root / "sub" / "deeper" / "c.png", (IMAGE_SIZE // 4, IMAGE_SIZE // 4), seed=3)
    whole = write_image(tmp_path / "whole.png", (IMAGE_SIZE, IMAGE_SIZE), seed=4).read_bytes()
    (root / "broken.png").write_bytes(whole[:60])
    (root / "notes.txt").write_text("not an image\n")
    write_image(root / ".hidden" / "d.png", (IMAGE_SIZE, IMAGE_SIZE), seed=5)
    return root
