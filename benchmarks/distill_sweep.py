"""A sweep of distillation settings on one benchmark row's trained teacher: which learning rate,
L:K or batch keeps the student closest to its teacher.

    python benchmarks/distill_sweep.py --row inpaint_center-ddbm \\
        --grid distill.lr_generator=3e-4,1e-4,3e-5 [--grid distill.aux_steps=1,5] \\
        [--steps 100] [--every 25] [--threads 2] [--device auto] [--env ENV] [--out FILE]

Run the row first (``run_benchmarks.py --row ROW`` or ``--quick --row ROW``): the sweep reads
that run's teacher and corrupted training images from the row's data root and its parameters
from the row's environment ``conf/bench_<row>`` (give the runner's ``--env`` again if it had
one; ``--conf-source`` as for the runner). Every combination of the ``--grid`` values (the cartesian
product, values read as YAML, ``3e-4`` a float) distils a fresh student for ``--steps``
generator updates from the same seed, with the distillation's own held-out validation every
``--every`` updates: the energy distance ("gap") of the EMA student's samples to the teacher's
NFE-K samples, on corrupted images only, next to the same gap of the teacher's own few-step
samplers. The table lists, per setting, the gap at each validation, the best and the last, the
raw (non-EMA) weights' last gap and the wall time. ``--out`` also writes it as JSON.

The gap is the distillation's own quality signal (no clean image involved): a setting whose gap
grows while training runs is unstable, one whose gap keeps falling would pay for more updates.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from run_benchmarks import (  # noqa: E402
    CONF_DIR,
    ROWS,
    RowSessions,
    deep_merge,
    hardware,
    hardware_label,
    parse_rows,
    parse_value,
    row_data_root,
    row_params,
    write_json,
)

from ibmd_pipeline.distill.config import parse_distill_config  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.engine.devices import select_device  # noqa: E402

logger = logging.getLogger("distill_sweep")


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["distill.lr_generator=3e-4,1e-4"]`` -> ``[("distill.lr_generator", [3e-4, 1e-4])]``.

    Keys are dotted parameter paths under ``distill``; each value is read as YAML
    (``run_benchmarks.parse_value``: ``3e-4`` is a float). ``ValueError`` names the malformed item.
    """
    grid: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) < 2 or parts[0] != "distill" or not all(parts):
            raise ValueError(
                f"--grid takes distill.KEY=V1,V2,... with a dotted KEY under distill, got {item!r}"
            )
        values = [parse_value(value) for value in text.split(",") if value.strip()]
        if not values:
            raise ValueError(f"--grid {key} needs at least one value, got {item!r}")
        if any(existing == key for existing, _ in grid):
            raise ValueError(f"--grid {key} is given twice")
        grid.append((key, values))
    return grid


def settings_of(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values as ``{dotted key: value}``, in the given order."""
    keys = [key for key, _ in grid]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in grid))]


def nested(setting: Mapping[str, Any]) -> dict[str, Any]:
    """``{"distill.train.batch_size": 16}`` -> ``{"train": {"batch_size": 16}}`` (under ``distill``)."""
    out: dict[str, Any] = {}
    for key, value in setting.items():
        node: Any = value
        for part in reversed(key.split(".")[1:]):
            node = {part: node}
        out = deep_merge(out, node)
    return out


def trained_row(row: str, conf_source: Path = CONF_DIR) -> Path:
    """The row's data root, or ``FileNotFoundError`` naming the command when it has no teacher."""
    data_root = row_data_root(row, conf_source)
    if not any((data_root / "06_models" / "teacher.pt").glob("*/teacher.pt")):
        raise FileNotFoundError(
            f"no trained run of row {row!r} in {data_root}: "
            f"run `python benchmarks/run_benchmarks.py [--quick] --row {row}` first"
        )
    return data_root


def sweep_distill_config(
    base: Mapping[str, Any], setting: Mapping[str, Any], *, steps: int, every: int
) -> dict[str, Any]:
    """The row's distillation parameters with ``setting`` over them, ``steps`` updates, a
    validation every ``every`` updates and no working checkpoint (every setting starts fresh)."""
    merged = deep_merge(base, nested(setting))
    return deep_merge(
        merged, {"workdir": None, "train": {"steps": steps}, "validation": {"every": every}}
    )


def summarise(setting: Mapping[str, Any], checkpoint: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The validation trace of one distilled student: the gap of its own NFE at each validation."""
    nfe = int(checkpoint["config"]["generator"]["nfe"])
    key, raw_key = f"val/gap/student_nfe{nfe}", f"val/gap/student_raw_nfe{nfe}"
    validations = [record for record in checkpoint["history"] if key in record]
    if not validations:
        raise ValueError("the distillation recorded no validation: give --every >= 1")
    gaps = [(int(record["step"]), float(record[key])) for record in validations]
    references = {
        name.removeprefix("val/gap/"): float(value)
        for name, value in validations[0].items()
        if name.startswith("val/gap/teacher")
    }
    raw = [float(record[raw_key]) for record in validations if raw_key in record]
    return {
        "setting": dict(setting),
        "student_nfe": nfe,
        "gaps": gaps,
        "best_gap": min(gap for _, gap in gaps),
        "best_step": min(gaps, key=lambda point: point[1])[0],
        "last_gap": gaps[-1][1],
        "raw_last_gap": raw[-1] if raw else None,
        "references": references,
        "distill_s": seconds,
    }


def render(results: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as a markdown table (gaps at each validation, best, last, raw, minutes)."""
    steps = [step for step, _ in results[0]["gaps"]]
    header = ["setting", *(f"gap @{s}" for s in steps), "best (step)", "raw last", "min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        setting = result["setting"].items()
        label = ", ".join(f"{k.removeprefix('distill.')}={v}" for k, v in setting) or "row's"
        cells = [label, *(f"{gap:.3f}" for _, gap in result["gaps"])]
        cells.append(f"{result['best_gap']:.3f} ({result['best_step']})")
        raw = result["raw_last_gap"]
        cells.append("–" if raw is None else f"{raw:.3f}")
        cells.append(f"{result['distill_s'] / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    refs = results[0]["references"]
    named = ", ".join(f"{name} {value:.3f}" for name, value in sorted(refs.items()))
    lines.append("")
    lines.append(f"Teacher references (gap to its NFE-K samples): {named}.")
    return "\n".join(lines)


def run_sweep(
    row: str,
    grid: Sequence[tuple[str, Sequence[Any]]],
    *,
    steps: int,
    every: int,
    threads: int = 2,
    device: str = "auto",
    env: str | None = None,
    conf_source: Path = CONF_DIR,
) -> dict[str, Any]:
    """Distil one student per grid setting from the row's trained teacher; returns the sweep.

    The row's parameters are those its run had (``--quick`` changed only lengths the sweep sets).
    """
    (row,) = parse_rows([row])
    folder = trained_row(row, conf_source)
    torch.set_num_threads(threads)
    params = row_params(row, quick=False, device=device, threads=threads, env=env, conf_source=conf_source)
    sessions = RowSessions(row, params, conf_source)
    params, inputs = sessions.load("teacher_model", "corrupted_train")
    corrupted = inputs["corrupted_train"]
    results = []
    for setting in settings_of(grid) or [{}]:
        config = parse_distill_config(
            sweep_distill_config(params["distill"], setting, steps=steps, every=every)
        )
        logger.info("sweep %s: %s", row, setting or "the row's settings")
        tick = time.perf_counter()
        checkpoint = distill_student(
            corrupted["corrupted"].float(), inputs["teacher_model"], config, mask=corrupted.get("mask"),
            task_kind=params["task"]["kind"], device=device,
        )
        results.append(summarise(setting, checkpoint, time.perf_counter() - tick))
    return {
        "row": row,
        "work": str(folder),
        "teacher_steps": int(inputs["teacher_model"].get("step", 0)),
        "steps": steps,
        "every": every,
        "hardware": hardware(select_device(device)),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(ROWS),
    )
    parser.add_argument("--row", required=True, help="the benchmark row whose teacher is distilled")
    parser.add_argument("--grid", action="append", default=[], metavar="distill.KEY=V1,V2",
                        help="values of one distillation setting (repeatable: the cartesian product)")
    parser.add_argument("--steps", type=int, default=100, help="generator updates per setting (default 100)")
    parser.add_argument("--every", type=int, default=25, help="updates between validations (default 25)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--env", help="the --env the row ran with, if any (e.g. test)")
    parser.add_argument("--conf-source", type=Path, default=CONF_DIR, help="the configuration folder")
    parser.add_argument("--out", type=Path, help="also write the sweep as JSON here")
    args = parser.parse_args(argv)
    try:
        parse_rows([args.row])
        grid = parse_grid(args.grid)
        if args.steps < 1 or args.every < 1 or args.threads < 1:
            raise ValueError("--steps, --every and --threads must be >= 1")
        select_device(args.device, key="--device")
    except ValueError as err:
        parser.error(str(err))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        sweep = run_sweep(
            args.row, grid, steps=args.steps, every=args.every, threads=args.threads,
            device=args.device, env=args.env, conf_source=args.conf_source,
        )
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"\n{sweep['row']}: {sweep['steps']} updates per setting, teacher of {sweep['work']} "
          f"({sweep['teacher_steps']} steps); {hardware_label(sweep['hardware'])}\n")
    print(render(sweep["results"]))
    if args.out is not None:
        write_json(args.out, sweep)
        print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
