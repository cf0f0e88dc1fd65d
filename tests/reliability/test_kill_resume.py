"""Kill -9 a training process mid-run, start it again, and get the uninterrupted result.

The child (``_train_child.py``) runs a tiny teacher or IBMD distillation on the CPU with one
thread and a workdir. The parent SIGKILLs it once a working checkpoint exists and a few more
steps have started, re-runs the same command, and checks that the second run continued from the
checkpoint's step (losing at most ``checkpoint_every`` steps) and that the final weights, EMA
and history equal a never-interrupted run's exactly (bit for bit; only ``sec_per_step`` timings
differ).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ibmd_pipeline.engine.checkpoint import load_checkpoint

CHILD = Path(__file__).with_name("_train_child.py")
CHECKPOINT_EVERY = 3  # _train_child.CHECKPOINT_EVERY
TOTAL_STEPS = {"teacher": 18, "distill": 12}
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(kind: str, workdir: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(CHILD), kind, str(workdir), str(out)],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _steps(out: Path) -> list[int]:
    path = Path(f"{out}.steps")
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _working_checkpoint(workdir: Path) -> Path | None:
    found = sorted(workdir.rglob("last.pt"))  # distillation keeps it in a per-config sub-folder
    return found[0] if found else None


def _kill_after_checkpoint(kind: str, workdir: Path, out: Path) -> tuple[int, int]:
    """Start the child slowed down, SIGKILL it a couple of steps after its first checkpoint.

    Returns (steps started before the kill, step stored in the surviving working checkpoint).
    """
    process = subprocess.Popen(
        [sys.executable, str(CHILD), kind, str(workdir), str(out), "0.15"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ended = process.poll() is not None
            assert not ended, f"child ended before it was killed: {process.stderr.read()[-3000:]}"
            path = _working_checkpoint(workdir)
            if path is not None and len(_steps(out)) >= CHECKPOINT_EVERY + 2:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no working checkpoint appeared in time")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "the killed run must not have finished"
    started = len(_steps(out))
    path = _working_checkpoint(workdir)
    assert path is not None
    stored = int(load_checkpoint(path)["step"])  # loadable: the kill left no torn file behind
    return started, stored


def _without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k != "sec_per_step"} for record in history]


def _assert_same_result(resumed: dict, reference: dict) -> None:
    assert resumed["step"] == reference["step"]
    for group in ("models", "ema"):
        for name, weights in reference[group].items():
            for key, value in weights.items():
                assert torch.equal(resumed[group][name][key], value), f"{group}.{name}.{key} differs"
    assert _without_timings(resumed["history"]) == _without_timings(reference["history"])


@pytest.mark.parametrize("kind", ["teacher", "distill"])
def test_killed_run_resumes_from_its_checkpoint_and_matches_uninterrupted_run(kind: str, tmp_path: Path):
    reference_out = tmp_path / "reference.pt"
    # The uninterrupted run goes on alongside the one that gets killed.
    reference = subprocess.Popen(
        [sys.executable, str(CHILD), kind, str(tmp_path / "work_reference"), str(reference_out)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    workdir, out = tmp_path / "work", tmp_path / "resumed.pt"
    try:
        started, stored = _kill_after_checkpoint(kind, workdir, out)
        _, errors = reference.communicate(timeout=TIMEOUT_S)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, errors[-3000:]
    assert 0 < stored < TOTAL_STEPS[kind]
    assert stored % CHECKPOINT_EVERY == 0
    # Only the steps after the last checkpoint are lost (the one in flight included).
    assert started - stored <= CHECKPOINT_EVERY + 1

    before = len(_steps(out))
    _run(kind, workdir, out)
    second_run = _steps(out)[before:]
    assert second_run[0] == stored, "the re-run must continue from the checkpoint, not from step 0"
    assert second_run == list(range(stored, TOTAL_STEPS[kind]))

    _assert_same_result(torch.load(out, weights_only=True), torch.load(reference_out, weights_only=True))
