"""Settings of an IBMD distillation run (Kedro ``params:distill``), and their paper defaults.

Every ``null`` below means "decide from the teacher and the task as the paper does"; the
decisions are made once by :func:`resolve_distill` and stored in the student checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ibmd_pipeline.engine.config import ConfigError, parse_config, require
from ibmd_pipeline.engine.distributed import DistributedConfig
from ibmd_pipeline.engine.training import TrainConfig
from ibmd_pipeline.teacher.config import cpu_has_native_bf16

__all__ = [
    "DistillConfig",
    "ResolvedDistill",
    "ValidationConfig",
    "parse_distill_config",
    "resolve_distill",
]

#: Student step counts of the paper (1 everywhere, 2 and 4 for the multi-step students).
STUDENT_NFE_CHOICES: tuple[int, ...] = (1, 2, 4)
#: Keys of ``distill.train`` that other settings own; setting them there is an error.
_OWNED_TRAIN_KEYS = {
    "lr": "set distill.lr_generator and distill.lr_aux instead (each network has its own AdamW)",
    "sample_every": "set distill.validation.every instead",
}


@dataclass(frozen=True)
class ValidationConfig:
    """The cheap validation signal logged during distillation (no clean images are used).

    every: generator updates between validations; 0 = off.
    batch_size: corrupted images held out from the *end* of ``corrupted_train`` (never trained
        on); each is drawn ``draws`` times by the teacher (once per run) and the student.
    draws: samples per held-out image (>= 4 and even: the teacher's reference splits them in
        halves); the gap is the per-image energy distance (``distill.validation`` module).
    teacher_nfe: steps K of the reference teacher sampler (the "many-step teacher"), also the
        last column of the ``distill_grid`` preview.
    reference_nfes: the teacher's step counts (below K) whose gaps are logged as references
        the student should beat; the student's own step counts are always added.
    grid_examples: rows of the ``distill_grid`` preview (taken from the held-out images).
    seed: seeds the validation's own noise, so the curves are a function of the weights only.
    """

    every: int = 25
    batch_size: int = 32
    draws: int = 4
    teacher_nfe: int = 100
    reference_nfes: tuple[int, ...] = (1, 2, 5, 10)
    grid_examples: int = 8
    seed: int = 1234

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(self.every >= 0, f"{prefix}every", f"must be >= 0 (0 = off), got {self.every}")
        require(self.batch_size >= 1, f"{prefix}batch_size", f"must be >= 1, got {self.batch_size}")
        require(
            self.draws >= 4 and self.draws % 2 == 0,
            f"{prefix}draws",
            f"must be an even number >= 4 (the teacher's draws are split in halves), got {self.draws}",
        )
        require(self.teacher_nfe >= 1, f"{prefix}teacher_nfe", f"must be >= 1, got {self.teacher_nfe}")
        for i, nfe in enumerate(self.reference_nfes):
            require(
                1 <= nfe <= self.teacher_nfe,
                f"{prefix}reference_nfes[{i}]",
                f"must be in [1, teacher_nfe={self.teacher_nfe}], got {nfe}",
            )
        require(
            1 <= self.grid_examples <= self.batch_size,
            f"{prefix}grid_examples",
            f"must be in [1, batch_size={self.batch_size}], got {self.grid_examples}",
        )
        require(self.seed >= 0, f"{prefix}seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class DistillConfig:
    """One IBMD distillation (docs/method.md sec. 4; IBMD sec. 3, Alg. 1).

    aux_steps: auxiliary ("fake") model updates L per generator update; null = the paper's
        L:K = 5:1, or 1:1 for a conditional (DDBM) teacher on inpainting.
    lr_generator / lr_aux: AdamW peak learning rates of the generator and the auxiliary model;
        null = the paper's: 5e-5 for I2SB teachers, 1e-5 for DDBM, 3e-6 for DDBM inpainting
        (``lr_aux`` null = ``lr_generator``).
    aux_batch_size: images per auxiliary update and process; null = ``train.batch_size``. With
        ``train.global_batch_size`` it is the auxiliary micro-batch: the auxiliary updates
        accumulate as many micro-batches as the generator's, so their global batch is
        ``aux_batch_size x global_batch_size / batch_size``.
    noise: feed noise z to the generator through zero-initialised input channels; null = off
        for I2SB inpainting (its xT already carries noise in the hole), on otherwise.
    student_nfe: generator evaluations N of the student (1, 2 or 4).
    multistep_mode: how a multi-step student's x0 is formed in training: ``chain`` (the full
        N-step chain, gradients through all of it), ``rollout`` (a random grid time, the chain
        rolled there without gradients, the generator's output there), ``auto`` (chain for
        I2SB teachers, rollout for DDBM, as the paper).
    train: the loop's settings; ``steps`` counts generator updates, each with its L auxiliary
        updates. ``train.lr`` and ``train.sample_every`` are owned by the keys above.
    validation: see :class:`ValidationConfig`.
    workdir: folder for the resumable working checkpoints (one sub-folder per run
        configuration); null = none.
    keep_workdir: keep the working checkpoint after a finished run (a re-run then returns the
        finished student at once); false deletes it once the student is built.
    use_teacher_ema: build the frozen teacher and the initial generator/auxiliary weights from
        the teacher's EMA weights (else its raw training weights).
    distributed: data-parallel training (``nproc_per_node`` local processes).
    cpu_bf16: bfloat16 autocast of the forward passes on the CPU when ``train.bf16`` is set:
        ``auto`` = when the CPU runs bfloat16 natively (AVX512-BF16/AMX), ``always``, ``never``.
        On CUDA ``train.bf16`` alone decides. Losses, the bridge arithmetic and the backward
        pass stay in float32.
    """

    aux_steps: int | None = None
    lr_generator: float | None = None
    lr_aux: float | None = None
    aux_batch_size: int | None = None
    noise: bool | None = None
    student_nfe: int = 1
    multistep_mode: Literal["auto", "chain", "rollout"] = "auto"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=64, lr=5e-5))
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    workdir: str | None = None
    keep_workdir: bool = False
    use_teacher_ema: bool = True
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    cpu_bf16: Literal["auto", "always", "never"] = "auto"

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        if self.aux_steps is not None:
            require(self.aux_steps >= 1, f"{prefix}aux_steps", f"must be >= 1 or null, got {self.aux_steps}")
        for name in ("lr_generator", "lr_aux"):
            value = getattr(self, name)
            if value is not None:
                require(0.0 < value <= 1.0, f"{prefix}{name}", f"must be in (0, 1] or null, got {value}")
        if self.aux_batch_size is not None:
            require(
                self.aux_batch_size >= 1,
                f"{prefix}aux_batch_size",
                f"must be >= 1 or null, got {self.aux_batch_size}",
            )
        require(
            not isinstance(self.student_nfe, bool) and self.student_nfe in STUDENT_NFE_CHOICES,
            f"{prefix}student_nfe",
            f"got {self.student_nfe!r}; allowed values: {', '.join(map(str, STUDENT_NFE_CHOICES))}",
        )
        require(
            self.workdir is None or bool(self.workdir.strip()),
            f"{prefix}workdir",
            "must be a folder path or null",
        )


    def autocast_bf16(self, device: torch.device) -> bool:
        """Whether the forward passes run under bfloat16 autocast on ``device``."""
        if not self.train.bf16:
            return False
        if device.type == "cpu":
            return self.cpu_bf16 == "always" or (self.cpu_bf16 == "auto" and cpu_has_native_bf16())
        return device.type == "cuda"


def parse_distill_config(mapping: Mapping[str, Any] | None, key: str = "distill") -> DistillConfig:
    """:func:`parse_config` for :class:`DistillConfig`, also rejecting the train keys it owns."""
    train = (mapping or {}).get("train") if isinstance(mapping, Mapping) else None
    if isinstance(train, Mapping):
        for name, advice in _OWNED_TRAIN_KEYS.items():
            if name in train:
                raise ConfigError(f"{key}.train.{name}", advice)
    return parse_config(DistillConfig, mapping, key)


@dataclass(frozen=True)
class ResolvedDistill:
    """A :class:`DistillConfig` with every ``null``/``auto`` decided for one teacher and task."""

    aux_steps: int
    lr_generator: float
    lr_aux: float
    aux_batch_size: int
    noise: bool
    student_nfe: int
    multistep_mode: Literal["chain", "rollout"]
    train: TrainConfig

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}


def paper_learning_rate(bridge_kind: str, inpainting: bool) -> float:
    """The paper's generator learning rate (IBMD App. B, Table 7): 5e-5 I2SB, 1e-5 DDBM,
    3e-6 DDBM inpainting."""
    if bridge_kind == "i2sb":
        return 5e-5
    return 3e-6 if inpainting else 1e-5


def resolve_distill(
    config: DistillConfig, *, bridge_kind: str, conditional: bool, inpainting: bool
) -> ResolvedDistill:
    """Decide the ``null``/``auto`` settings of ``config`` for a teacher and task (paper rules).

    bridge_kind: the teacher's schedule (``i2sb`` or ``ddbm_vp``); conditional: whether the
    teacher sees xT; inpainting: whether the task has a missing-pixel mask.
    """
    aux_steps = config.aux_steps
    if aux_steps is None:
        aux_steps = 1 if (conditional and inpainting) else 5
    lr_generator = config.lr_generator or paper_learning_rate(bridge_kind, inpainting)
    lr_aux = config.lr_aux or lr_generator
    noise = config.noise if config.noise is not None else not (bridge_kind == "i2sb" and inpainting)
    mode = config.multistep_mode
    if mode == "auto":
        mode = "chain" if bridge_kind == "i2sb" else "rollout"
    train = dataclasses.replace(
        config.train, lr=lr_generator, sample_every=config.validation.every
    )
    return ResolvedDistill(
        aux_steps=int(aux_steps),
        lr_generator=float(lr_generator),
        lr_aux=float(lr_aux),
        aux_batch_size=int(config.aux_batch_size or config.train.batch_size),
        noise=bool(noise),
        student_nfe=int(config.student_nfe),
        multistep_mode=mode,
        train=train,
    )
