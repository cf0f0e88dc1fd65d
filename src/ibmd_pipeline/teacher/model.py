"""What a teacher is: a bridge schedule, an x0-predictor around a UNet, and the config that built them.

A teacher checkpoint is a plain dict (``weights_only``-loadable)::

    {"kind": "teacher",
     "config": {"bridge": BridgeConfig dict, "unet": UNetConfig dict, "conditional": bool,
                "task": TaskConfig dict, "image_size": int, "channels": int,
                "teacher": TeacherConfig dict},
     "models": {"model": state_dict of the raw UNet}, "ema": {"model": state_dict},
     "step": int, "history": [...]}

The config alone rebuilds the network; :func:`teacher_from_checkpoint` does so and checks that
the checkpoint fits the task, image size and channel count it is about to be used for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ibmd_pipeline.bridges.schedules import BridgeConfig, BridgeSchedule, make_schedule
from ibmd_pipeline.engine.checkpoint import CheckpointError
from ibmd_pipeline.engine.config import ConfigError, parse_config, require
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.networks.unet import StateDictMismatchError, UNet, UNetConfig, unet_preset

__all__ = [
    "CheckpointMismatchError",
    "LoadedTeacher",
    "NetworkConfig",
    "ResolvedTeacher",
    "TeacherModelConfig",
    "build_predictor",
    "check_checkpoint_matches",
    "resolve_teacher",
    "teacher_from_checkpoint",
]


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was built for another task, image size, channel count or network."""


@dataclass(frozen=True)
class NetworkConfig:
    """UNet choice: a preset and optional overrides of its shape (null keeps the preset's value).

    preset: ``tiny`` (tests), ``cpu`` (~1M parameters, the laptop default), ``adm256`` (the
    ADM 256x256 network of the paper's teachers, for GPUs).
    """

    preset: Literal["tiny", "cpu", "adm256"] = "cpu"
    model_channels: int | None = None
    channel_mult: tuple[int, ...] | None = None
    num_res_blocks: int | None = None
    attention_resolutions: tuple[int, ...] | None = None
    dropout: float | None = None
    use_checkpoint: bool | None = None

    def build(self, *, image_size: int, in_channels: int, out_channels: int, key: str) -> UNetConfig:
        base = unet_preset(
            self.preset, image_size=image_size, in_channels=in_channels, out_channels=out_channels
        )
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }
        config = dataclasses.replace(base, **overrides)
        config.validate(key)
        return config


@dataclass(frozen=True)
class TeacherModelConfig:
    """Which bridge teacher to build (``teacher.model`` parameters).

    schedule: ``auto`` follows the paper per task (I2SB for SR/JPEG/inpainting, DDBM-VP for
        sketch and paired translation), or ``i2sb`` / ``ddbm_vp``.
    conditional: the network sees xT as extra input channels; null = the schedule's custom
        (I2SB unconditional, DDBM conditional).
    beta_max: I2SB's peak beta; null = the paper's (0.3 for SR/JPEG, 1.0 for inpainting).
    ot_ode: I2SB's deterministic OT-ODE variant; null = the paper's (on for inpainting only).
    """

    schedule: Literal["auto", "i2sb", "ddbm_vp"] = "auto"
    conditional: bool | None = None
    beta_max: float | None = None
    ot_ode: bool | None = None
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        if self.beta_max is not None:
            require(
                0.0 < self.beta_max <= 10.0, f"{prefix}beta_max", f"must be in (0, 10], got {self.beta_max}"
            )


@dataclass(frozen=True)
class ResolvedTeacher:
    """A teacher description with every ``auto``/null setting decided."""

    bridge: BridgeConfig
    unet: UNetConfig
    conditional: bool


def resolve_teacher(
    config: TeacherModelConfig, *, task_kind: str, image_size: int, channels: int, key: str = "teacher.model"
) -> ResolvedTeacher:
    """Decide schedule, conditioning and network shape for ``task_kind`` (paper defaults for ``auto``)."""
    translation = task_kind in ("sketch", "paired")
    inpainting = task_kind == "inpaint_center"
    schedule = config.schedule
    if schedule == "auto":
        schedule = "ddbm_vp" if translation else "i2sb"
    if schedule == "i2sb":
        beta_max = config.beta_max if config.beta_max is not None else (1.0 if inpainting else 0.3)
        ot_ode = config.ot_ode if config.ot_ode is not None else inpainting
        bridge = BridgeConfig(kind="i2sb", beta_max=beta_max, ot_ode=ot_ode)
    else:
        if config.ot_ode:
            raise ConfigError(f"{key}.ot_ode", "the OT-ODE variant exists for schedule 'i2sb' only")
        bridge = BridgeConfig(kind="ddbm_vp")
    bridge.validate(f"{key}")
    conditional = config.conditional if config.conditional is not None else schedule == "ddbm_vp"
    in_channels = channels * (2 if conditional else 1)
    unet = config.network.build(
        image_size=image_size, in_channels=in_channels, out_channels=channels, key=f"{key}.network"
    )
    return ResolvedTeacher(bridge=bridge, unet=unet, conditional=conditional)


def build_predictor(unet: UNetConfig, schedule: BridgeSchedule, conditional: bool) -> X0Predictor:
    """A fresh x0-predictor: the schedule's preconditioning around a new UNet."""
    return X0Predictor(UNet(unet), schedule, conditional=conditional)


@dataclass
class LoadedTeacher:
    """A teacher rebuilt from its checkpoint, frozen and in eval mode."""

    predictor: X0Predictor
    schedule: BridgeSchedule
    bridge: BridgeConfig
    unet: UNetConfig
    conditional: bool
    config: dict[str, Any]
    version: str | None

    @property
    def task_kind(self) -> str:
        return str(self.config.get("task", {}).get("kind"))


def check_checkpoint_matches(
    config: Mapping[str, Any],
    *,
    what: str,
    task_kind: str | None,
    image_size: int | None,
    channels: int | None,
) -> None:
    """Raise :class:`CheckpointMismatchError` when a checkpoint's config does not fit the data."""
    problems = []
    stored_task = config.get("task", {}).get("kind")
    if task_kind is not None and stored_task != task_kind:
        problems.append(f"task '{stored_task}' (data: '{task_kind}')")
    if image_size is not None and config.get("image_size") != image_size:
        problems.append(f"image_size {config.get('image_size')} (data: {image_size})")
    if channels is not None and config.get("channels") != channels:
        problems.append(f"{config.get('channels')} channels (data: {channels})")
    if problems:
        raise CheckpointMismatchError(
            f"the {what} checkpoint was built for " + ", ".join(problems)
            + f"; retrain the {what} for this data or point the pipeline at the matching data"
        )


def teacher_from_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    task_kind: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> LoadedTeacher:
    """Rebuild the frozen teacher predictor stored in ``checkpoint`` (see module docstring).

    Passing ``task_kind``/``image_size``/``channels`` checks that the teacher fits the data.
    """
    if checkpoint.get("kind") != "teacher":
        raise CheckpointMismatchError(
            f"expected a teacher checkpoint, got kind {checkpoint.get('kind')!r}"
        )
    config = dict(checkpoint["config"])
    check_checkpoint_matches(
        config, what="teacher", task_kind=task_kind, image_size=image_size, channels=channels
    )
    bridge = parse_config(BridgeConfig, config["bridge"], "teacher checkpoint config.bridge")
    unet_config = parse_config(UNetConfig, config["unet"], "teacher checkpoint config.unet")
    schedule = make_schedule(bridge)
    predictor = build_predictor(unet_config, schedule, bool(config["conditional"]))
    weights = checkpoint["ema" if use_ema else "models"]["model"]
    try:
        predictor.net.load_state_dict(weights)
    except StateDictMismatchError as err:  # weights of another network than the config describes
        raise CheckpointMismatchError(
            f"the teacher checkpoint's weights do not fit its network: {err}"
        ) from err
    predictor.to(device).eval()
    predictor.requires_grad_(False)
    return LoadedTeacher(
        predictor=predictor,
        schedule=schedule,
        bridge=bridge,
        unet=unet_config,
        conditional=bool(config["conditional"]),
        config=config,
        version=checkpoint.get("catalog_version"),
    )

