"""Where the time of a teacher step and of an IBMD update goes on the CPU (torch.profiler).

    python benchmarks/profile_cpu.py [--threads 2] [--steps 3] [--precision fp32|auto]

Builds, from ``conf/base`` (the ``cpu`` UNet preset, sr4x_bicubic, 32x32 gray images), a random
teacher (the cost does not depend on its weights) and random corrupted images, then profiles

- a teacher training step as the teacher trainer runs it: the bridge-matching loss at the
  teacher's batch (``teacher.train.batch_size``), backward, gradient norm and clipping, AdamW,
  EMA (``engine.training.optimizer_step``);
- an IBMD update as the distillation runs it (``DistillRun.step``: L auxiliary updates and one
  generator update) at the distillation's batch (``distill.train.batch_size``).

Each is warmed up once, then ``--steps`` are profiled. The self time of every profiled operator
(as the profiler measures it on the calling thread: an operator's OpenMP threads work inside it)
is put in one category: the optimizer, EMA and gradient clipping by the scope they run
in, everything else by the operator (convolutions forward and backward, attention, normalisation,
data movement and allocation, the rest: activations, losses, schedule arithmetic, autograd).
The table gives seconds per step and shares of the profiled time; the wall time per step of the
same steps without the profiler is printed too (the profiler adds its own overhead).

``--compile`` compiles the networks as ``train.compile.enabled`` does (inductor): the first
step's row then shows the compile time that the later steps must pay back.

``--precision fp32`` (default) forces float32 (``cpu_bf16: never``), the path of a CPU without
native bfloat16; ``auto`` keeps the configured choice. To time this CPU as one without native
bf16 or AVX-512, also set ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; the thread
settings, the kernels' ISA and the CPU flags are printed first.

Other processes on the machine share its cores: quote medians of several runs, and compare
two settings interleaved (A B A B), never one run against another taken at another time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, make_ibmd_update  # noqa: E402

from ibmd_pipeline.bridges.losses import bridge_matching_loss  # noqa: E402
from ibmd_pipeline.bridges.schedules import make_schedule  # noqa: E402
from ibmd_pipeline.degradations.config import TaskConfig  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.engine import ema as ema_module  # noqa: E402
from ibmd_pipeline.engine.config import config_to_dict  # noqa: E402
from ibmd_pipeline.engine.devices import autocast_context, compile_module, cpu_model  # noqa: E402
from ibmd_pipeline.engine.training import create_training_state, optimizer_step  # noqa: E402
from ibmd_pipeline.networks.predictors import X0Predictor  # noqa: E402
from ibmd_pipeline.teacher.config import cpu_has_native_bf16, parse_teacher_config  # noqa: E402
from ibmd_pipeline.teacher.model import build_predictor, resolve_teacher  # noqa: E402

TASK = "sr4x_bicubic"
IMAGE_SIZE, CHANNELS = 32, 1  # the embedded data set the CPU defaults are made for
IMAGES = 1024  # random corrupted images to draw batches from

#: Scopes (record_function names, matched as prefixes) whose operators count as one category.
SCOPES = {
    "Optimizer.step": "optimizer (AdamW)",
    "ema.update": "EMA",
    "grad_norm_clip": "gradient norm, clipping",
}
#: Operator-name fragments of the remaining categories, first match wins.
OPERATORS = (
    ("convolution", ("conv",)),
    ("attention", ("scaled_dot_product", "attention", "softmax", "bmm")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    (
        "data movement, allocation",
        (
            "copy",
            "aten::to",
            "index",
            "cat",
            "stack",
            "clone",
            "contiguous",
            "empty",
            "zeros",
            "fill_",
            "gather",
            "scatter",
            "randint",
            "randn",
            "normal_",
            "uniform_",
        ),
    ),
)
OTHER = "other (activations, losses, schedule, autograd)"
CATEGORIES = (*SCOPES.values(), *(name for name, _ in OPERATORS), OTHER)


def base_parameters() -> dict[str, Any]:
    """``conf/base`` parameters as the Kedro session would load them (globals resolved)."""
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    args = {**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), **args)["parameters"]


def random_teacher(model_params: dict[str, Any]) -> dict[str, Any]:
    """A teacher checkpoint (documented format) of the configured network with random weights."""
    config = parse_teacher_config({"model": model_params})
    resolved = resolve_teacher(config.model, task_kind=TASK, image_size=IMAGE_SIZE, channels=CHANNELS)
    torch.manual_seed(0)
    predictor = build_predictor(resolved.unet, make_schedule(resolved.bridge), resolved.conditional)
    with torch.no_grad():  # a fresh UNet's zero output heads would make the teacher trivial
        for parameter in predictor.net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    weights = predictor.net.state_dict()
    return {
        "kind": "teacher",
        "config": {
            "bridge": config_to_dict(resolved.bridge),
            "unet": config_to_dict(resolved.unet),
            "conditional": resolved.conditional,
            "task": config_to_dict(TaskConfig(kind=TASK)),
            "image_size": IMAGE_SIZE,
            "channels": CHANNELS,
            "teacher": {"model": config_to_dict(config.model)},
        },
        "models": {"model": weights},
        "ema": {"model": weights},
        "step": 1,
        "history": [],
    }


def teacher_step(params: dict[str, Any], bf16: bool, images: torch.Tensor) -> Callable[[], None]:
    """One step of the teacher trainer's loop (loss, backward, norm and clipping, AdamW, EMA)."""
    config = parse_teacher_config(params, seed=0)
    resolved = resolve_teacher(config.model, task_kind=TASK, image_size=IMAGE_SIZE, channels=CHANNELS)
    schedule = make_schedule(resolved.bridge)
    net = build_predictor(resolved.unet, schedule, resolved.conditional).net
    state = create_training_state({"model": net}, config.train, device="cpu")
    compile_module(state.models["model"], config.train.compile)  # as the trainer: after the EMA copy
    predictor = X0Predictor(state.models["model"], schedule, resolved.conditional)
    batch = config.train.batch_size
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x0, xT = images[index], images[index.roll(1)]  # the values do not change the cost
        with autocast_context("cpu", bf16, allow_cpu=True):
            loss = bridge_matching_loss(predictor, x0, xT, schedule, generator=state.device_generator)
        optimizer_step(state, "model", loss)

    return step


def scoped(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labelled_scopes() -> Iterator[None]:
    """Label the EMA update and the gradient norm/clipping for the profiler (the optimizer's step
    labels itself), restoring the originals afterwards."""
    patches = [
        (ema_module.EMA, "update", "ema.update"),
        (torch.nn.utils, "get_total_norm", "grad_norm_clip"),
        (torch.nn.utils, "clip_grads_with_norm_", "grad_norm_clip"),
    ]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, label in patches:
            setattr(owner, attr, scoped(label, getattr(owner, attr)))
        yield
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def category(event: Any) -> str:
    """The category of a profiled event: its nearest labelled scope, else its operator name."""
    parent = event
    while parent is not None:
        for prefix, name in SCOPES.items():
            if parent.name.startswith(prefix):
                return name
        parent = parent.cpu_parent
    name = event.name.lower()
    for label, fragments in OPERATORS:
        if any(fragment in name for fragment in fragments):
            return label
    return OTHER


def profile_steps(step: Callable[[], None], steps: int) -> tuple[dict[str, float], float, float]:
    """Self seconds per step of each category under the profiler, the median wall seconds of
    ``steps`` unprofiled steps, and the wall seconds of the first step (the warm-up)."""
    begin = time.perf_counter()
    step()  # warm-up: allocator, oneDNN primitives, compilation with --compile
    first = time.perf_counter() - begin
    walls = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        walls.append(time.perf_counter() - begin)
    with labelled_scopes(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.events():
        seconds[category(event)] += event.self_cpu_time_total / 1e6 / steps
    return dict(seconds), statistics.median(walls), first


def cpu_flags() -> str:
    """The CPU flags that decide the kernels: AVX2, AVX-512 (F, BF16, VNNI) and AMX."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    cpuinfo = Path("/proc/cpuinfo")
    flags: set[str] = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in wanted)


def print_settings(bf16: bool) -> None:
    env = (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OMP_WAIT_POLICY",
        "ATEN_CPU_CAPABILITY",
        "ONEDNN_MAX_CPU_ISA",
    )
    print(
        f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs, "
        f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable"
    )
    print(f"flags: {cpu_flags()}")
    print(
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op threads; "
        f"kernels: {torch.backends.cpu.get_cpu_capability()}; "
        f"oneDNN: {torch.backends.mkldnn.is_available()}; native bf16 (oneDNN): {cpu_has_native_bf16()}"
    )
    print("environment: " + ", ".join(f"{key}={os.environ.get(key, '-')}" for key in env))
    print(
        f"precision: {'bfloat16 autocast' if bf16 else 'float32'}; "
        f"load average {os.getloadavg()[0]:.1f} at start (other processes share the cores)"
    )


def print_table(results: dict[str, tuple[dict[str, float], float, float]]) -> None:
    names = list(results)
    print("\n| where the time goes (profiled s/step) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    totals = {name: sum(results[name][0].values()) for name in names}
    for label in CATEGORIES:
        cells = []
        for name in names:
            value = results[name][0].get(label, 0.0)
            cells.append(f"{value:.3f} ({100 * value / totals[name]:.0f}%)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| **profiled total** | " + " | ".join(f"{totals[n]:.3f}" for n in names) + " |")
    print("| wall time, unprofiled (median) | " + " | ".join(f"{results[n][1]:.3f}" for n in names) + " |")
    print(
        "| wall time of the first step (warm-up) | "
        + " | ".join(f"{results[n][2]:.3f}" for n in names)
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled (and timed) of each kind")
    parser.add_argument(
        "--precision",
        choices=("fp32", "auto"),
        default="fp32",
        help="fp32: force float32 (cpu_bf16: never); auto: the configured cpu_bf16",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the networks (train.compile.enabled, inductor, mode default)",
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    torch.set_num_threads(args.threads)
    params = base_parameters()
    teacher_params, distill_params = dict(params["teacher"]), dict(params["distill"])
    if args.precision == "fp32":
        teacher_params["cpu_bf16"] = distill_params["cpu_bf16"] = "never"
    if args.compile:
        for section in (teacher_params, distill_params):
            section["train"] = {
                **section["train"],
                "compile": {**section["train"]["compile"], "enabled": True},
            }
    distill_params["workdir"] = None
    distill_params["validation"] = {**distill_params["validation"], "every": 0}
    teacher_config = parse_teacher_config(teacher_params, seed=0)
    distill_config = parse_distill_config(distill_params)
    bf16 = teacher_config.autocast_bf16(torch.device("cpu"))
    print_settings(bf16)

    images = torch.rand(IMAGES, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    images = images * 2 - 1
    checkpoint = random_teacher(teacher_params["model"])
    teacher_name = f"teacher step (batch {teacher_config.train.batch_size})"
    results = {teacher_name: profile_steps(teacher_step(teacher_params, bf16, images), args.steps)}
    ibmd = make_ibmd_update(checkpoint, distill_config, images, torch.device("cpu"), task_kind=TASK)
    results[f"IBMD update (batch {distill_config.train.batch_size})"] = profile_steps(ibmd, args.steps)
    print_table(results)
    print(
        f"\n({args.steps} profiled steps each after a warm-up; load average {os.getloadavg()[0]:.1f} at end)"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
