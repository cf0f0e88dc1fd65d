"""Peak memory of the streamed loader against the in-memory path as the data set grows.

For each size, a folder of random RGB PNGs in the ImageNet layout is written, then a fresh
process runs the degrade step and reads ``--steps`` training batches, either streamed
(``data.stream: true``: a manifest, images decoded by ``--workers`` reader processes) or in
memory (``data.stream: false``: the whole split decoded and degraded up front, as before). Its
peak resident memory (``ru_maxrss``) is reported for the process and for its reader processes
(the largest one). The streamed peak should stay flat (at most 1.2x) when the set grows 10x; the
in-memory peak grows with the set.

    python benchmarks/stream_memory.py [--images 200] [--growth 10] [--size 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ibmd_pipeline.data.config import DataConfig  # noqa: E402
from ibmd_pipeline.data.pairs import build_pair_bundles  # noqa: E402
from ibmd_pipeline.data.stream import StepBatches, StreamedPairs, is_streamed  # noqa: E402
from ibmd_pipeline.degradations.config import TaskConfig  # noqa: E402
from ibmd_pipeline.engine.config import parse_config  # noqa: E402
from ibmd_pipeline.engine.training import epoch_batch_indices  # noqa: E402

BATCH = 16


def write_folder(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"n{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size + 8, size + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png", compress_level=1)


def child(path: str, stream: bool, size: int, steps: int, workers: int) -> dict[str, float]:
    """Degrade, then read ``steps`` batches; returns this process's peak memory (MiB)."""
    data = parse_config(
        DataConfig,
        {
            "source": "folder",
            "path": path,
            "image_size": size,
            "channels": 3,
            "stream": stream,
            "workers": workers,
        },
        "data",
    )
    start = time.perf_counter()
    bundles = build_pair_bundles(data, TaskConfig(kind="sr4x_bicubic"), seed=0)
    train = bundles["train"]
    if is_streamed(train):
        dataset = StreamedPairs(train)
        reader = StepBatches(
            dataset, lambda s: [epoch_batch_indices(len(dataset), BATCH, s, 0)], steps, workers=workers
        )
        for step in range(steps):
            reader.get(step)
    else:
        for step in range(steps):
            train["clean"][epoch_batch_indices(len(train["clean"]), BATCH, step, 0)].sum()
    seconds = time.perf_counter() - start
    return {
        "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reader_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "seconds": seconds,
    }


def measure(path: Path, stream: bool, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(path), "--stream", str(int(stream))]
    command += ["--size", str(args.size), "--steps", str(args.steps), "--workers", str(args.workers)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images of the small set")
    parser.add_argument("--growth", type=int, default=10, help="the large set is this many times larger")
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    parser.add_argument("--steps", type=int, default=20, help="training batches read per run")
    parser.add_argument("--workers", type=int, default=2, help="data.workers of the streamed runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stream", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(child(args.child, bool(args.stream), args.size, args.steps, args.workers)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in (args.images, args.images * args.growth):
            folder = Path(tmp) / f"set{count}"
            write_folder(folder, count, args.size)
            for stream in (True, False):
                path = "streamed" if stream else "in memory"
                rows.append((count, path, measure(folder, stream, args)))
    settings = f"{args.size}x{args.size} RGB, batch {BATCH}, {args.steps} batches"
    print(f"\n{settings}, {args.workers} reader processes\n")
    print("| images | path | peak RSS, process (MiB) | peak RSS, a reader (MiB) | seconds |")
    print("|---:|---|---:|---:|---:|")
    for count, path, result in rows:
        reader = f"{result['reader_mib']:.0f}" if path == "streamed" else "-"
        print(f"| {count} | {path} | {result['main_mib']:.0f} | {reader} | {result['seconds']:.1f} |")
    by_path = {path: [r for c, p, r in rows if p == path] for path in ("streamed", "in memory")}
    for path, (small, large) in by_path.items():
        ratio = large["main_mib"] / small["main_mib"]
        print(f"\n{path}: peak RSS x{ratio:.2f} for {args.growth}x the images", end="")
    print()


if __name__ == "__main__":
    main()
