"""Cost and progress of the default CPU distillation (IBMD) of the CPU teacher on sr4x_bicubic.

    python benchmarks/distill_cpu.py [--teacher PATH] [--threads 2] [--steps N] [--skip-run]

Uses the latest trained teacher (``data/06_models/teacher.pt/<version>/teacher.pt``) and the
latest ``corrupted_train`` of the degrade pipeline; without a teacher it trains a quick one
on the latest ``pairs_train``/``pairs_val`` first (and says so). Prints

1. seconds per IBMD generator update (with its L auxiliary updates) and per teacher training
   step at the same batch size and precision, measured alternately in this process, and their
   ratio (wall clock and CPU time);
2. peak memory of one teacher step and one IBMD update, each measured in a fresh process
   (peak resident set during two steps over the resident set after setup, Linux ``VmHWM``
   reset through ``/proc/self/clear_refs``; on CUDA, ``torch.cuda.max_memory_allocated``),
   and their ratio (the paper: about 3x);
3. the full default distillation (``conf/base/parameters_distill.yml``): its wall time and
   the validation distances over training: the student's energy distance to the teacher's
   NFE-K samples next to the one-step teacher's and the teacher's against itself (about 0),
   and the per-pixel std over draws.

Other processes on the machine share its cores, so timings are pessimistic; the ratios,
measured alternately in one process, are the robust numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from _common import ROOT, latest, measure_memory, measure_speed, memory_ratios  # noqa: E402

from ibmd_pipeline.distill.config import parse_distill_config, resolve_distill  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.engine.checkpoint import load_checkpoint  # noqa: E402
from ibmd_pipeline.engine.devices import describe_device, select_device  # noqa: E402
from ibmd_pipeline.io.datasets import TensorBundleDataset  # noqa: E402

TASK = "sr4x_bicubic"


def bundle_path(name: str) -> Path:
    path = latest(ROOT / "data" / "05_model_input" / f"{name}.npz", f"{name}.npz")
    if path is None:
        raise SystemExit(f"no {name} under data/05_model_input: run `kedro run --pipelines=degrade` first")
    return path


def load_bundle(name: str) -> dict[str, Any]:
    return TensorBundleDataset(filepath=str(bundle_path(name))).load()


def default_distill_config() -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(ROOT / "conf"), **CONFIG_LOADER_ARGS)
    return dict(loader["parameters"]["distill"])


def quick_teacher(steps: int, device: str) -> dict[str, Any]:
    """Train a short CPU teacher on the latest pairs (only when no trained teacher exists)."""
    from ibmd_pipeline.teacher.config import parse_teacher_config
    from ibmd_pipeline.teacher.trainer import train_teacher

    config = parse_teacher_config({"train": {"steps": steps, "warmup_steps": min(100, steps // 10)}}, seed=0)
    checkpoint, _ = train_teacher(
        config, load_bundle("pairs_train"), load_bundle("pairs_val"), task={"kind": TASK}, device=device
    )
    return checkpoint


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, help="teacher checkpoint (default: the latest trained one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, help="override distill.train.steps of the full run")
    parser.add_argument("--aux-batch-size", type=int, help="override distill.aux_batch_size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--teacher-steps", type=int, default=600, help="quick teacher, if none is found")
    parser.add_argument("--skip-run", action="store_true", help="only the cost measurements")
    parser.add_argument("--save", type=Path, help="save the student checkpoint here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"device: {describe_device(device)}")
    teacher_path = args.teacher or latest(ROOT / "data" / "06_models" / "teacher.pt", "teacher.pt")
    if teacher_path is None:
        print(f"no trained teacher under data/06_models: training a quick one ({args.teacher_steps} steps)")
        teacher_checkpoint = quick_teacher(args.teacher_steps, args.device)
        teacher_path = Path("/tmp/distill_cpu_quick_teacher.pt")
        torch.save(teacher_checkpoint, teacher_path)
    else:
        teacher_checkpoint = load_checkpoint(teacher_path)
        teacher_checkpoint["catalog_version"] = teacher_path.parent.name
    print(f"teacher: {teacher_path} (trained {teacher_checkpoint.get('step')} steps, "
          f"{teacher_checkpoint['config']['unet']['model_channels']} base channels)")

    bundle = load_bundle("corrupted_train")
    xT = bundle["corrupted"]
    distill = default_distill_config()
    distill["workdir"] = None  # never resume a previous benchmark's working checkpoint
    if args.steps is not None:
        distill["train"] = {**distill["train"], "steps": args.steps}
    if args.aux_batch_size is not None:
        distill["aux_batch_size"] = args.aux_batch_size
    config = parse_distill_config(distill)
    batch, bf16 = config.train.batch_size, config.autocast_bf16(device)
    print(f"batch {batch}, bf16 autocast {bf16}, {len(xT)} corrupted training images {tuple(xT.shape[1:])}")

    speed = measure_speed(teacher_checkpoint, config, xT, device, args.rounds, task_kind=TASK)
    teacher_config = teacher_checkpoint["config"]
    resolved_l = resolve_distill(
        config,
        bridge_kind=teacher_config["bridge"]["kind"],
        conditional=bool(teacher_config["conditional"]),
        inpainting=False,
    ).aux_steps
    print("\n| quantity | wall clock | CPU time |\n|---|---|---|")
    print(f"| teacher training step (batch {batch}) "
          f"| {speed['teacher_wall']:.3f} s | {speed['teacher_cpu']:.3f} s |")
    print(f"| IBMD update (L={resolved_l} aux + 1 generator) "
          f"| {speed['ibmd_wall']:.3f} s | {speed['ibmd_cpu']:.3f} s |")
    print(f"| ratio | {speed['ibmd_wall'] / speed['teacher_wall']:.2f}x "
          f"| {speed['ibmd_cpu'] / speed['teacher_cpu']:.2f}x |")

    corrupted_path = bundle_path("corrupted_train")
    memory = measure_memory(teacher_path, corrupted_path, distill, args.threads, args.device, TASK)
    (t0, t1), (i0, i1) = memory["teacher"], memory["ibmd"]
    ratios = memory_ratios(memory)
    unit = 2**20
    print("\n| peak memory | after setup | peak | growth |\n|---|---|---|---|")
    print(f"| teacher step | {t0 / unit:.0f} MiB | {t1 / unit:.0f} MiB | {(t1 - t0) / unit:.0f} MiB |")
    print(f"| IBMD update | {i0 / unit:.0f} MiB | {i1 / unit:.0f} MiB | {(i1 - i0) / unit:.0f} MiB |")
    print(f"| ratio | | {ratios['peak']:.2f}x (whole process) "
          f"| {ratios['training']:.2f}x (training memory) |")

    if args.skip_run:
        return
    print(f"\nfull default run: {config.train.steps} generator updates ...", flush=True)
    start = time.perf_counter()
    student = distill_student(xT, teacher_checkpoint, config, task_kind=TASK, device=args.device)
    elapsed = time.perf_counter() - start
    updates = [r["sec_per_step"] for r in student["history"] if "sec_per_step" in r]
    print(f"wall time {elapsed / 60:.1f} min ({statistics.mean(updates):.2f} s per update in the logs, "
          "validation included)")
    k = config.validation.teacher_nfe
    rows = [r for r in student["history"] if "val/gap/student_nfe1" in r]
    nfe = config.student_nfe
    references = sorted({int(key.removeprefix("val/gap/teacher_nfe")) for key in rows[0]
                         if key.startswith("val/gap/teacher_nfe")})
    header = [f"student NFE {nfe} (EMA)", "raw weights", *[f"teacher NFE {m}" for m in references],
              f"teacher NFE {k} vs itself", "std student", "std teacher"]
    print("\n| update | " + " | ".join(header) + " |\n|" + "---|" * (len(header) + 1))
    for r in rows:
        cells = [r[f"val/gap/student_nfe{nfe}"], r.get(f"val/gap/student_raw_nfe{nfe}", float("nan"))]
        cells += [r[f"val/gap/teacher_nfe{m}"] for m in references]
        cells += [r["val/gap/teacher_self"], r["val/std/student"], r["val/std/teacher"]]
        print(f"| {int(r['step'])} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    print(f"(energy distance to the teacher's NFE-{k} samples, {config.validation.draws} draws of each of "
          f"{config.validation.batch_size} held-out corrupted images; 0 = the teacher's distribution)")
    if args.save:
        torch.save({k: v for k, v in student.items()}, args.save)
        print(f"student saved to {args.save}")


if __name__ == "__main__":
    sys.exit(main())
