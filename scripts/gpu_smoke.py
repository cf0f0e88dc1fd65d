"""GPU smoke run: a short teacher + IBMD distillation + evaluation on CUDA, printing throughput.

Runs the library directly (no Kedro session needed), so it also works on a bare GPU machine
that has torch but not the project's Kedro stack. FID/LPIPS are included only when their
weights are available there (official cache files or the offline packages); CA, PSNR, SSIM
and speed always are.

    python scripts/gpu_smoke.py [--teacher-steps 800] [--distill-steps 150] [--images 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ibmd_pipeline.data.config import DataConfig  # noqa: E402
from ibmd_pipeline.data.pairs import build_pair_bundles, corrupted_only  # noqa: E402
from ibmd_pipeline.degradations.config import TaskConfig  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.engine.config import parse_config  # noqa: E402
from ibmd_pipeline.engine.devices import describe_device, select_device  # noqa: E402
from ibmd_pipeline.evaluation.config import parse_evaluate_config  # noqa: E402
from ibmd_pipeline.evaluation.references import train_reference_classifier  # noqa: E402
from ibmd_pipeline.evaluation.report import metrics_table  # noqa: E402
from ibmd_pipeline.evaluation.runner import run_evaluation  # noqa: E402
from ibmd_pipeline.metrics.weights import (  # noqa: E402
    WeightsUnavailableError,
    locate_fid_inception_weights,
    locate_lpips_alexnet_weights,
)
from ibmd_pipeline.teacher.config import parse_teacher_config  # noqa: E402
from ibmd_pipeline.teacher.trainer import train_teacher  # noqa: E402


def available(locate) -> bool:
    try:
        locate()
        return True
    except WeightsUnavailableError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--validate-every", type=int, default=50, help="distillation validation interval; 0 = off"
    )
    parser.add_argument("--eval-images", type=int, default=500)
    args = parser.parse_args()

    device = select_device(args.device)
    print(f"device: {describe_device(device)}; torch {torch.__version__}", flush=True)
    task = parse_config(TaskConfig, {"kind": "sr4x_bicubic"}, "task")
    data = parse_config(DataConfig, {"max_images": args.images}, "data")
    bundles = build_pair_bundles(data, task, seed=0)
    print({name: len(b["clean"]) for name, b in bundles.items()}, flush=True)

    teacher_config = parse_teacher_config(
        {
            "train": {
                "steps": args.teacher_steps,
                "batch_size": 128,
                "lr": 4e-4,
                "warmup_steps": min(50, args.teacher_steps // 4),
                "lr_schedule": "cosine",
                "log_every": 50,
                "checkpoint_every": 0,
                "bf16": True,
            },
            "validation": {"every": 0, "batch_size": 128},
            "workdir": None,
        },
        seed=0,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    teacher, _ = train_teacher(
        teacher_config, bundles["train"], bundles["val"], task=task, device=device, progress=False
    )
    teacher_seconds = time.perf_counter() - start
    teacher_memory = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    )
    print(
        f"teacher: {args.teacher_steps} steps at batch 128 in {teacher_seconds:.1f} s "
        f"({args.teacher_steps / teacher_seconds:.1f} steps/s, "
        f"{128 * args.teacher_steps / teacher_seconds:.0f} img/s), "
        f"peak {teacher_memory:.0f} MiB",
        flush=True,
    )

    distill_config = parse_distill_config(
        {
            "train": {
                "steps": args.distill_steps,
                "batch_size": 128,
                "log_every": 25,
                "checkpoint_every": 0,
                "bf16": True,
            },
            "validation": {"every": args.validate_every, "batch_size": 64, "teacher_nfe": 100},
            "workdir": None,
        }
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    corrupted = corrupted_only(bundles["train"])
    start = time.perf_counter()
    student = distill_student(
        corrupted["corrupted"],
        teacher,
        distill_config,
        task_kind=task.kind,
        device=str(device),
        progress=False,
    )
    distill_seconds = time.perf_counter() - start
    distill_memory = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    )
    print(
        f"distill: {args.distill_steps} generator updates (5 aux each) at batch 128 "
        f"in {distill_seconds:.1f} s ({distill_seconds / args.distill_steps:.3f} s/update; "
        f"{(distill_seconds / args.distill_steps) / (teacher_seconds / args.teacher_steps):.1f}x "
        "a teacher step), "
        f"peak {distill_memory:.0f} MiB ({distill_memory / teacher_memory:.2f}x teacher)",
        flush=True,
    )
    for record in student["history"]:
        if any(k.startswith("val") for k in record):
            print("  ", {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})

    fid_ok, lpips_ok = available(locate_fid_inception_weights), available(locate_lpips_alexnet_weights)
    eval_config = parse_evaluate_config(
        {
            "num_images": args.eval_images,
            "teacher_nfe": [1, 10, 100],
            "batch_size": 250,
            "fid": {"enabled": fid_ok},
            "lpips": {"enabled": lpips_ok},
            "ca": {"classifier": {"epochs": 3}},
            "speed": {"batch_size": 250, "repeats": 5},
        }
    )
    classifier = train_reference_classifier(bundles["train"], bundles["test"], eval_config, progress=False)
    fid_reference = None
    if fid_ok:
        from ibmd_pipeline.evaluation.references import compute_fid_reference

        fid_reference = compute_fid_reference(
            bundles["test"], eval_config, device=device, pairs_train=bundles["train"]
        )
    result = run_evaluation(
        bundles["test"],
        teacher,
        student,
        eval_config,
        fid_reference=fid_reference,
        classifier=classifier,
        device=device,
        dataset="embedded",
        progress=False,
    )
    print(metrics_table(result.report))
    print(
        json.dumps({k: v for k, v in result.report.items() if k != "records"}, indent=1, default=str)[:3000]
    )


if __name__ == "__main__":
    main()
