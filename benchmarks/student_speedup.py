"""Wall-clock speed-up of a student over its teacher, timed until the medians are stable.

    python benchmarks/student_speedup.py --models benchmarks/work/sr4x_bicubic/data/06_models \
        [--batch 16 64] [--teacher-nfe 100] [--min-seconds 3] [--threads 2] [--rounds 2]

Loads the latest ``teacher.pt`` and ``student.pt`` versions under ``--models`` (a data root's
``06_models``), and for each batch size times the one-step teacher, the student at NFE 1 and the
teacher at ``--teacher-nfe`` with :func:`ibmd_pipeline.metrics.speed.time_sampling` (one warm-up
call; the one-step calls repeat until ``--min-seconds`` of timed work). Prints milliseconds per
image and the student's speed-up over the multi-step teacher, ``--rounds`` times, so the spread
between rounds shows how much the machine disturbed the numbers.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.metrics.speed import time_sampling
from ibmd_pipeline.teacher.model import teacher_from_checkpoint


def latest_version(models: Path, name: str) -> Path:
    """``<models>/<name>/<latest version>/<name>``; a clear error when there is none."""
    versions = sorted(p for p in (models / name).glob("*") if (p / name).is_file())
    if not versions:
        raise SystemExit(f"no {name} under {models / name}: run the teacher and distill pipelines first")
    return versions[-1] / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("data/06_models"))
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--teacher-nfe", type=int, default=100)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = teacher_from_checkpoint(
        load_checkpoint(latest_version(args.models, "teacher.pt")), device="cpu"
    )
    student = student_from_checkpoint(
        load_checkpoint(latest_version(args.models, "student.pt")), device="cpu"
    )
    size = int(teacher.config["image_size"])
    print(f"torch {torch.__version__}, {args.threads} threads; teacher NFE {args.teacher_nfe}")

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def teacher_run(xT: torch.Tensor, nfe: int) -> torch.Tensor:
        return sample(teacher.predictor, xT, teacher.schedule, nfe, mode="ancestral", generator=seeded())

    def student_run(xT: torch.Tensor) -> torch.Tensor:
        return student.sample(xT, nfe=1, generator=seeded())

    for batch in args.batch:
        xT = torch.rand(batch, 1, size, size, generator=seeded()) * 2 - 1
        for _ in range(args.rounds):
            with torch.no_grad():
                one = time_sampling(
                    partial(teacher_run, xT, 1), batch, repeats=3, min_seconds=args.min_seconds
                )
                stu = time_sampling(
                    partial(student_run, xT), batch, repeats=3, min_seconds=args.min_seconds
                )
                many = time_sampling(partial(teacher_run, xT, args.teacher_nfe), batch, repeats=3)
            print(
                f"batch {batch}: teacher@1 {one.seconds_per_image * 1e3:.3f} ms/img "
                f"({len(one.seconds_per_batch)} calls), "
                f"student@1 {stu.seconds_per_image * 1e3:.3f} ms/img ({len(stu.seconds_per_batch)} calls), "
                f"teacher@{args.teacher_nfe} {many.seconds_per_image * 1e3:.2f} ms/img, "
                f"speed-up {many.seconds_per_image / stu.seconds_per_image:.1f}x"
            )


if __name__ == "__main__":
    main()
