"""Throughput of teacher training and IBMD distillation with the streamed loader against in-memory
tensors, and how busy the device stays (the share of wall time not spent waiting for a batch).

Random RGB images in the ImageNet layout are written to a temporary folder; the degrade step
makes in-memory bundles (``data.stream: false``) and streamed ones (``data.stream: true``); the
project's own trainers (``train_teacher``, ``distill_student``) then run ``--steps`` steps on
each. Every ``StepBatches.get`` is timed (synchronising the device first, so queued GPU work is
not counted as waiting): ``busy = 1 - loader wait / wall time``. The first step (cuDNN
autotuning, reader start-up) is excluded by timing from step 2 on.

Needs only torch, torchvision, numpy, PIL and the project's library (no Kedro). At the paper's
size on a GPU:

    python scripts/gpu_stream_smoke.py --size 256 --preset adm256 --batch 32 --images 2048 --steps 30

and on the CPU, as a check that it runs:

    python scripts/gpu_stream_smoke.py --device cpu --size 32 --preset tiny --batch 4 --images 48 \
        --steps 3 --workers 1 --aux-steps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ibmd_pipeline.data import stream as stream_module  # noqa: E402
from ibmd_pipeline.data.config import DataConfig  # noqa: E402
from ibmd_pipeline.data.pairs import build_pair_bundles, corrupted_only  # noqa: E402
from ibmd_pipeline.data.stream import StreamedPairs  # noqa: E402
from ibmd_pipeline.degradations.config import TaskConfig  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.engine.config import parse_config  # noqa: E402
from ibmd_pipeline.engine.devices import describe_device, select_device  # noqa: E402
from ibmd_pipeline.teacher.config import parse_teacher_config  # noqa: E402
from ibmd_pipeline.teacher.trainer import train_teacher  # noqa: E402

TASK = {"kind": "sr4x_bicubic"}


class LoaderClock:
    """Times every ``StepBatches.get`` (after a device synchronisation) and every step's start."""

    def __init__(self, device: torch.device):
        self.device, self.wait, self.calls = device, 0.0, 0
        self.original = stream_module.StepBatches.get

    def __enter__(self) -> LoaderClock:
        clock, original = self, self.original

        def timed(reader, step: int, position: int = 0):
            if clock.device.type == "cuda":
                torch.cuda.synchronize(clock.device)
            start = time.perf_counter()
            batch = original(reader, step, position)
            if step > 0:  # the first step starts the readers: not steady state
                clock.wait += time.perf_counter() - start
                clock.calls += 1
            return batch

        stream_module.StepBatches.get = timed
        return self

    def __exit__(self, *exc: object) -> None:
        stream_module.StepBatches.get = self.original


def write_images(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"n{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size + size // 8, size + size // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)  # ImageNet's format


def steady_seconds(history: list[dict[str, float]]) -> float:
    """Wall time of the steps after the first (``sec_per_step`` of each log window of one step)."""
    return sum(record["sec_per_step"] for record in history[1:] if "sec_per_step" in record)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = select_device(args.device)
    results: dict[str, Any] = {"device": describe_device(device), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images, args.size)
        bundles = {}
        for streamed in (False, True):
            data = parse_config(
                DataConfig,
                {"source": "folder", "path": tmp, "image_size": args.size, "channels": 3, "stream": streamed,
                 "workers": args.workers, "prefetch": args.prefetch,
                 "val_fraction": 0.02, "test_fraction": 0.02},
                "data",
            )  # fmt: skip
            bundles[streamed] = build_pair_bundles(data, TaskConfig(**TASK), seed=0)
        common = {"log_every": 1, "bf16": args.bf16, "checkpoint_every": 0}
        teacher_params = {
            "model": {"network": {"preset": args.preset}},
            "train": {"steps": args.steps, "batch_size": args.batch, **common},
            "validation": {"every": 0, "batch_size": 2},
        }
        distill_params = {
            "aux_steps": args.aux_steps,
            "train": {"steps": args.steps, "batch_size": args.batch, **common},
            "validation": {"every": 0, "batch_size": 2, "draws": 4, "grid_examples": 1, "teacher_nfe": 2,
                           "reference_nfes": [1]},
        }  # fmt: skip
        teacher = None
        for streamed in (False, True):
            name = "streamed" if streamed else "in_memory"
            pairs = bundles[streamed]
            with LoaderClock(device) as clock:
                checkpoint, history = train_teacher(
                    parse_teacher_config(teacher_params, seed=0), pairs["train"], pairs["val"],
                    task=TASK, device=str(device), progress=False,
                )  # fmt: skip
            results[f"teacher_{name}"] = summary(history, clock, args.batch)
            teacher = teacher or checkpoint
            corrupted = corrupted_only(pairs["train"])
            images = StreamedPairs(corrupted, targets=False) if streamed else corrupted["corrupted"].float()
            with LoaderClock(device) as clock:
                student = distill_student(
                    images, teacher, parse_distill_config(distill_params), mask=None, task_kind=TASK["kind"],
                    device=str(device), progress=False,
                )  # fmt: skip
            # One step = L auxiliary batches and one generator batch.
            results[f"distill_{name}"] = summary(student["history"], clock, args.batch * (args.aux_steps + 1))
    return results


def summary(history: list[dict[str, float]], clock: LoaderClock, images_per_step: int) -> dict[str, float]:
    seconds = steady_seconds(history)
    steps = max(len([r for r in history if "sec_per_step" in r]) - 1, 1)
    return {
        "images_per_second": images_per_step * steps / seconds if seconds else float("nan"),
        "seconds_per_step": seconds / steps,
        "loader_wait_seconds": clock.wait,
        "busy_fraction": 1.0 - clock.wait / seconds if seconds else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="engine.device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--size", type=int, default=256, help="image side (data.image_size)")
    parser.add_argument(
        "--preset", default="adm256", choices=("tiny", "cpu", "adm256"), help="network preset"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch per step (the paper: 32 per GPU)")
    parser.add_argument("--images", type=int, default=2048, help="random images written to the folder")
    parser.add_argument("--steps", type=int, default=30, help="steps of each run (the first is not timed)")
    parser.add_argument("--aux-steps", type=int, default=5, help="distill.aux_steps (L; the paper's 5)")
    parser.add_argument("--workers", type=int, default=8, help="data.workers: reader processes")
    parser.add_argument(
        "--prefetch", type=int, default=2, help="data.prefetch: batches each reader keeps ready"
    )
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA"
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = run(args)
    print(f"\n{results['device']}: {args.size}x{args.size}, batch {args.batch}, {args.workers} readers\n")
    print("| run | images/s | s/step | loader wait (s) | busy |")
    print("|---|---:|---:|---:|---:|")
    for key, value in results.items():
        if isinstance(value, dict) and "busy_fraction" in value:
            print(
                f"| {key} | {value['images_per_second']:.1f} | {value['seconds_per_step']:.3f} | "
                f"{value['loader_wait_seconds']:.2f} | {value['busy_fraction']:.1%} |"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
