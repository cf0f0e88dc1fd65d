"""Same seed, same CPU, same numbers: teacher -> IBMD -> evaluation twice gives identical metrics.

A full ``kedro run --env test`` of the default pipeline takes over two minutes on the shared
2-core machine, so this compares library-level runs of the same chain instead (tiny teacher
training, tiny distillation, evaluation report) -- everything the pipeline's nodes compute,
without the catalog I/O. The report must be identical, timings and device strings aside; a
different seed must change it (so the comparison can fail).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.evaluation.config import parse_evaluate_config
from ibmd_pipeline.evaluation.runner import run_evaluation
from ibmd_pipeline.teacher.config import parse_teacher_config
from ibmd_pipeline.teacher.trainer import train_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from teacher.conftest import make_bundle, tiny_params  # noqa: E402

#: Report entries that measure the machine, not the models.
TIMING_WORDS = ("sec_per", "per_sec", "speedup", "seconds", "elapsed", "device")


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(w in k for w in TIMING_WORDS)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def pipeline_report(seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    train, val, test = (make_bundle("sr4x_bicubic", n, seed=s) for n, s in ((16, 1), (6, 2), (8, 3)))
    teacher_config = parse_teacher_config(
        tiny_params(train={"steps": 6, "log_every": 2, "warmup_steps": 0}, validation={"every": 0}), seed=seed
    )
    teacher, _ = train_teacher(teacher_config, train, val, task={"kind": "sr4x_bicubic"}, device="cpu",
                               progress=False)
    distill_config = parse_distill_config(
        {
            "train": {"steps": 3, "batch_size": 4, "log_every": 1, "seed": seed},
            "aux_steps": 2,
            "validation": {"every": 0, "batch_size": 4, "grid_examples": 2},
        }
    )
    student = distill_student(train["corrupted"], teacher, distill_config, task_kind="sr4x_bicubic",
                              device="cpu", progress=False)
    evaluate_config = parse_evaluate_config(
        {
            "num_images": 8, "teacher_nfe": [1, 2], "batch_size": 4, "grid_rows": 2, "seed": seed,
            "fid": {"enabled": False}, "lpips": {"enabled": False}, "ca": {"enabled": False},
            "speed": {"batch_size": 2, "repeats": 1, "warmup": 0, "min_seconds": 0.0},
        }
    )
    result = run_evaluation(test, teacher, student, evaluate_config, fid_reference=None, classifier=None,
                            device="cpu", progress=False)
    return json.loads(json.dumps(result.report, allow_nan=False))


@pytest.fixture(scope="module")
def first_report() -> dict[str, Any]:
    return pipeline_report(seed=11)


def test_same_seed_gives_identical_metrics_json(first_report):
    second = pipeline_report(seed=11)
    assert without_timings(second) == without_timings(first_report)
    psnr = [record["psnr"] for record in first_report["records"]]
    assert len(psnr) == 3 and all(isinstance(value, float) for value in psnr)  # teacher x2, student


def test_another_seed_changes_the_metrics(first_report):
    other = pipeline_report(seed=12)
    assert [r["psnr"] for r in other["records"]] != [r["psnr"] for r in first_report["records"]]
