"""Settings of a teacher import (Kedro ``params:teacher_import``), parsed once and validated."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ibmd_pipeline.engine.config import ConfigError, parse_config, require

__all__ = ["DDBMSettings", "I2SBSettings", "TeacherImportConfig", "parse_import_config"]


@dataclass(frozen=True)
class I2SBSettings:
    """I2SB's bridge, as its ``train.py`` options name it (``teacher_import.i2sb``).

    Read from the checkpoint's ``options.pkl`` when there is one; a value set here must then
    agree with it. Without ``options.pkl``, null means the paper's value for the task:
    ``beta_max`` 0.3 (SR, JPEG) or 1.0 with ``ot_ode`` (inpainting).
    interval: number of discrete steps (``--interval``). t0, T: the network's time range
    (``--t0``, ``--T``): step ``j`` is fed the noise level ``interval * linspace(t0, T, interval)[j]``.
    """

    beta_max: float | None = None
    ot_ode: bool | None = None
    interval: int | None = None
    t0: float | None = None
    T: float | None = None

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        if self.beta_max is not None:
            require(
                0.0 < self.beta_max <= 10.0, f"{prefix}beta_max", f"must be in (0, 10], got {self.beta_max}"
            )
        if self.interval is not None:
            require(
                self.interval >= 2 and self.interval % 2 == 0,
                f"{prefix}interval",
                f"must be an even integer >= 2, got {self.interval}",
            )


@dataclass(frozen=True)
class DDBMSettings:
    """DDBM's bridge and attention, as its scripts name them (``teacher_import.ddbm``).

    pred_mode: only ``vp`` (the published checkpoints; the project's DDBM bridge is the VP one).
    beta_min, beta_d: the VP prior. sigma_min, sigma_max: its time range (``args.sh`` sets 1e-4
    and 1 for VP); sigma_max must be 1. sigma_data, cov_xy: the preconditioning's data statistics.
    attention_type: ``flash`` (DDBM's default: fused q|k|v-major projection) or ``legacy``.
    """

    pred_mode: Literal["vp"] = "vp"
    beta_min: float = 0.1
    beta_d: float = 2.0
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    sigma_data: float = 0.5
    cov_xy: float = 0.0
    attention_type: Literal["flash", "legacy"] = "flash"

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.sigma_max == 1.0,
            f"{prefix}sigma_max",
            f"must be 1 (the VP bridge ends at t = 1, as DDBM's VP checkpoints do), got {self.sigma_max}",
        )
        require(
            0.0 < self.sigma_min < 0.5, f"{prefix}sigma_min", f"must be in (0, 0.5), got {self.sigma_min}"
        )


@dataclass(frozen=True)
class TeacherImportConfig:
    """Which official checkpoint to import and how to read it (``params:teacher_import``).

    format: ``i2sb`` (NVlabs/I2SB ``results/<name>/latest.pt``: ``net`` and ``ema``) or ``ddbm``
        (alexzhou907/DDBM ``*_ema_<rate>_<step>.pt``: one ``UNetModel`` state dict).
    checkpoint: path of that file (required).
    options: I2SB's ``options.pkl``; null = the one beside the checkpoint, if any.
    architecture: ``auto`` reads the network's shape from the weights; a published name
        (``i2sb_adm256``, ``i2sb_adm256_cond``, ``ddbm_e2h64``, ``ddbm_diode256``) also requires
        the weights to be exactly that network.
    num_head_channels: channels per attention head (not stored in the weights; 64 in every
        published teacher).
    """

    format: Literal["i2sb", "ddbm"] = "i2sb"
    checkpoint: str | None = None
    options: str | None = None
    architecture: Literal[
        "auto", "i2sb_adm256", "i2sb_adm256_cond", "ddbm_e2h64", "ddbm_diode256"
    ] = "auto"
    num_head_channels: int = 64
    i2sb: I2SBSettings = dataclasses.field(default_factory=I2SBSettings)
    ddbm: DDBMSettings = dataclasses.field(default_factory=DDBMSettings)

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            bool(self.checkpoint and self.checkpoint.strip()),
            f"{prefix}checkpoint",
            "is required: the path of the official checkpoint file (I2SB latest.pt or a DDBM *.pt)",
        )
        require(
            self.num_head_channels >= 1,
            f"{prefix}num_head_channels",
            f"must be >= 1, got {self.num_head_channels}",
        )
        if self.options is not None:
            require(
                self.format == "i2sb",
                f"{prefix}options",
                "is I2SB's options.pkl; set it for format 'i2sb' only",
            )
        if self.architecture != "auto":
            family = self.architecture.split("_")[0]
            require(
                family == self.format,
                f"{prefix}architecture",
                f"'{self.architecture}' is a {family} network, but format is '{self.format}'",
            )


def parse_import_config(
    mapping: Mapping[str, Any] | None, key: str = "teacher_import"
) -> TeacherImportConfig:
    """``params:teacher_import`` as a validated :class:`TeacherImportConfig`."""
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError(key, f"expected a mapping of settings, got {type(mapping).__name__}")
    return parse_config(TeacherImportConfig, dict(mapping or {}), key)
