"""The paper's experiment grid on the embedded data: one results file per row, one README table.

    python benchmarks/run_benchmarks.py --row sr4x_bicubic [--row jpeg5 ...] | --all
        [--quick] [--threads 2] [--device auto] [--distill-steps-curve 50,100,200,300]
        [--set distill.train.steps=600 ...] [--env ENV] [--out benchmarks/results]
    python benchmarks/run_benchmarks.py --table [--update-readme]

Each row is a Kedro configuration environment, ``conf/bench_<row>/``: its settings
(``parameters.yml``, merged key by key over ``conf/base``) and its own data root
(``globals.yml``: ``benchmarks/work/<row>/data``), so rows never mix outputs. ``kedro run --env
bench_<row>`` runs a row's pipelines by hand. The runner runs them, ``degrade -> teacher ->
distill -> evaluate``, in Kedro sessions on that environment, as ``kedro run --env bench_<row>
--pipelines=... --params ...`` would; the row's data root is wiped when the row starts, so every
timing is of a fresh run. ``--env ENV`` puts another environment's parameters (e.g. ``test``'s
tiny sizes) beneath the row's: Kedro layers one environment over ``base``, so they are passed
as runtime parameters, with the row's own settings again over them. Then, at the row's
settings, the cost of one IBMD update (its L auxiliary updates and one generator update) is
compared with one teacher training step: seconds, measured alternately in this process, and
peak memory, each in a fresh process (``_common.py``, shared with ``distill_cpu.py``).

The row's results file ``<out>/<row>.json`` (``<row>.quick.json`` with ``--quick``, so a quick
run never replaces a full result) holds the evaluation's records (``metrics.json``) with the
speed-up against every evaluated teacher NFE added, the teacher's and the distillation's
settings as trained, the wall time of each pipeline, the cost ratios and the hardware
(:func:`row_result` documents the layout). ``--table`` renders every results file as one
markdown table (``--update-readme`` writes it between ``<!-- benchmark-table:start -->`` and
``<!-- benchmark-table:end -->`` in README.md).

``--distill-steps-curve 50,100,200,300`` adds one more distillation of the row's teacher, as
long as the largest count, taking a snapshot of the student (EMA weights) after each listed
number of generator updates; each snapshot restores the same test images with the same seed
at NFE 1 and is scored like the evaluation (FID, LPIPS, CA, PSNR, SSIM): quality against
training length from one run, next to the distillation time spent until then.

``--quick`` runs one row (``sr4x_bicubic`` unless ``--row`` is given) with a short teacher
(600 steps), a short distillation (100 updates) and 100 evaluated images at teacher NFE 1, 10
and 100: about 15 minutes on 2 CPU cores. It runs in the row's data root too (replacing a full
run's working data there, never its results file). A full row (conf/base settings) takes about 35-75
minutes there. Run rows on a quiet machine: other processes inflate every wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
import yaml  # noqa: E402
from _common import ROOT, latest, measure_memory, measure_speed, memory_ratios  # noqa: E402

from ibmd_pipeline.distill.config import parse_distill_config, resolve_distill  # noqa: E402
from ibmd_pipeline.distill.student import student_from_checkpoint  # noqa: E402
from ibmd_pipeline.distill.trainer import distill_student  # noqa: E402
from ibmd_pipeline.engine.devices import cpu_model, describe_device, select_device  # noqa: E402
from ibmd_pipeline.evaluation import (  # noqa: E402
    MetricSuite,
    check_references,
    evaluated_subset,
    parse_evaluate_config,
    restore_images,
    speed_baseline_nfe,
    student_runs,
)
from ibmd_pipeline.evaluation.report import metric_cell, verdict_cell  # noqa: E402
from ibmd_pipeline.evaluation.schema import find_comparison  # noqa: E402

logger = logging.getLogger("run_benchmarks")

RESULTS_DIR = ROOT / "benchmarks" / "results"
CONF_DIR = ROOT / "conf"
README = ROOT / "README.md"
#: A row's configuration environment is ``conf/<ROW_ENV_PREFIX><row>/``.
ROW_ENV_PREFIX = "bench_"
TABLE_START = "<!-- benchmark-table:start -->"
TABLE_END = "<!-- benchmark-table:end -->"
SCHEMA = "ibmd-benchmark/1"
#: I2SB's full 1000-step chain: a 1000-step discretisation allows at most 999 sampler steps
#: (I2SB's own code runs ``nfe = interval - 1`` for its "NFE 1000").
I2SB_FULL_CHAIN_NFE = 999
PIPELINES = ("degrade", "teacher", "distill", "evaluate")
#: A number in scientific notation without a dot (``3e-4``), which YAML 1.1 leaves a string.
SCIENTIFIC = re.compile(r"[+-]?\d+[eE][+-]?\d+")


@dataclass(frozen=True)
class Row:
    """One row of the grid: the labels of its table lines. Its settings are its environment's
    (``conf/bench_<row>/parameters.yml``, :func:`row_settings`)."""

    task: str
    teacher: str
    student_nfe: int


#: The grid of the paper on the embedded data, in table order.
ROWS: dict[str, Row] = {
    "sr4x_bicubic": Row("sr4x_bicubic", "I2SB (unconditional)", 1),
    "sr4x_pool": Row("sr4x_pool", "I2SB (unconditional)", 1),
    "jpeg5": Row("jpeg (quality 5)", "I2SB (unconditional)", 1),
    "jpeg10": Row("jpeg (quality 10)", "I2SB (unconditional)", 1),
    "inpaint_center-i2sb": Row("inpaint_center", "I2SB (OT-ODE)", 4),
    "inpaint_center-ddbm": Row("inpaint_center", "DDBM-VP (conditional)", 4),
    "sketch-n1": Row("sketch", "DDBM-VP (conditional)", 1),
    "sketch-n2": Row("sketch", "DDBM-VP (conditional)", 2),
}
QUICK_ROW = "sr4x_bicubic"
#: ``--quick``: short teacher and distillation, fewer images, no full teacher chain (~15 min).
QUICK_PARAMS: dict[str, Any] = {
    "teacher": {"train": {"steps": 600}},
    "distill": {"train": {"steps": 100}},
    "evaluate": {
        "num_images": 100,
        "num_seeds": 1,
        "closeness": {"num_images": 100},
        "fid": {"num_images": 100},
        "teacher_nfe": [1, 10, 100],
        "teacher_max_images": {999: None},
    },
}


# ------------------------------------------------------------------------------ settings


def parse_rows(names: Sequence[str]) -> list[str]:
    """The row ids, checked (``ValueError`` naming the allowed ones), duplicates dropped."""
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise ValueError(f"unknown row {', '.join(map(repr, unknown))}; allowed: {', '.join(ROWS)}")
    return list(dict.fromkeys(names))


def parse_curve(text: str) -> tuple[int, ...]:
    """``"50,100,200"`` -> ``(50, 100, 200)``: distinct positive update counts, ascending."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--distill-steps-curve takes comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--distill-steps-curve needs update counts >= 1, got {text!r}")
    return tuple(sorted(set(counts)))


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, with ``3e-4`` a float (YAML 1.1 wants ``3.0e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["distill.train.steps=600", "evaluate.teacher_nfe=[1, 10]"]`` -> nested runtime params
    (values read as YAML, as ``kedro run --params`` types them; :func:`parse_value`)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"--set takes KEY=VALUE with a dotted KEY, got {item!r}")
        nested: Any = parse_value(value)
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        params = deep_merge(params, nested)
    return params


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, key by key in nested mappings (lists and values replace)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def row_env(row: str) -> str:
    """The Kedro configuration environment of a row: ``bench_<row>``."""
    return f"{ROW_ENV_PREFIX}{row}"


def _loader(conf_source: Path, env: str, *, alone: bool = False) -> Any:
    """The project's config loader on ``env`` over ``base``, or on ``env`` alone."""
    from kedro.config import OmegaConfigLoader

    from ibmd_pipeline.settings import CONFIG_LOADER_ARGS

    if alone:  # `env` as the base, nothing over it: exactly what its own files say
        return OmegaConfigLoader(conf_source=str(conf_source), base_env=env, default_run_env=env)
    return OmegaConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)


def env_parameters(env: str, conf_source: Path = CONF_DIR) -> dict[str, Any]:
    """The parameters that the files of ``conf/<env>`` alone set (what it changes over base)."""
    check_env(env, conf_source)
    return dict(_loader(conf_source, env, alone=True)["parameters"])


def row_settings(row: str, conf_source: Path = CONF_DIR) -> dict[str, Any]:
    """A row's settings over ``conf/base``: its environment's ``parameters.yml``."""
    return env_parameters(row_env(row), conf_source)


def row_data_root(row: str, conf_source: Path = CONF_DIR) -> Path:
    """The row's data root (its environment's ``data_root``; relative to the project root)."""
    return ROOT / _loader(conf_source, row_env(row))["globals"]["data_root"]


def row_params(
    row: str,
    *,
    quick: bool,
    device: str,
    threads: int,
    extra: Mapping[str, Any] | None = None,
    env: str | None = None,
    conf_source: Path = CONF_DIR,
) -> dict[str, Any]:
    """The runtime parameters of a row: ``--env``'s, the row's own settings over them, then
    ``--quick``'s, the engine's and ``--set``."""
    params = env_parameters(env, conf_source) if env is not None else {}
    params = deep_merge(params, row_settings(row, conf_source))
    params = deep_merge(params, QUICK_PARAMS if quick else {})
    params = deep_merge(params, {"engine": {"device": device, "num_threads": threads}})
    return deep_merge(params, extra or {})


def results_path(out: Path, row: str, quick: bool) -> Path:
    """``<out>/<row>.json``, or ``<row>.quick.json`` for a quick run."""
    return Path(out) / f"{row}{'.quick' if quick else ''}.json"


def check_env(env: str | None, conf_source: Path = CONF_DIR) -> None:
    """``ValueError`` naming the available ones unless ``env`` is None or a folder of ``conf/``
    (a row's environment included)."""
    if env is None:
        return
    available = sorted(p.name for p in Path(conf_source).iterdir() if p.is_dir() and p.name != "base")
    if env not in available:
        raise ValueError(f"unknown configuration environment {env!r}; allowed: {', '.join(available)}")


# ------------------------------------------------------------------------------ facts


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}{'-dirty' if dirty else ''}"


def hardware(device: torch.device) -> dict[str, Any]:
    """Where a row ran: CPU model, cores, memory, torch threads and versions, the device."""
    import kedro

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "device": describe_device(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "kedro": kedro.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def hardware_label(facts: Mapping[str, Any]) -> str:
    """One line naming the hardware of a result, for the table's footnote."""
    where = facts["gpu"] or f"{facts['cpu']}, {facts['torch_threads']} torch threads"
    return f"{where}; torch {facts['torch']}"


def add_speedups(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each record with ``speedup_vs_teacher_nfe<K>`` for every evaluated teacher NFE K: the
    teacher's seconds per image at K over the record's own (how many times faster it is)."""
    teacher = {int(r["nfe"]): float(r["sec_per_image"]) for r in records if r["model"] == "teacher"}
    result = []
    for record in records:
        own = float(record["sec_per_image"])
        extra = {f"speedup_vs_teacher_nfe{k}": seconds / own for k, seconds in sorted(teacher.items())}
        result.append({**record, **extra})
    return result


# ------------------------------------------------------------------------------ running a row


class RowSessions:
    """Kedro sessions on a row's environment, as ``kedro run --env bench_<row> --params ...``."""

    def __init__(self, row: str, params: Mapping[str, Any], conf_source: Path = CONF_DIR):
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(ROOT)
        self.env = row_env(row)
        self.conf_source = Path(conf_source)
        self.params = dict(params)

    @contextlib.contextmanager
    def session(self):
        from kedro.framework.session import KedroSession

        # Relative paths (data root, working folders) resolve against the project root, as for `kedro run`.
        with contextlib.chdir(ROOT):
            with KedroSession.create(
                project_path=ROOT, env=self.env, conf_source=str(self.conf_source), runtime_params=self.params
            ) as session:
                yield session

    def run(self, pipeline: str) -> float:
        """Run one registered pipeline; returns its wall time in seconds."""
        start = time.perf_counter()
        with self.session() as session:
            session.run(pipeline_names=[pipeline])
        return time.perf_counter() - start

    def load(self, *names: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(parameters, {name: latest catalog value})`` of this configuration."""
        with self.session() as session:
            context = session.load_context()
            return context.params, {name: context.catalog.load(name) for name in names}


def wipe_data_root(row: str, data_root: Path) -> None:
    """Remove a row's previous outputs (a finished teacher would be resumed, not timed).

    Only a folder ``.../<row>/data`` is wiped: a data root set to anything else (the project's
    own ``data/`` by a mistake in ``globals.yml``) is refused, not deleted.
    """
    if data_root.name != "data" or data_root.parent.name != row:
        raise ValueError(
            f"row {row!r}: refusing to wipe the data root {data_root}; a row's data root must be "
            f"a folder '<...>/{row}/data' (conf/{row_env(row)}/globals.yml)"
        )
    shutil.rmtree(data_root, ignore_errors=True)


def teacher_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher as trained (from its checkpoint): bridge, conditioning, network, optimisation."""
    config = checkpoint["config"]
    bridge, train = config["bridge"], config["teacher"]["train"]
    weights = checkpoint["models"]["model"]
    return {
        "schedule": bridge["kind"],
        "conditional": bool(config["conditional"]),
        "ot_ode": bool(bridge.get("ot_ode", False)),
        "beta_max": bridge.get("beta_max") if bridge["kind"] == "i2sb" else None,
        "network": config["teacher"]["model"]["network"]["preset"],
        "parameters": int(sum(t.numel() for t in weights.values())),
        "steps": int(checkpoint["step"]),
        "batch_size": train["batch_size"],
        "lr": train["lr"],
        "lr_schedule": train["lr_schedule"],
        "warmup_steps": train["warmup_steps"],
        "ema_decay": train["ema_decay"],
        "bf16": checkpoint.get("autocast_bf16"),  # bfloat16 autocast in training (None: not recorded)
    }


def distill_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The distillation as run (from the student checkpoint): N, L:K, learning rates, batches."""
    config = checkpoint["config"]
    resolved, train = config["resolved"], config["distill"]["train"]
    return {
        "student_nfe": resolved["student_nfe"],
        "multistep_mode": resolved["multistep_mode"],
        "noise": resolved["noise"],
        "steps": int(checkpoint["step"]),
        "L": resolved["aux_steps"],
        "K": 1,  # one generator update per step (the loop's unit)
        "batch_size": train["batch_size"],
        "aux_batch_size": resolved["aux_batch_size"],
        "lr_generator": resolved["lr_generator"],
        "lr_aux": resolved["lr_aux"],
        "ema_decay": train["ema_decay"],
        "use_teacher_ema": config["distill"]["use_teacher_ema"],
        "bf16": checkpoint.get("autocast_bf16"),  # bfloat16 autocast in training (None: not recorded)
    }


def measure_cost(
    data_root: Path,
    params: Mapping[str, Any],
    teacher_checkpoint: Mapping[str, Any],
    corrupted_train: Mapping[str, Any],
    *,
    threads: int,
    device: str,
    rounds: int,
) -> dict[str, Any]:
    """One IBMD update against one teacher step at the row's settings: time and peak memory."""
    distill = {**params["distill"], "workdir": None}
    config = parse_distill_config(distill)
    task_kind = params["task"]["kind"]
    chosen = select_device(device)
    xT, mask = corrupted_train["corrupted"].float(), corrupted_train.get("mask")
    speed = measure_speed(teacher_checkpoint, config, xT, chosen, rounds, mask=mask, task_kind=task_kind)
    # The memory children load the files the catalog wrote (conf/base/catalog.yml's layout).
    teacher_path = latest(data_root / "06_models" / "teacher.pt", "teacher.pt")
    corrupted_path = latest(data_root / "05_model_input" / "corrupted_train.npz", "corrupted_train.npz")
    if teacher_path is None or corrupted_path is None:
        raise FileNotFoundError(f"no teacher.pt or corrupted_train.npz version under {data_root}")
    memory = measure_memory(teacher_path, corrupted_path, distill, threads, device, task_kind)
    ratios = memory_ratios(memory)
    teacher_config = teacher_checkpoint["config"]
    resolved = resolve_distill(
        config,
        bridge_kind=teacher_config["bridge"]["kind"],
        conditional=bool(teacher_config["conditional"]),
        inpainting=mask is not None,
    )
    return {
        "update_over_teacher_step": speed["ibmd_wall"] / speed["teacher_wall"],
        "update_over_teacher_step_cpu": speed["ibmd_cpu"] / speed["teacher_cpu"],
        "peak_memory_ratio": ratios["peak"],
        "training_memory_ratio": ratios["training"],
        "teacher_step_s": speed["teacher_wall"],
        "update_s": speed["ibmd_wall"],
        "teacher_step_cpu_s": speed["teacher_cpu"],
        "update_cpu_s": speed["ibmd_cpu"],
        "peak_memory_bytes": {
            "teacher_step": {"after_setup": memory["teacher"][0], "peak": memory["teacher"][1]},
            "update": {"after_setup": memory["ibmd"][0], "peak": memory["ibmd"][1]},
        },
        "memory_measure": "cuda max_memory_allocated" if chosen.type == "cuda" else "resident set (VmHWM)",
        "batch_size": config.train.batch_size,
        "aux_batch_size": resolved.aux_batch_size,
        "L": resolved.aux_steps,
        "rounds": rounds,
    }


def fid_vs_distill_steps(
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    counts: Sequence[int],
    *,
    device: str,
) -> list[dict[str, Any]]:
    """One distillation of ``max(counts)`` updates at the row's settings (validation off, no
    working checkpoint), a student snapshot after each count, each scored at NFE 1 on the
    evaluation's images and seed. Returns ``[{"steps", "distill_s", fid, lpips, ca, psnr, ssim}]``."""
    distill = deep_merge(
        params["distill"], {"workdir": None, "validation": {"every": 0}, "train": {"steps": max(counts)}}
    )
    config = parse_distill_config(distill)
    corrupted = inputs["corrupted_train"]
    task_kind = params["task"]["kind"]
    snapshots: dict[int, tuple[dict[str, Any], float]] = {}
    start = time.perf_counter()

    def keep(updates: int, checkpoint: dict[str, Any]) -> None:
        snapshots[updates] = (checkpoint, time.perf_counter() - start)

    distill_student(
        corrupted["corrupted"].float(), inputs["teacher_model"], config, mask=corrupted.get("mask"),
        task_kind=task_kind, device=device, snapshot_steps=counts, on_snapshot=keep,
    )

    evaluate = parse_evaluate_config(params["evaluate"])
    pairs_test = inputs["pairs_test"]
    check_references(pairs_test, evaluate, inputs["fid_reference_stats"], inputs["classifier_model"])
    subset = evaluated_subset(pairs_test, evaluate)
    clean, xT, mask, labels = subset["clean"], subset["corrupted"], subset.get("mask"), subset.get("labels")
    evaluation_device = select_device(device)
    suite = MetricSuite.build(
        evaluate,
        device=evaluation_device,
        fid_reference=inputs["fid_reference_stats"],
        classifier=inputs["classifier_model"],
        labelled=labels is not None,
        image_size=min(int(clean.shape[-1]), int(clean.shape[-2])),
        progress=False,
    )
    points = []
    for updates in sorted(snapshots):
        checkpoint, seconds = snapshots[updates]
        student = student_from_checkpoint(
            checkpoint, use_ema=evaluate.use_ema, device=evaluation_device, task_kind=task_kind,
            image_size=int(clean.shape[-1]), channels=int(clean.shape[1]),
        )
        (run,) = student_runs(student, [1])
        restored = restore_images(
            run, xT, mask, batch_size=evaluate.batch_size, seed=evaluate.seed, device=evaluation_device
        )
        points.append({"steps": updates, "distill_s": seconds, **suite.score(restored, clean, labels)})
        logger.info("distillation curve: %d updates: FID %s", updates, points[-1]["fid"])
    return points


def row_result(
    row: str,
    *,
    quick: bool,
    env: str | None,
    overrides: Mapping[str, Any],
    params: Mapping[str, Any],
    outputs: Mapping[str, Any],
    timings: Mapping[str, float],
    cost: Mapping[str, Any],
    facts: Mapping[str, Any],
    curve: Sequence[Mapping[str, Any]] | None,
    command: str | None,
) -> dict[str, Any]:
    """The results file of a row (standard JSON)::

        {"schema", "row", "task" (kind), "task_config", "labels": {"task", "teacher"},
         "teacher": {"schedule", "conditional", "ot_ode", "beta_max", "network", "parameters",
                     "steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "ema_decay", "bf16"},
         "distill": {"student_nfe", "multistep_mode", "noise", "steps", "L", "K", "batch_size",
                     "aux_batch_size", "lr_generator", "lr_aux", "ema_decay", "use_teacher_ema", "bf16"},
         "evaluate": {"num_images", "teacher_nfe", "student_nfe", "sampler", "seed", "fid_dims"},
         "quick", "env", "overrides" (the runtime parameters), "hardware": {...},
         "timings": {"degrade_s", "teacher_s", "distill_s", "evaluate_s", "cost_s",
                     ["curve_s",] "total_s", "load_average": {"start", "end"}},
         "cost": {"update_over_teacher_step", "peak_memory_ratio", ... (measure_cost)},
         "records": [metrics.json records + "speedup_vs_teacher_nfe<K>" for each teacher K],
         "evaluation": the rest of metrics.json, ["fid_vs_distill_steps": [...],]
         "created", "git", "command"}
    """
    metrics = outputs["metrics"]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "row": row,
        "task": params["task"]["kind"],
        "task_config": metrics.get("task_config") or dict(params["task"]),
        "labels": {"task": ROWS[row].task, "teacher": ROWS[row].teacher},
        "teacher": teacher_settings(outputs["teacher_model"]),
        "distill": distill_settings(outputs["student_model"]),
        "evaluate": {
            "num_images": metrics["num_images"],
            "teacher_nfe": sorted(r["nfe"] for r in metrics["records"] if r["model"] == "teacher"),
            "student_nfe": sorted(r["nfe"] for r in metrics["records"] if r["model"] == "student"),
            "sampler": metrics["sampler"],
            "seed": metrics["seed"],
            "fid_dims": metrics["fid"]["dims"],
        },
        "quick": quick,
        "env": env,
        "overrides": dict(overrides),
        "hardware": dict(facts),
        "timings": dict(timings),
        "cost": dict(cost),
        "records": add_speedups(metrics["records"]),
        "evaluation": {k: v for k, v in metrics.items() if k != "records"},
    }
    if curve is not None:
        result["fid_vs_distill_steps"] = [dict(point) for point in curve]
    result.update(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        git=_git_commit(),
        command=command,
    )
    json.dumps(result, allow_nan=False)  # standard JSON, or fail before writing
    return result


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically (a killed run never leaves a truncated results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_row(
    row: str,
    *,
    quick: bool = False,
    threads: int = 2,
    device: str = "auto",
    out: Path = RESULTS_DIR,
    conf_source: Path = CONF_DIR,
    env: str | None = None,
    curve: Sequence[int] = (),
    extra_params: Mapping[str, Any] | None = None,
    cost_rounds: int = 5,
    command: str | None = None,
) -> Path:
    """Run one row end to end in its freshly wiped data root and write its results file."""
    (row,) = parse_rows([row])
    check_env(env, conf_source)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(threads)
    chosen = select_device(device)
    data_root = row_data_root(row, conf_source)
    wipe_data_root(row, data_root)
    overrides = row_params(
        row, quick=quick, device=device, threads=threads, extra=extra_params, env=env, conf_source=conf_source
    )
    sessions = RowSessions(row, overrides, conf_source)
    label = f"{row}{' (quick)' if quick else ''}"
    logger.info("row %s: data under %s, parameters %s", label, data_root, overrides)

    timings: dict[str, Any] = {}
    for pipeline in PIPELINES:
        logger.info("row %s: pipeline %s", row, pipeline)
        timings[f"{pipeline}_s"] = sessions.run(pipeline)
    names = ("teacher_model", "student_model", "metrics", "corrupted_train")
    curve_names = ("pairs_test", "classifier_model", "fid_reference_stats") if curve else ()
    params, outputs = sessions.load(*names, *curve_names)

    tick = time.perf_counter()
    cost = measure_cost(
        data_root, params, outputs["teacher_model"], outputs["corrupted_train"],
        threads=threads, device=device, rounds=cost_rounds,
    )
    timings["cost_s"] = time.perf_counter() - tick
    points = None
    if curve:
        tick = time.perf_counter()
        points = fid_vs_distill_steps(params, outputs, curve, device=device)
        timings["curve_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started
    timings["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}

    result = row_result(
        row, quick=quick, env=env, overrides=overrides, params=params, outputs=outputs,
        timings=timings, cost=cost, facts=hardware(chosen), curve=points, command=command,
    )
    path = results_path(out, row, quick)
    write_json(path, result)
    logger.info("row %s: %s (%.1f min)", row, path, timings["total_s"] / 60)
    return path


# ------------------------------------------------------------------------------ the table


def load_results(out: Path) -> list[dict[str, Any]]:
    """The results files in ``out``, in grid order; a full result hides a quick one of its row."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(out).glob("*.json")):
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or result.get("schema") != SCHEMA:
            continue
        kept = found.get(result["row"])
        if kept is None or (kept["quick"] and not result["quick"]):
            found[result["row"]] = result
    order = {name: index for index, name in enumerate(ROWS)}
    return sorted(found.values(), key=lambda r: (order.get(r["row"], len(order)), r["row"]))


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _significant(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


#: Metrics in the grid table (each with its 95% interval) and those the verdict column names.
TABLE_METRICS = ("fid", "kid", "fd_classifier", "lpips", "ca", "psnr", "ssim")
VERDICT_METRICS = (("KID", "kid"), ("FD cls", "fd_classifier"), ("LPIPS", "lpips"))


def _verdicts(result: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    """A student's differences to the teacher at the speed baseline NFE (100 when evaluated), with
    the verdicts the evaluation drew from their intervals; empty for the teacher's own lines."""
    if record["model"] != "student":
        return ""
    baseline = f"teacher@{speed_baseline_nfe(result['evaluate']['teacher_nfe'])}"
    comparison = find_comparison(result["evaluation"].get("comparisons") or [], record["label"], baseline)
    if comparison is None:
        return ""
    cells = [
        f"{title} {verdict_cell(comparison, key)}"
        for title, key in VERDICT_METRICS
        if key in comparison["metrics"]
    ]
    return f"vs {baseline}: " + "; ".join(cells)


def _bf16(result: Mapping[str, Any]) -> str:
    def flag(value: bool | None) -> str:
        return "–" if value is None else ("bf16" if value else "fp32")

    return f"{flag(result['teacher'].get('bf16'))} / {flag(result['distill'].get('bf16'))}"


def render_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Every result as markdown: one line per model and NFE with each metric's 95% interval, the
    students' verdicts against the teacher, the row's costs on its first line, the hardware
    below, and the FID-vs-distillation-steps tables of results that have one."""
    header = [
        "row", "task", "teacher", "student NFE (train)", "model", "NFE", "FID", "KID ×10³", "FD cls",
        "LPIPS", "CA (%)", "PSNR", "SSIM", "difference [95% interval] verdict", "s / image",
        "speed-up vs teacher NFE", "teacher training", "distillation", "update / teacher step",
        "peak memory (update / step)", "training precision (teacher / student)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    machines: dict[str, list[str]] = {}
    for result in results:
        name = result["row"] + (" (quick)" if result["quick"] else "")
        machines.setdefault(hardware_label(result["hardware"]), []).append(name)
        teacher_nfes = result["evaluate"]["teacher_nfe"]
        for index, record in enumerate(result["records"]):
            speedups = ", ".join(
                f"{k}: {_significant(record.get(f'speedup_vs_teacher_nfe{k}'))}×" for k in teacher_nfes
            )
            first = index == 0
            cells = [
                name if first else "",
                result["labels"]["task"] if first else "",
                result["labels"]["teacher"] if first else "",
                str(result["distill"]["student_nfe"]) if first else "",
                record["model"],
                str(record["nfe"]),
                *(metric_cell(record, key) for key in TABLE_METRICS),
                _verdicts(result, record),
                _significant(record["sec_per_image"]),
                speedups,
                _minutes(result["timings"]["teacher_s"]) if first else "",
                _minutes(result["timings"]["distill_s"]) if first else "",
                f"{result['cost']['update_over_teacher_step']:.2f}×" if first else "",
                f"{result['cost']['peak_memory_ratio']:.2f}×" if first else "",
                _bf16(result) if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, names in machines.items():
        lines.append(f"Measured on {label} ({', '.join(names)}).")
    lines.append(
        "Teacher training and distillation: wall time of the `teacher` and `distill` pipelines. "
        "Update / teacher step: seconds of one IBMD update (its L auxiliary updates and one generator "
        "update) over one teacher training step at the distillation's batch; peak memory: the same "
        "two steps' peak memory, each in a fresh process. Teacher NFE 999 is I2SB's full chain."
    )
    for result in results:
        curve = result.get("fid_vs_distill_steps")
        if not curve:
            continue
        lines += [
            "",
            f"FID against distillation length, {result['row']}"
            f"{' (quick)' if result['quick'] else ''}: the student at NFE 1 after each number of "
            f"generator updates of one run, on the same {result['evaluate']['num_images']} test images "
            "and seed.",
            "",
            "| generator updates | distillation time | FID | LPIPS | CA (%) | PSNR | SSIM |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in curve:
            lines.append(
                f"| {point['steps']} | {_minutes(point['distill_s'])} | {_number(point['fid'], 1)} | "
                f"{_number(point['lpips'], 3)} | {_number(point['ca'], 1)} | {_number(point['psnr'], 2)} | "
                f"{_number(point['ssim'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def replace_marked_block(text: str, block: str) -> str:
    """``text`` with everything between :data:`TABLE_START` and :data:`TABLE_END` replaced by
    ``block`` (the markers stay). ``ValueError`` unless each marker occurs once, in order."""
    starts, ends = text.count(TABLE_START), text.count(TABLE_END)
    if starts != 1 or ends != 1 or text.index(TABLE_START) > text.index(TABLE_END):
        raise ValueError(
            f"the README needs one '{TABLE_START}' line followed by one '{TABLE_END}' line where the "
            f"table goes (found {starts} and {ends})"
        )
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_START}\n{block.strip()}\n{TABLE_END}{tail}"


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(ROWS),
    )
    parser.add_argument("--row", action="append", default=[], metavar="ROW", help="a row to run (repeatable)")
    parser.add_argument("--all", action="store_true", help="run every row, in grid order")
    parser.add_argument("--quick", action="store_true", help=f"short settings (default row {QUICK_ROW})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--distill-steps-curve", metavar="N,N,...", help="FID after these generator updates")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another parameter over the row's, e.g. distill.train.steps=600 (repeatable)")
    parser.add_argument("--env", help="a conf/ environment's parameters beneath the row's (e.g. test)")
    parser.add_argument("--cost-rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--conf-source", type=Path, default=CONF_DIR,
                        help="the configuration folder holding base and the rows' bench_<row> environments")
    parser.add_argument("--table", action="store_true", help="only print the table of the results in --out")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rows = list(ROWS) if args.all else parse_rows(args.row)
        if args.quick and not rows:
            rows = [QUICK_ROW]
        curve = parse_curve(args.distill_steps_curve) if args.distill_steps_curve else ()
        extra = parse_assignments(args.set)
        if args.threads < 1 or args.cost_rounds < 1:
            raise ValueError("--threads and --cost-rounds must be >= 1")
        select_device(args.device, key="--device")
        check_env(args.env, args.conf_source)
    except ValueError as err:  # ConfigError is a ValueError too
        parser.error(str(err))
    if not args.table and not rows:
        parser.error("give --row ROW, --all or --quick (or --table to print existing results)")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    failed = []
    for row in [] if args.table else rows:
        try:
            run_row(
                row, quick=args.quick, threads=args.threads, device=args.device, out=args.out,
                conf_source=args.conf_source, env=args.env, curve=curve, extra_params=extra,
                cost_rounds=args.cost_rounds, command=command,
            )
        except Exception:  # one failed row must not cost the rows after it
            logger.error("row %s failed:\n%s", row, traceback.format_exc())
            failed.append(row)

    table = render_table(load_results(args.out))
    print(table)
    if args.update_readme:
        try:
            args.readme.write_text(replace_marked_block(args.readme.read_text(), table))
        except ValueError as err:
            print(f"{args.readme}: {err}", file=sys.stderr)
            return 2
        print(f"table written to {args.readme}")
    if failed:
        print(f"failed rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
