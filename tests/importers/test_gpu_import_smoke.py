"""``scripts/gpu_import_smoke.py``, on the CPU at a tiny size: it writes official files that import
exactly, and its timing run completes (the numbers themselves are for the GPU run)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.teacher.importers import TeacherImportConfig, import_teacher

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_import_smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_import_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_ddbm_file_holds_flash_layout_rows_and_imports_back_exactly(smoke, tmp_path):
    path = smoke.write_official_file(smoke.TINY, "ddbm", tmp_path)
    written = torch.load(path, weights_only=True)
    config = TeacherImportConfig(format="ddbm", checkpoint=str(path), num_head_channels=32)
    imported = import_teacher(config, TaskConfig(kind="paired"), image_size=32, channels=3)["ema"]["model"]
    qkv = "input_blocks.3.1.qkv.weight"  # level 1, 64 channels: two heads
    assert not torch.equal(written[qkv], imported[qkv])
    assert torch.equal(smoke.head_major_to_qkv_major(imported[qkv], 2), written[qkv])
    assert all(torch.equal(written[k], imported[k]) for k in written if ".qkv." not in k)


@pytest.mark.slow
def test_timing_run_completes_on_the_cpu(smoke, tmp_path):
    record = smoke.main(
        ["--architecture", "tiny", "--device", "cpu", "--no-bf16", "--no-compile", "--batch", "1",
         "--updates", "1", "--aux-steps", "1", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert record["teacher_step_seconds"] > 0 and record["ibmd_update_seconds"] > 0
    assert math.isnan(record["teacher_peak_mib"]) and (tmp_path / "r.json").is_file()
