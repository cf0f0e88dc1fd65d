"""bf16 autocast against float32 on this CPU: a teacher training step and an IBMD update of the
default run's networks (``conf/base``: the ``cpu`` preset, sr4x_bicubic, 32x32 gray images),
timed interleaved, and what ``cpu_bf16: auto`` then chooses.

    python benchmarks/precision_cpu.py [--rounds 8] [--threads 2]

The steps are the run plan's probe steps (``budget.probe``: random weights and images; the cost
does not depend on them). After one warm-up of each, ``--rounds`` rounds time one step of every
(kind, precision) pair in turn (A B A B), so both precisions see the same machine. The table
gives the median and the interquartile range of each, the median of the per-round ratios
float32 / bf16 with its range, and the choice of :func:`~ibmd_pipeline.budget.probe.choose_precision`
(bf16 only when it is at least ``BF16_MIN_GAIN`` faster). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import ROOT  # noqa: E402

from ibmd_pipeline.budget.probe import (  # noqa: E402
    BF16_MIN_GAIN,
    choose_precision,
    ibmd_update_call,
    random_teacher_checkpoint,
    teacher_step_call,
)
from ibmd_pipeline.degradations import TaskConfig  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.engine.config import parse_config  # noqa: E402
from ibmd_pipeline.metrics.speed import device_description  # noqa: E402
from ibmd_pipeline.teacher import parse_teacher_config  # noqa: E402
from ibmd_pipeline.teacher.config import cpu_has_native_bf16  # noqa: E402


def base_parameters() -> dict:
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(ROOT / "conf"), env="base", **CONFIG_LOADER_ARGS)
    return dict(loader["parameters"])


def quartiles(values: list[float]) -> tuple[float, float]:
    low, high = np.percentile(values, [25, 75])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    params = base_parameters()
    task = parse_config(TaskConfig, params["task"], "task")
    teacher = parse_teacher_config({**params["teacher"], "cpu_bf16": "always"}, seed=0)
    distill = parse_distill_config(
        {**params["distill"], "cpu_bf16": "always", "workdir": None, "validation": {"every": 0}}
    )
    size, channels = params["data"]["image_size"], params["data"]["channels"]
    torch.manual_seed(0)
    count = 2 * max(teacher.train.batch_size, distill.train.batch_size) + distill.validation.batch_size
    images = torch.rand(count, channels, size, size) * 2 - 1
    checkpoint = random_teacher_checkpoint(teacher, task, size, channels)
    calls = {}
    for precision, cpu_bf16 in (("bf16", "always"), ("float32", "never")):
        calls[("teacher step", precision)] = teacher_step_call(
            checkpoint, dataclasses.replace(teacher, cpu_bf16=cpu_bf16), device, images
        )
        calls[("IBMD update", precision)] = ibmd_update_call(
            checkpoint, dataclasses.replace(distill, cpu_bf16=cpu_bf16), device, images, task.kind
        )
    for call in calls.values():
        call()  # warm-up: allocator, kernel selection
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, call in calls.items():
            begin = time.perf_counter()
            call()
            seconds[key].append(time.perf_counter() - begin)
    print(f"device: {device_description(device)}; native bf16 (oneDNN): {cpu_has_native_bf16()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds after a warm-up"
    )
    print(
        "| step | bf16 median s (IQR) | float32 median s (IQR) | float32 / bf16 (median, range) | auto |"
    )
    print("|---|---:|---:|---:|---|")
    for kind in ("teacher step", "IBMD update"):
        bf16, float32 = seconds[(kind, "bf16")], seconds[(kind, "float32")]
        ratios = [f / b for f, b in zip(float32, bf16, strict=True)]
        cells = []
        for values in (bf16, float32):
            low, high = quartiles(values)
            cells.append(f"{statistics.median(values):.3f} ({low:.3f}-{high:.3f})")
        chosen = choose_precision(statistics.median(bf16), statistics.median(float32))
        print(
            f"| {kind} | {cells[0]} | {cells[1]} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {chosen} |"
        )
    print(f"(auto keeps bf16 only when it is at least {BF16_MIN_GAIN:.0%} faster than float32)")


if __name__ == "__main__":
    main()
