"""Diffusion-bridge math: schedules (I2SB, DDBM-VP), the bridge matching loss and samplers."""

from ibmd_pipeline.bridges.losses import bridge_matching_loss, masked_mean_squared_error
from ibmd_pipeline.bridges.samplers import SamplerTrajectory, sample
from ibmd_pipeline.bridges.schedules import (
    BridgeConfig,
    BridgeSchedule,
    DDBMVPSchedule,
    I2SBSchedule,
    make_schedule,
)

__all__ = [
    "BridgeConfig",
    "BridgeSchedule",
    "DDBMVPSchedule",
    "I2SBSchedule",
    "SamplerTrajectory",
    "bridge_matching_loss",
    "make_schedule",
    "masked_mean_squared_error",
    "sample",
]
