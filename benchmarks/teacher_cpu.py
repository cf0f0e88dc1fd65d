"""Cost and quality of the default CPU teacher on sr4x_bicubic (embedded data, base parameters).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/teacher_cpu.py [--threads 2] [--steps N]
        [--cpu-bf16 auto|always|never] [--images 500] [--no-fid]
        [--out data/08_reporting/teacher_cpu_benchmark]

Builds the degrade pairs exactly as ``kedro run --pipelines=degrade`` does with
``conf/base`` (the task forced to sr4x_bicubic), trains the teacher of
``conf/base/parameters_teacher.yml`` (a fresh working folder, so nothing is resumed) and prints

1. the cost: steps, batch, seconds per step (mean and best window of the history), wall
   time, and the process CPU time per thread (with ``OMP_WAIT_POLICY=PASSIVE`` waiting
   threads sleep, so CPU time counts work only: other processes on the machine share its
   cores and inflate the wall clock, so the CPU time is the less pessimistic number). On a
   machine that other processes keep busy, ``--threads 1`` is much faster than 2: two
   OpenMP threads spend most of their time waiting for each other (measured here: 0.55 s
   vs 2.1 s per step of the cpu network at batch 64);
2. the quality on the first ``--images`` test images, restored at NFE 1, 10 and 100 (and the
   corrupted input itself): the distance of each image *set* to held-out clean test images
   (the next ``--images`` of the test split) as the sliced Wasserstein-2 distance in pixel
   space (:func:`sliced_wasserstein` below, 1024 directions; in RMS pixel units)
   and FID (pytorch-fid's Inception, ``metrics.fid``; biased upwards at 500 images, compare
   rows only), plus the mean PSNR against each image's own clean version. The "clean" row is
   the metric's floor (clean vs held-out clean). A good teacher: NFE 1 has the best PSNR (it
   is the posterior mean) but is blurry, so its distribution distances are poor; NFE 100 is
   sharp and close to the clean distribution.

The sample grid (rows = test images; columns corrupted | NFE 1 | NFE 10 | NFE 100 | clean)
is saved to ``--out/teacher_cpu_grid.png``, the loss curves to ``teacher_cpu_loss.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from ibmd_pipeline.data import DataConfig, build_pair_bundles  # noqa: E402
from ibmd_pipeline.degradations import TaskConfig  # noqa: E402
from ibmd_pipeline.engine.config import parse_config  # noqa: E402
from ibmd_pipeline.engine.devices import describe_device, select_device  # noqa: E402
from ibmd_pipeline.metrics.image_quality import psnr  # noqa: E402
from ibmd_pipeline.pipelines.common import make_image_grid  # noqa: E402
from ibmd_pipeline.teacher import (  # noqa: E402
    parse_teacher_config,
    plot_loss_curves,
    restore,
    teacher_from_checkpoint,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
TASK = "sr4x_bicubic"
GRID_NFE = (1, 10, 100)


def base_parameters() -> dict[str, Any]:
    """``conf/base`` parameters as the Kedro session would load them (globals resolved)."""
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    args = {**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), **args)["parameters"]


def random_directions(dim: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(dim, count)`` float32 unit vectors, uniform on the sphere (normalised Gaussians)."""
    directions = torch.randn(dim, count, generator=generator, dtype=torch.float32)
    return directions / directions.norm(dim=0, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced W2 between the equal-size image sets ``a`` and ``b``: ``sqrt(mean_p W2^2(<a, p>,
    <b, p>))`` over the ``(D, P)`` unit ``directions``; W2 between equal-size 1-D empirical
    measures pairs the sorted values."""
    flat_a, flat_b = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
    if flat_a.shape != flat_b.shape or directions.shape[0] != flat_a.shape[1]:
        raise ValueError(f"sets {tuple(a.shape)}, {tuple(b.shape)} and directions {tuple(directions.shape)}")
    proj_a = (flat_a @ directions).sort(dim=0).values
    proj_b = (flat_b @ directions).sort(dim=0).values
    return math.sqrt(float((proj_a - proj_b).square().mean()))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="override teacher.train.steps")
    parser.add_argument("--cpu-bf16", choices=("auto", "always", "never"),
                        help="override teacher.cpu_bf16 (never: float32, as on a CPU without native bf16)")
    parser.add_argument("--images", type=int, default=500, help="test images restored (and as many held out)")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (about 0.2 s per image on 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "08_reporting" / "teacher_cpu_benchmark")
    parser.add_argument("--save", type=Path, help="also save the teacher checkpoint here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    params = base_parameters()
    task = parse_config(TaskConfig, {**params["task"], "kind": TASK}, "task")
    data = parse_config(DataConfig, params["data"], "data")
    seed = int(params["seed"])
    teacher_params = dict(params["teacher"])
    if args.cpu_bf16:
        teacher_params["cpu_bf16"] = args.cpu_bf16
    if args.steps:
        train = teacher_params["train"]
        warmup = min(int(train.get("warmup_steps", 0)), args.steps // 10)
        teacher_params["train"] = {**train, "steps": args.steps, "warmup_steps": warmup}
    print(f"device: {describe_device(device)}; load average {os.getloadavg()[0]:.1f} at start")

    bundles = build_pair_bundles(data, task, seed)
    test = bundles["test"]
    n = args.images
    if len(test["clean"]) < 2 * n:
        raise SystemExit(f"the test split has {len(test['clean'])} images; need 2 x --images = {2 * n}")
    print(f"pairs: {len(bundles['train']['clean'])} train, {len(bundles['val']['clean'])} val, "
          f"{len(test['clean'])} test ({tuple(test['clean'].shape[1:])})")

    with tempfile.TemporaryDirectory(prefix="teacher-bench-") as workdir:
        config = parse_teacher_config({**teacher_params, "workdir": workdir}, seed=seed)
        start_wall, start_cpu = time.perf_counter(), cpu_seconds()
        checkpoint, history = train_teacher(
            config, bundles["train"], bundles["val"], task=task, device=device
        )
        wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    train = config.train
    windows = [r["sec_per_step"] for r in history]

    teacher = teacher_from_checkpoint(checkpoint, device=device, task_kind=TASK)
    inputs, clean = test["corrupted"][:n], test["clean"][:n]
    held_out = test["clean"][n : 2 * n]
    use_bf16 = config.autocast_bf16(device)
    restored: dict[str, torch.Tensor] = {"corrupted input": inputs}
    sample_seconds: dict[str, float] = {}
    for nfe in GRID_NFE:
        begin = time.perf_counter()
        restored[f"teacher NFE {nfe}"] = restore(
            teacher.predictor, teacher.schedule, inputs, nfe=nfe, mode=config.sampler.mode, seed=seed,
            device=device, bf16=use_bf16,
        )
        sample_seconds[f"teacher NFE {nfe}"] = time.perf_counter() - begin
    restored["clean (metric floor)"] = clean

    directions = random_directions(clean[0].numel(), 1024, torch.Generator().manual_seed(seed))
    scorer = None
    if not args.no_fid:
        from ibmd_pipeline.metrics.fid import FIDScorer

        scorer = FIDScorer(device=device, batch_size=50)
        scorer.reference_statistics(held_out)

    print("\n| steps | batch | s/step (mean) | s/step (best window) | wall time | CPU time / thread |")
    print("|---|---|---|---|---|---|")
    print(f"| {train.steps} | {train.batch_size} | {statistics.mean(windows):.3f} | {min(windows):.3f} | "
          f"{wall / 60:.1f} min | {cpu / args.threads / 60:.1f} min |")
    print(f"(bf16 autocast: {use_bf16}; final train loss {history[-1]['loss']:.4f}, "
          f"val loss {history[-1].get('val_loss', float('nan')):.4f}; "
          f"load average {os.getloadavg()[0]:.1f} at end)")

    print(f"\n| {n} test images | sliced W2 to held-out clean | FID to held-out clean "
          "| PSNR vs clean (dB) | sampling |")
    print("|---|---|---|---|---|")
    for name, images in restored.items():
        swd = sliced_wasserstein(images, held_out, directions)
        fid = f"{scorer.score(images):.1f}" if scorer is not None else "-"
        quality = "inf" if name.startswith("clean") else f"{psnr(images, clean):.2f}"
        seconds = f"{sample_seconds[name]:.0f} s" if name in sample_seconds else "-"
        print(f"| {name} | {swd:.4f} | {fid} | {quality} | {seconds} |", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = 8
    columns = [inputs[:rows], *(restored[f"teacher NFE {nfe}"][:rows] for nfe in GRID_NFE), clean[:rows]]
    make_image_grid(columns, scale=4).save(args.out / "teacher_cpu_grid.png")
    figure = plot_loss_curves(history, title=f"teacher ({TASK}), {train.steps} steps")
    figure.savefig(args.out / "teacher_cpu_loss.png")
    if args.save:
        torch.save(checkpoint, args.save)
    print(f"\ngrid: {args.out / 'teacher_cpu_grid.png'} (rows: test images; corrupted | NFE 1 | NFE 10 | "
          f"NFE 100 | clean); loss curves: {args.out / 'teacher_cpu_loss.png'}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
