"""Child process of the kill-and-resume tests: one tiny teacher or IBMD run with a workdir.

usage: python _train_child.py {teacher,distill} WORKDIR OUT [STEP_DELAY]

Writes the final checkpoint to ``OUT`` (``torch.save``), and appends every loop step it starts
to ``OUT.steps`` (one integer a line, flushed) so the parent knows how far a killed run got.
STEP_DELAY (seconds) slows each step so the parent can kill it mid-run; it changes no arithmetic.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.conftest import make_corrupted, make_teacher_checkpoint  # noqa: E402
from teacher.conftest import make_bundle, tiny_params  # noqa: E402

import ibmd_pipeline.engine.loop as loop  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.teacher.config import parse_teacher_config  # noqa: E402
from ibmd_pipeline.teacher.trainer import train_teacher  # noqa: E402

TEACHER_STEPS = 18
DISTILL_STEPS = 12
CHECKPOINT_EVERY = 3


def main() -> None:
    kind, workdir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    torch.set_num_threads(1)
    steps_log = open(f"{out}.steps", "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
    original = loop.set_learning_rates

    def traced(state, step):  # called once at the start of every loop step
        steps_log.write(f"{step}\n")
        steps_log.flush()
        if delay:
            time.sleep(delay)
        return original(state, step)

    loop.set_learning_rates = traced
    if kind == "teacher":
        config = parse_teacher_config(
            tiny_params(
                train={
                    "steps": TEACHER_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 3, "seed": 5
                },
                validation={"every": 0},
            )
            | {"workdir": workdir}
        )
        checkpoint, _ = train_teacher(
            config,
            make_bundle("sr4x_bicubic", 24, seed=1),
            make_bundle("sr4x_bicubic", 8, seed=2),
            task={"kind": "sr4x_bicubic"},
            device="cpu",
            progress=False,
        )
    else:
        config = parse_distill_config(
            {
                "train": {
                    "steps": DISTILL_STEPS,
                    "batch_size": 4,
                    "log_every": 3,
                    "checkpoint_every": CHECKPOINT_EVERY,
                    "seed": 5,
                },
                "aux_steps": 2,
                "validation": {"every": 0, "batch_size": 4, "grid_examples": 2},
                "workdir": workdir,
            }
        )
        corrupted, mask = make_corrupted("sr4x_bicubic", 20)
        checkpoint = distill_student(
            corrupted,
            make_teacher_checkpoint("sr4x_bicubic"),
            config,
            mask=mask,
            task_kind="sr4x_bicubic",
            device="cpu",
            progress=False,
        )
    torch.save(checkpoint, out)


if __name__ == "__main__":
    main()
