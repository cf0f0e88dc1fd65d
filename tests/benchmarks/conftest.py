"""One tiny benchmark row, run once for the benchmark scripts' tests.

``row_run`` runs ``run_benchmarks.run_row("sr4x_bicubic", env="test")``: the row's environment
``bench_sr4x_bicubic`` with the ``test`` env's sizes beneath its settings. Its configuration is
a copy of ``conf/`` whose row environment points the data root into a temporary folder, so
nothing is written to ``benchmarks/results``, ``benchmarks/work`` or ``data/`` (and a real row's
data root is never wiped by a test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmarks as rb  # noqa: E402
from row_conf import ROW, isolated_conf  # noqa: E402

#: The row's grid protocol (1,000 images, 3 seeds, NFE 999) set back to the test env's tiny
#: evaluation: a full 999-step chain has no place in a unit test.
TEST_EVALUATE = {
    "evaluate": {
        "teacher_nfe": [1, 4],
        "teacher_max_images": {999: None},  # the row's cap lifted: no NFE 999 here
        "num_images": 16,
        "num_seeds": 1,
        "closeness": {"num_images": 8},
        "fid": {"num_images": 16, "reference_images": 32},
    }
}
CURVE = (2, 4)  # conf/test distils 4 updates: the curve's last point is the row's own student


@pytest.fixture(scope="session")
def row_run(tmp_path_factory) -> tuple[Path, dict[str, Any], Path]:
    """``(results file, its JSON, root)``; the row's data root is ``root/work/sr4x_bicubic/data``
    and its configuration ``root/conf``."""
    root = tmp_path_factory.mktemp("benchmarks")
    path = rb.run_row(
        ROW, env="test", threads=torch.get_num_threads(), device="cpu", out=root / "results",
        conf_source=isolated_conf(root), curve=CURVE, extra_params=TEST_EVALUATE, cost_rounds=1,
        command="pytest",
    )
    return path, json.loads(path.read_text()), root
