"""Settings of a teacher training run (Kedro ``params:teacher``), parsed once and validated.

``TeacherConfig`` groups what to build (``model``: :class:`~ibmd_pipeline.teacher.model.
TeacherModelConfig`), how to optimise it (``train``: :class:`~ibmd_pipeline.engine.training.
TrainConfig`), how to look at it (``sampler``, ``validation``), where the resumable working
checkpoint lives (``workdir``) and how many processes train together (``distributed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ibmd_pipeline.engine.config import ConfigError, parse_config, require
from ibmd_pipeline.engine.distributed import DistributedConfig
from ibmd_pipeline.engine.training import TrainConfig
from ibmd_pipeline.teacher.model import TeacherModelConfig

__all__ = [
    "SamplerConfig",
    "TeacherConfig",
    "ValidationConfig",
    "cpu_has_native_bf16",
    "parse_teacher_config",
]


@dataclass(frozen=True)
class SamplerConfig:
    """How the teacher's sample grid is drawn (``teacher.sampler``).

    grid_nfe: network evaluations of each restored column (e.g. 1, 10, 100); NFE 1 is the
        teacher's posterior mean ``E[x0 | xT]``, many NFE its stochastic samples.
    mode: ``ancestral`` (bridge-posterior steps, I2SB's sampler) or ``deterministic``
        (DDIM/DBIM-style bridge steps); see ``bridges.samplers``.
    n_examples: rows of the grid (the first examples of the validation split).
    """

    grid_nfe: tuple[int, ...] = (1, 10, 100)
    mode: Literal["ancestral", "deterministic"] = "ancestral"
    n_examples: int = 8

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(len(self.grid_nfe) >= 1, f"{prefix}grid_nfe", "needs at least one NFE, e.g. [1, 10, 100]")
        for i, nfe in enumerate(self.grid_nfe):
            require(nfe >= 1, f"{prefix}grid_nfe[{i}]", f"must be >= 1 network evaluation, got {nfe}")
        require(self.n_examples >= 1, f"{prefix}n_examples", f"must be >= 1, got {self.n_examples}")


@dataclass(frozen=True)
class ValidationConfig:
    """Periodic validation loss (``teacher.validation``).

    every: steps between evaluations of the EMA model's loss on one fixed validation batch
        (fixed images, times and noise, so the curve moves only with the weights); a multiple
        of ``train.log_every``, as the value is stored in that step's history record. 0 = off
        (the final step is still evaluated).
    batch_size: images in the fixed batch (the first ones of the validation split).
    """

    every: int = 250
    batch_size: int = 256

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(self.every >= 0, f"{prefix}every", f"must be >= 0 (0 = only at the end), got {self.every}")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); checked when called."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that shapes a teacher run (``params:teacher``).

    model: which bridge and network (paper defaults per task with ``schedule: auto``).
    train: optimisation (AdamW, EMA, clipping, warm-up, LR schedule, bf16, checkpoints, seed).
    sampler: the sample grid. validation: the periodic validation loss.
    workdir: folder of the resumable working checkpoint ``last.pt``; re-running a killed run
        continues from it. null = no working checkpoints.
    distributed: processes per node (> 1 spawns local DDP workers).
    cpu_bf16: bfloat16 autocast on the CPU when ``train.bf16`` is set: ``auto`` = when the CPU
        runs bfloat16 natively (AVX512-BF16/AMX, where it is several times faster than
        float32), ``always``, ``never``. On CUDA ``train.bf16`` alone decides.
    """

    model: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    workdir: str | None = None
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    cpu_bf16: Literal["auto", "always", "never"] = "auto"

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        if self.validation.every:
            require(
                self.validation.every % self.train.log_every == 0,
                f"{prefix}validation.every",
                f"must be a multiple of {prefix}train.log_every={self.train.log_every} (the value is "
                f"stored in that step's history record), got {self.validation.every}",
            )
        if self.workdir is not None:
            require(bool(self.workdir.strip()), f"{prefix}workdir", "must be a folder path or null")

    def autocast_bf16(self, device: torch.device) -> bool:
        """Whether training steps run under bfloat16 autocast on ``device``."""
        if not self.train.bf16:
            return False
        if device.type == "cpu":
            return self.cpu_bf16 == "always" or (self.cpu_bf16 == "auto" and cpu_has_native_bf16())
        return device.type == "cuda"


def parse_teacher_config(
    mapping: Mapping[str, Any] | None, seed: int | None = None, key: str = "teacher"
) -> TeacherConfig:
    """``params:teacher`` as a :class:`TeacherConfig`; the global ``seed`` fills ``train.seed``
    unless the teacher parameters set it themselves."""
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError(key, f"expected a mapping of settings, got {type(mapping).__name__}")
    values = dict(mapping or {})
    train = values.get("train")
    if seed is not None and (train is None or isinstance(train, Mapping)):
        values["train"] = {"seed": seed, **dict(train or {})}
    return parse_config(TeacherConfig, values, key)
