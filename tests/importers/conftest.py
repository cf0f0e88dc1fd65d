"""Fixtures: official checkpoint files with random weights (see ``official_files.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from official_files import (
    build_ddbm_net,
    build_i2sb_net,
    ema_network,
    i2sb_options,
    save_ddbm_checkpoint,
    save_i2sb_checkpoint,
)
from reference.originals import DDBMUNet, Image256Net


@pytest.fixture
def i2sb_sr_files(tmp_path: Path) -> tuple[Path, Image256Net]:
    """An sr4x-bicubic I2SB checkpoint folder and its original network (EMA weights in place)."""
    net = build_i2sb_net()
    path = save_i2sb_checkpoint(tmp_path / "sr4x-bicubic", net, i2sb_options("sr4x-bicubic"))
    return path, ema_network(net, path)


@pytest.fixture
def ddbm_files(tmp_path: Path) -> tuple[Path, DDBMUNet]:
    net = build_ddbm_net()
    return save_ddbm_checkpoint(tmp_path / "ddbm", net), net
