"""Import a published teacher architecture and time IBMD updates on it against a teacher training step.

Builds the original network of a published teacher (I2SB's ADM-256, DDBM's Edges->Handbags 64 or
DIODE 256) with random weights, writes it in the original file layout (I2SB ``latest.pt`` with
its torch_ema state and ``options.pkl``; DDBM's plain state dict with its q|k|v-major attention
rows), imports it with ``import_teacher`` as the ``import_teacher`` pipeline does, then runs
``--updates`` IBMD updates (L auxiliary updates and one generator update each) and as many
teacher training steps at the same batch, precision and compilation. Prints one JSON record:
seconds per step (median after a warm-up that includes compilation), peak CUDA memory of each,
and their ratios (the paper's IBMD update costs about 3x a teacher step in memory).

    python scripts/gpu_import_smoke.py --architecture i2sb_adm256 --batch 8 --updates 5
    python scripts/gpu_import_smoke.py --architecture tiny --device cpu --no-bf16 --compile-backend eager

The random file's network has the published shapes: the keys and shapes this writes are those of
guided-diffusion's ``UNetModel`` (``tests/importers`` checks it key for key).
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import make_ibmd_update  # noqa: E402

from ibmd_pipeline.bridges.losses import bridge_matching_loss  # noqa: E402
from ibmd_pipeline.degradations.config import TaskConfig  # noqa: E402
from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.engine.devices import (  # noqa: E402
    autocast_context,
    compile_module,
    describe_device,
    select_device,
)
from ibmd_pipeline.networks.unet import UNet, count_parameters  # noqa: E402
from ibmd_pipeline.teacher.importers import (  # noqa: E402
    PUBLISHED_ARCHITECTURES,
    AdmArchitecture,
    TeacherImportConfig,
    import_teacher,
    qkv_major_to_head_major,
)
from ibmd_pipeline.teacher.model import teacher_from_checkpoint  # noqa: E402

#: A small stand-in for CPU checks of this script: 32x32, two levels, attention at 16x16.
TINY = AdmArchitecture(
    image_size=32, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_rates=(2,), num_head_channels=32, resblock_updown=True, use_scale_shift_norm=True,
)  # fmt: skip


def head_major_to_qkv_major(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of the import's row permutation: ADM's legacy layout back to DDBM's flash layout."""
    rows = tensor.shape[0]
    order = qkv_major_to_head_major(torch.arange(rows), heads)
    restored = torch.empty_like(tensor)
    restored[order] = tensor
    return restored


def write_official_file(architecture: AdmArchitecture, family: str, folder: Path, seed: int = 0) -> Path:
    """A random network of ``architecture`` in the original file layout of ``family``."""
    generator = torch.Generator().manual_seed(seed)
    config = architecture.unet_config()
    network = UNet(config)
    with torch.no_grad():
        for parameter in network.parameters():  # ADM zero-initialises its output convolutions
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    state = network.state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    if family == "i2sb":
        path = folder / "latest.pt"
        shadow = [tensor.clone() for tensor in state.values()]
        ema = {"decay": 0.99, "num_updates": 1, "shadow_params": shadow, "collected_params": None}
        torch.save({"net": {f"diffusion_model.{k}": v for k, v in state.items()}, "ema": ema}, path)
        options = argparse.Namespace(
            corrupt="sr4x-bicubic", image_size=architecture.image_size, interval=1000, t0=1e-4, T=1.0,
            beta_max=0.3, ot_ode=False, cond_x1=architecture.in_channels == 6, add_x1_noise=False,
            ckpt_path=folder,
        )  # fmt: skip
        with (folder / "options.pkl").open("wb") as handle:
            pickle.dump(options, handle)
        return path
    path = folder / "ddbm_ema_0.9999_0.pt"
    flash = {
        key: head_major_to_qkv_major(value, config.heads_for(value.shape[0] // 3))
        if key.endswith((".qkv.weight", ".qkv.bias"))
        else value
        for key, value in state.items()
    }
    torch.save(flash, path)
    return path


def make_teacher_step(checkpoint: dict[str, Any], config, xT: torch.Tensor, device: torch.device):
    """One bridge-matching training step of the imported teacher at the distillation's batch,
    precision and compilation (AdamW and gradient clipping, as the teacher trainer does)."""
    teacher = teacher_from_checkpoint(checkpoint, device=device)
    predictor = teacher.predictor.requires_grad_(True).train()
    compile_module(predictor.net, config.train.compile)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-5)
    bf16 = config.autocast_bf16(device)
    batch = config.train.batch_size
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(0, len(xT), (batch,), generator=generator)
        corrupted, target = xT[index].to(device), xT[index.roll(1)].to(device)
        with autocast_context(device, bf16, allow_cpu=True):
            loss = bridge_matching_loss(predictor, target, corrupted, teacher.schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        optimizer.step()

    return step, teacher.predictor


def measure(step, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per call after one warm-up call, peak CUDA MiB over them; NaN on the CPU)."""
    step()  # warm-up: allocator, kernels, compilation
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(seconds), peak


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="i2sb_adm256", choices=[*PUBLISHED_ARCHITECTURES, "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8, help="images per step (the paper: 256 over 8 GPUs)")
    parser.add_argument("--updates", type=int, default=3, help="timed IBMD updates and teacher steps")
    parser.add_argument("--aux-steps", type=int, default=5, help="L of L:K")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--workdir", type=Path, default=None, help="where the random official file goes")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args(argv)

    device = select_device(args.device)
    architecture = TINY if args.architecture == "tiny" else PUBLISHED_ARCHITECTURES[args.architecture]
    family = "ddbm" if args.architecture.startswith("ddbm") else "i2sb"
    print(f"device: {describe_device(device)}; torch {torch.__version__}; {args.architecture}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        folder = (args.workdir or Path(scratch)) / args.architecture
        start = time.perf_counter()
        path = write_official_file(architecture, family, folder)
        written = time.perf_counter() - start
        if family == "ddbm":
            task = TaskConfig(kind="paired")
        else:
            task = TaskConfig(kind="sr4x_bicubic", operators="i2sb")
        heads = architecture.num_head_channels
        start = time.perf_counter()
        checkpoint = import_teacher(
            TeacherImportConfig(format=family, checkpoint=str(path), num_head_channels=heads),
            task,
            image_size=architecture.image_size,
            channels=architecture.out_channels,
        )
        imported = time.perf_counter() - start
    print(f"wrote the random {family} file in {written:.1f} s, imported it in {imported:.1f} s", flush=True)

    size = architecture.image_size
    channels = architecture.out_channels
    xT = torch.rand(4 * args.batch, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = parse_distill_config(
        {
            "aux_steps": args.aux_steps,
            "workdir": None,
            "train": {
                "steps": args.updates + 1, "batch_size": args.batch, "log_every": 1, "checkpoint_every": 0,
                "bf16": args.bf16,
                "compile": {"enabled": args.compile, "backend": args.compile_backend,
                            "mode": "default"},
            },
            # held out and never evaluated here
            "validation": {"every": 0, "batch_size": args.batch, "grid_examples": 1},
        }
    )  # fmt: skip

    teacher_step, predictor = make_teacher_step(checkpoint, config, xT, device)
    teacher_seconds, teacher_peak = measure(teacher_step, args.updates, device)
    parameters = count_parameters(predictor.net)
    del teacher_step, predictor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ibmd_update = make_ibmd_update(checkpoint, config, xT, device, task_kind=task.kind)
    ibmd_seconds, ibmd_peak = measure(ibmd_update, args.updates, device)

    record = {
        "architecture": args.architecture,
        "parameters": parameters,
        "device": describe_device(device),
        "batch": args.batch,
        "bf16": args.bf16,
        "compile": args.compile and args.compile_backend,
        "aux_steps": args.aux_steps,
        "import_seconds": round(imported, 2),
        "teacher_step_seconds": teacher_seconds,
        "ibmd_update_seconds": ibmd_seconds,
        "update_over_teacher_step": ibmd_seconds / teacher_seconds,
        "teacher_peak_mib": teacher_peak,
        "ibmd_peak_mib": ibmd_peak,
        "peak_memory_ratio": ibmd_peak / teacher_peak if device.type == "cuda" else None,
    }
    print(json.dumps(record, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
