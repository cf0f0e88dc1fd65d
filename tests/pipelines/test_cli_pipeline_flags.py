"""``kedro run --pipelines=distill`` (the README's spelling) and the deprecated ``--pipeline=distill``
both run the distillation, as real ``kedro`` commands on env ``test``.

The module's fixture trains the tiny ``test`` teacher once on the degraded data, so the two
commands have their inputs in ``data/test``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STUDENTS = PROJECT_ROOT / "data" / "test" / "06_models" / "student.pt"  # conf/test/globals.yml


@pytest.fixture(scope="module")
def teacher_trained(degrade_run, run_kedro):
    """``corrupted_train`` (session fixture) and a fresh tiny teacher in the catalog."""
    return run_kedro(["teacher"])


def kedro_run(*args: str) -> subprocess.CompletedProcess:
    # A wide console: Kedro's rich log lines would otherwise wrap inside the phrases checked below.
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "test", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def _student_versions() -> set[Path]:
    return set(STUDENTS.glob("*/student.pt"))


@pytest.mark.slow
def test_both_spellings_run_the_distill_pipeline(teacher_trained):
    students = []
    for flag, deprecated in (("--pipelines=distill", False), ("--pipeline=distill", True)):
        before = _student_versions()
        done = kedro_run(flag)
        assert done.returncode == 0, f"{flag}:\n{done.stderr[-4000:]}"
        output = done.stdout + done.stderr
        assert "Pipeline execution completed successfully" in output, flag
        assert ("'--pipeline' is deprecated" in output) is deprecated, flag
        (new,) = _student_versions() - before
        students.append(torch.load(new, weights_only=True))
    # Same teacher, data, parameters and seeds: the same student, whichever flag named the pipeline.
    spelled, deprecated_spelling = students
    assert spelled["step"] == deprecated_spelling["step"] == 4  # conf/test: distill.train.steps
    for name, weights in spelled["models"].items():
        for key, tensor in weights.items():
            assert torch.equal(tensor, deprecated_spelling["models"][name][key]), f"{name}.{key}"
