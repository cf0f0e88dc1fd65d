"""A short GPU check of the evaluation: the same tiny evaluation on CUDA and on the CPU.

It runs ``run_evaluation`` (every sampler seed, a further teacher sampler, closeness draws,
classifier features, round-robin timing with CUDA synchronisation) on CUDA and on the CPU, and
the cached teacher evaluation on CUDA, and prints how far the CUDA numbers are from the CPU
ones (TF32 convolutions and other kernels round differently) and whether the cached teacher
evaluation reproduces the fresh one. FID and LPIPS run when their weights are in torch hub's
cache (``make setup``), else they are disabled. Needs no data: tiny random checkpoints and toy
images from the tests' builders. Usage, from the project root::

    python scripts/gpu_evaluation_check.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "evaluation")]

import torch  # noqa: E402
from evaluation_fakes import make_pairs, make_student, make_teacher, tiny_config  # noqa: E402

from ibmd_pipeline.evaluation import (  # noqa: E402
    compute_fid_reference,
    evaluate_teacher,
    metrics_table,
    run_evaluation,
    train_reference_classifier,
)
from ibmd_pipeline.metrics.weights import (  # noqa: E402
    WeightsUnavailableError,
    locate_fid_inception_weights,
    locate_lpips_alexnet_weights,
)

METRICS = ("fid", "kid", "psnr", "ssim", "lpips", "ca", "fd_classifier", "consistency", "energy_distance")


def available(locate) -> bool:
    try:
        locate()
    except WeightsUnavailableError:
        return False
    return True


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    teacher = make_teacher(image_size=32)
    student = make_student(teacher, nfe=2)
    pairs, train = make_pairs(24, size=32), make_pairs(60, size=32, split="train", seed=3)
    config = tiny_config(
        num_images=16,
        num_seeds=2,
        teacher_modes=["deterministic"],
        fid={"enabled": available(locate_fid_inception_weights), "dims": 64, "reference_images": 32},
        lpips={"enabled": available(locate_lpips_alexnet_weights)},
        closeness={"num_images": 8, "draws": 4},
        speed={"batch_size": 8, "repeats": 3, "warmup": 1, "min_seconds": 0.05},
    )
    classifier = train_reference_classifier(train, pairs, config, progress=False)
    fid = compute_fid_reference(pairs, config, pairs_train=train) if config.fid.enabled else None
    common = {"fid_reference": fid, "classifier": classifier, "progress": False}
    reports = {}
    for device in ("cuda", "cpu"):
        start = time.perf_counter()
        reports[device] = run_evaluation(pairs, teacher, student, config, device=device, **common).report
        print(f"{device}: evaluation ran in {time.perf_counter() - start:.1f} s", flush=True)
    cached = evaluate_teacher(pairs, teacher, config, device="cuda", **common)
    again = run_evaluation(
        pairs, teacher, student, config, device="cuda", teacher_evaluation=cached, **common
    ).report
    gpu, cpu = reports["cuda"], reports["cpu"]
    for metric in METRICS:
        values = [(g[metric], c[metric]) for g, c in zip(gpu["records"], cpu["records"], strict=True)]
        if any(value is None for pair in values for value in pair):
            print(f"{metric:16s} not measured: {gpu['reasons'].get(metric)}")
            continue
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in values)
        same = all(g[metric] == a[metric] for g, a in zip(gpu["records"], again["records"], strict=True))
        print(f"{metric:16s} largest relative difference CUDA vs CPU {worst:.1e}; ", end="")
        print(f"cached teacher == fresh: {same}")
    print(metrics_table(gpu))


if __name__ == "__main__":
    main()
