"""A benchmark row's configuration for tests: ``conf/`` copied, the row's data root moved into a
temporary folder (a test never writes to, or wipes, a real row's data root)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import run_benchmarks as rb  # noqa: E402

ROW = "sr4x_bicubic"


def isolated_conf(root: Path, row: str = ROW) -> Path:
    """A copy of ``conf/`` under ``root`` whose ``bench_<row>`` data root is ``root/work/<row>/data``."""
    conf = root / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf, ignore=shutil.ignore_patterns("local"))
    data_root = root / "work" / row / "data"
    (conf / rb.row_env(row) / "globals.yml").write_text(yaml.safe_dump({"data_root": str(data_root)}))
    return conf
