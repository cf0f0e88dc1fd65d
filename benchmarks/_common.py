"""Measurements shared by the benchmark scripts: the cost of one IBMD update against one teacher
training step, in time (alternating, in one process) and in peak memory (each in a fresh process).

``distill_cpu.py`` prints them for the default CPU distillation; ``run_benchmarks.py`` stores
them in every row's results file. Both compare, at the distillation's batch size and precision,

- a teacher training step: bridge matching on a trainable copy of the teacher, AdamW, clipping;
- an IBMD update: L auxiliary updates and one generator update (``DistillRun.step``).

Other processes on the machine share its cores, so absolute timings are pessimistic; the ratios,
measured alternately in one process, are the robust numbers.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from queue import Empty
from typing import Any

import torch

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.distill.config import DistillConfig, parse_distill_config
from ibmd_pipeline.distill.trainer import fresh_ibmd_update
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.devices import autocast_context, select_device
from ibmd_pipeline.io.datasets import TensorBundleDataset
from ibmd_pipeline.teacher.model import teacher_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: Corrupted training images the memory children load (enough for any batch, small in memory).
MEMORY_IMAGES = 1024

Step = Callable[[], Any]


def latest(dataset_dir: Path, name: str) -> Path | None:
    """``<dataset_dir>/<latest version>/<name>`` of a versioned catalog entry, or None."""
    if not dataset_dir.is_dir():
        return None
    versions = sorted(p for p in dataset_dir.glob("*") if (p / name).is_file())
    return versions[-1] / name if versions else None


def load_corrupted(path: Path | str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The corrupted images (float) and the mask, if any, of a ``corrupted_train`` bundle file."""
    bundle = TensorBundleDataset(filepath=str(path)).load()
    xT, mask = bundle["corrupted"].float(), bundle.get("mask")
    if limit is not None:
        xT = xT[:limit].clone()
        mask = None if mask is None else mask[:limit].clone()
    return xT, mask


# ------------------------------------------------------------------------------ timing


def make_teacher_step(
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    xT: torch.Tensor,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> Step:
    """One teacher training step (bridge matching, AdamW, clipping) at the distillation's batch
    size and precision, on a trainable copy of the teacher."""
    teacher = teacher_from_checkpoint(teacher_checkpoint, device=device)
    predictor = teacher.predictor.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-5)
    bf16 = config.autocast_bf16(device)
    batch = config.train.batch_size
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(0, len(xT), (batch,), generator=generator)
        corrupted = xT[index].to(device)
        target = xT[index.roll(1)].to(device)  # the values do not change the cost
        hole = None if mask is None else mask[index].to(device, torch.float32)
        with autocast_context(device, bf16, allow_cpu=True):
            loss = bridge_matching_loss(predictor, target, corrupted, teacher.schedule, mask=hole)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        optimizer.step()

    return step


def make_ibmd_update(
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    xT: torch.Tensor,
    device: torch.device,
    mask: torch.Tensor | None = None,
    task_kind: str | None = None,
) -> Step:
    """One IBMD update (L auxiliary updates, then the generator's) of a fresh distillation run."""
    return fresh_ibmd_update(teacher_checkpoint, config, xT, device, mask=mask, task_kind=task_kind)


def timed(fn: Step, repeats: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of ``fn`` over ``repeats`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def measure_speed(
    teacher_checkpoint: Mapping[str, Any],
    config: DistillConfig,
    xT: torch.Tensor,
    device: torch.device,
    rounds: int,
    *,
    mask: torch.Tensor | None = None,
    task_kind: str | None = None,
) -> dict[str, float]:
    """Median seconds (wall and CPU) of a teacher step (``teacher_*``, mean of 4 per round) and of
    an IBMD update (``ibmd_*``), measured alternately over ``rounds`` rounds after a warm-up."""
    teacher_step = make_teacher_step(teacher_checkpoint, config, xT, device, mask)
    ibmd_update = make_ibmd_update(teacher_checkpoint, config, xT, device, mask, task_kind)
    teacher_step(), ibmd_update()  # warm-up (allocator, oneDNN kernels)
    results: dict[str, list[float]] = {"teacher_wall": [], "teacher_cpu": [], "ibmd_wall": [], "ibmd_cpu": []}
    for _ in range(rounds):  # alternate, so that load from other processes hits both alike
        wall, cpu = timed(teacher_step, 4)
        results["teacher_wall"].append(wall)
        results["teacher_cpu"].append(cpu)
        wall, cpu = timed(ibmd_update, 1)
        results["ibmd_wall"].append(wall)
        results["ibmd_cpu"].append(cpu)
    return {key: statistics.median(values) for key, values in results.items()}


# ------------------------------------------------------------------------------ memory


def resident_peak(reset: bool = False) -> int:
    """Peak resident set of this process in bytes (Linux ``VmHWM``); ``reset`` restarts it from
    the current resident set (``/proc/self/clear_refs``), so setup peaks do not count."""
    status = Path("/proc/self/status")
    if not status.is_file():  # not Linux: the lifetime maximum is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_memory_child(
    kind: str,
    teacher_path: str,
    corrupted_path: str,
    distill: dict[str, Any],
    threads: int,
    device: str,
    task_kind: str | None,
    queue: Any,
) -> None:
    torch.set_num_threads(threads)
    device = select_device(device)
    config = parse_distill_config(distill)
    teacher_checkpoint = load_checkpoint(teacher_path)
    xT, mask = load_corrupted(corrupted_path, MEMORY_IMAGES)
    if kind == "teacher":
        fn = make_teacher_step(teacher_checkpoint, config, xT, device, mask)
    else:
        fn = make_ibmd_update(teacher_checkpoint, config, xT, device, mask, task_kind)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        fn()
        queue.put((before, torch.cuda.max_memory_allocated()))
        return
    before = resident_peak(reset=True)
    fn()
    fn()
    queue.put((before, resident_peak()))


def measure_memory(
    teacher_path: Path,
    corrupted_path: Path,
    distill: Mapping[str, Any],
    threads: int,
    device: str,
    task_kind: str | None = None,
) -> dict[str, tuple[int, int]]:
    """``{"teacher": (after setup, peak), "ibmd": (after setup, peak)}`` in bytes, each measured
    over two steps in a fresh process: the resident set on the CPU (``VmHWM``),
    ``torch.cuda.max_memory_allocated`` on CUDA."""
    context = multiprocessing.get_context("spawn")
    results = {}
    for kind in ("teacher", "ibmd"):
        queue = context.Queue()
        process = context.Process(
            target=_peak_memory_child,
            args=(
                kind, str(teacher_path), str(corrupted_path), dict(distill), threads, device, task_kind, queue
            ),
        )
        process.start()
        results[kind] = _result_of(process, queue, kind)
        process.join()
    return results


def _result_of(process: Any, queue: Any, kind: str) -> tuple[int, int]:
    """The child's answer; an error (not a hang) when it died without one."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not process.is_alive():
                try:  # it may have answered just before exiting
                    return queue.get(timeout=1.0)
                except Empty:
                    raise RuntimeError(
                        f"the {kind} memory measurement exited with code {process.exitcode} and no result"
                    ) from None


def memory_ratios(memory: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """IBMD over teacher: of the whole process's peak (``peak``) and of the growth over the
    state after setup (``training``: what the step itself allocates)."""
    (t0, t1), (i0, i1) = memory["teacher"], memory["ibmd"]
    return {"peak": i1 / t1, "training": (i1 - i0) / max(t1 - t0, 1)}
