"""Fingerprint what the pipelines compute, to prove that a refactor changed no number.

Runs two fixed-seed jobs through the real Kedro pipelines and hashes every tensor and number
they produce (wall-clock fields left out):

- ``test``: ``kedro run --env test`` (degrade, teacher, distill, export, evaluate on tiny settings);
- ``sr4x_bicubic``: a short teacher + student run of the task on the ``cpu`` UNet preset
  (``--pipelines degrade,teacher,distill`` on env ``test`` with a few real-size steps, bf16
  autocast where the CPU has native bf16, as the default run).

Usage::

    python scripts/behaviour_fingerprint.py --out before.json     # on the old commit
    python scripts/behaviour_fingerprint.py --out after.json      # on the new one
    python scripts/behaviour_fingerprint.py --compare before.json after.json

Both runs must be on the same machine: another CPU's kernels may round differently. Each job
deletes and rewrites ``data/test`` (the ``test`` env's own data root).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "test"
#: Keys whose values are wall-clock measurements or run identities, not computed numbers.
VOLATILE = re.compile(
    r"sec|second|time|speed|throughput|elapsed|latency|catalog_version|version|git|host|date"
)
#: A catalog version (a time stamp) as a value: which run wrote a file, not what it computed.
VERSION_VALUE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")

SR4X_PARAMS = ",".join(
    [
        "task.kind=sr4x_bicubic",
        "teacher.model.network.preset=cpu",
        "teacher.train.steps=12",
        "teacher.train.batch_size=16",
        "teacher.train.checkpoint_every=6",
        "teacher.train.log_every=6",
        "teacher.train.bf16=true",
        "teacher.validation.every=6",
        "distill.train.steps=3",
        "distill.train.batch_size=8",
        "distill.train.log_every=1",
        "distill.train.bf16=true",
        "distill.validation.every=3",
        "distill.validation.teacher_nfe=4",
    ]
)
JOBS = {
    "test": ["--env", "test"],
    "sr4x_bicubic": ["--env", "test", "--pipelines", "degrade,teacher,distill", "--params", SR4X_PARAMS],
}


def _digest(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        return f"{value.dtype}{tuple(value.shape)}:" + hashlib.sha256(data).hexdigest()[:16]
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return f"{value.dtype}{value.shape}:{digest}"
    if isinstance(value, str) and VERSION_VALUE.match(value):
        return "(a catalog version)"
    return repr(value)


def flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    """``out[dotted key] = digest`` for every leaf, skipping volatile keys."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            if not VOLATILE.search(str(key)):
                flatten(value[key], f"{prefix}.{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = _digest(value)


def _latest(entry: Path) -> Path | None:
    """The newest version's file of a versioned catalog entry (``<entry>/<version>/<name>``)."""
    if not entry.is_dir():
        return None
    versions = sorted(p for p in entry.iterdir() if p.is_dir())
    return versions[-1] / entry.name if versions else None


def fingerprint_outputs(data: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in sorted(data.glob("0*/*")):
        path = _latest(entry)
        if path is None or not path.is_file():
            continue
        name = str(entry.relative_to(data))
        if path.suffix == ".pt" and "torchscript" not in path.name:
            flatten(torch.load(path, map_location="cpu", weights_only=True), name, out)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as bundle:
                flatten({k: bundle[k] for k in bundle.files}, name, out)
        elif path.suffix == ".json":
            flatten(json.loads(path.read_text()), name, out)
    return out


def run_job(args: list[str]) -> dict[str, str]:
    shutil.rmtree(DATA, ignore_errors=True)
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    subprocess.run([str(kedro), "run", *args], cwd=ROOT, env=env, check=True)
    return fingerprint_outputs(DATA)


def compare(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> int:
    differences = 0
    for job in sorted(set(before) | set(after)):
        a, b = before.get(job, {}), after.get(job, {})
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print(f"{job}: {len(a)} values before, {len(b)} after, {len(changed)} differ")
        for key in changed[:40]:
            print(f"  {key}: {a.get(key, '(absent)')} -> {b.get(key, '(absent)')}")
        differences += len(changed)
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the fingerprint of both jobs here")
    parser.add_argument("--jobs", default=",".join(JOBS), help="subset of: " + ", ".join(JOBS))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        return compare(before, after)
    if args.out is None:
        parser.error("give --out or --compare")
    result = {job: run_job(JOBS[job]) for job in args.jobs.split(",")}
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}: " + ", ".join(f"{job} {len(v)} values" for job, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
