"""Console entry point for training outside Kedro: one node, many nodes, torchrun or srun.

    python -m ibmd_pipeline.commands.train --stage teacher --config params.yaml \\
        --data data/05_model_input/pairs_train.npz/<version>/pairs_train.npz \\
        --val-data data/05_model_input/pairs_val.npz/<version>/pairs_val.npz \\
        --output runs/teacher.pt [--register-catalog data/06_models/teacher.pt]

    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ibmd_pipeline.commands.train --stage distill --config params.yaml \\
        --data data/05_model_input/corrupted_train.npz/<version>/corrupted_train.npz \\
        --teacher data/06_models/teacher.pt/<version>/teacher.pt --output runs/student.pt

It runs the same training function as the Kedro node (``teacher.trainer.train_teacher`` /
``distill.trainer.distill_student``), which decides how its processes come to be
(``engine.launch``): under torchrun or srun each process joins the launcher's process group;
without a launcher, ``<stage>.distributed.nproc_per_node > 1`` spawns local workers exactly as
the node does. Only rank 0 writes: the checkpoint goes to ``--output`` atomically, in the format
of the catalog's ``teacher_model`` / ``student_model``; ``--register-catalog`` also writes it as
a new latest version of that catalog entry so that the next ``kedro run`` loads it.

The ``--config`` file (YAML or JSON) holds the parameters the node would get: the ``teacher``
or ``distill`` section (the same keys as ``params:teacher`` / ``params:distill``), ``task``,
``seed`` and optionally ``engine``. This module imports no Kedro: bundles and catalog versions
are read and written with ``engine.catalog_files``, the format of the catalog's datasets.

``--data``, ``--val-data``, ``--teacher``, ``--output`` and ``--register-catalog`` also take URLs
of an object store (``s3://bucket/ibmd/06_models/teacher.pt``, ``gs://...``); the store's client
finds its credentials and endpoint where it usually does (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` or ``~/.aws``; for GCS:
``GOOGLE_APPLICATION_CREDENTIALS``).

Preemption (docs/reliability.md): on SIGTERM, SIGINT or SIGUSR1 every rank stops at the same step
boundary, the working checkpoint is written to ``workdir`` and the command exits with status
:data:`~ibmd_pipeline.engine.preemption.PREEMPTED_EXIT_CODE` (75). The same command started again
(by hand, by ``torchrun --max-restarts``, or by a requeued SLURM job) resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ibmd_pipeline.data import check_seed
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.catalog_files import new_version_file, read_bundle, version_of
from ibmd_pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from ibmd_pipeline.engine.config import ConfigError, parse_config
from ibmd_pipeline.engine.devices import EngineConfig, configure_threads
from ibmd_pipeline.engine.distributed import barrier, cleanup_distributed, init_distributed
from ibmd_pipeline.engine.launch import is_main_process
from ibmd_pipeline.engine.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from ibmd_pipeline.engine.storage import is_local, local_path, write_atomically
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

__all__ = [
    "TrainResult",
    "load_bundle",
    "load_run_config",
    "main",
    "register_in_catalog",
    "run_stage",
]

logger = logging.getLogger(__name__)

_STAGE_KIND = {"teacher": "teacher", "distill": "student"}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`run_stage` produced on this process.

    checkpoint: the checkpoint dict (the same on every rank). is_main: whether this process is
    rank 0 of its job (the only one that writes files). device: ``engine.device`` as configured.
    """

    checkpoint: dict[str, Any]
    is_main: bool
    device: str = "auto"


def load_run_config(path: Path | str) -> dict[str, Any]:
    """The parameters in a YAML or JSON file (a mapping at the top level)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError("", f"config file '{path}' must hold a mapping, got {type(data).__name__}")
    return data


def load_bundle(path: Path | str) -> dict[str, Any]:
    """A ``.npz`` bundle written by the catalog (``TensorBundleDataset``), read without pickle.

    ``path`` is a local file or a URL (``s3://...``; credentials from the store's environment).
    """
    if is_local(path) and not local_path(path).is_file():
        raise FileNotFoundError(
            f"bundle '{path}' does not exist; pass the file inside a version folder, e.g. "
            "data/05_model_input/pairs_train.npz/<version>/pairs_train.npz"
        )
    return read_bundle(path)


def register_in_catalog(
    checkpoint: Mapping[str, Any], entry: Path | str, now: datetime.datetime | None = None
) -> Path | str:
    """Write ``checkpoint`` as the newest version of the versioned catalog file ``entry``.

    ``entry`` is the catalog ``filepath`` (e.g. ``data/06_models/teacher.pt``); the file lands in
    ``entry/<version>/<entry name>`` and is written atomically, so a load never sees half a
    file. Kedro loads the version folder that sorts last, so the call fails rather than write a
    version older than one already present (a clock behind the last writer's).
    """
    target = new_version_file(entry, now)
    payload = {k: v for k, v in checkpoint.items() if k != "catalog_version"}
    write_atomically(target, lambda handle: torch.save(payload, handle), overwrite=False)
    return target


def _section(params: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = params.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(name, f"the config file needs a '{name}' mapping (the keys of params:{name})")
    return section


def run_stage(
    stage: str,
    params: Mapping[str, Any],
    data: Path | str,
    *,
    val_data: Path | str | None = None,
    teacher: Path | str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``stage`` (``teacher`` or ``distill``) from plain parameters and bundle files.

    Calls the same library functions with the same parsing as the Kedro nodes
    (``train_teacher_node`` / ``distill_node``), inside the launcher's process group when there
    is one. The returned checkpoint has the format of ``teacher_model`` / ``student_model``.
    """
    if stage not in _STAGE_KIND:
        raise ConfigError("stage", f"got {stage!r}; allowed values: 'teacher', 'distill'")
    task_config = parse_config(TaskConfig, _section(params, "task"), "task")
    engine_config = parse_config(EngineConfig, params.get("engine") or {}, "engine")
    configure_threads(engine_config.num_threads)
    device = engine_config.device

    if stage == "teacher":
        config = parse_teacher_config(_section(params, "teacher"), seed=check_seed(params.get("seed", 0)))
        train_bundle = load_bundle(data)
        if val_data is None:
            logger.warning("no --val-data: the validation loss is taken on the first training pairs")
        val_bundle = train_bundle if val_data is None else load_bundle(val_data)
        checkpoint, _ = train_teacher(
            config, train_bundle, val_bundle, task=task_config, device=device, progress=progress
        )
        return TrainResult(checkpoint, is_main=is_main_process(), device=device)

    if teacher is None:
        raise ConfigError("teacher", "--stage distill needs --teacher <teacher.pt>")
    config = parse_distill_config(_section(params, "distill"), "distill")
    teacher_path = os.fspath(teacher)
    teacher_checkpoint = load_checkpoint(teacher_path)
    teacher_checkpoint["catalog_version"] = version_of(teacher_path)
    bundle = load_bundle(data)
    forbidden = sorted(key for key in ("clean", "labels") if key in bundle)
    if forbidden:
        raise ValueError(
            f"distillation takes corrupted images only, but '{data}' carries {forbidden}: pass "
            "the corrupted_train bundle, not a pairs_* bundle"
        )
    bundle_task = (bundle.get("task") or {}).get("kind")
    if bundle_task is not None and bundle_task != task_config.kind:
        raise ConfigError("task.kind", f"is '{task_config.kind}', but '{data}' was made for '{bundle_task}'")
    mask = bundle.get("mask")
    checkpoint = distill_student(
        bundle["corrupted"].float(),
        teacher_checkpoint,
        config,
        mask=None if mask is None else mask.float(),
        task_kind=task_config.kind,
        device=device,
        progress=progress,
    )
    return TrainResult(checkpoint, is_main=is_main_process(), device=device)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ibmd_pipeline.commands.train",
        description="Train the teacher or distil the student, in one process or under torchrun/srun.",
    )
    parser.add_argument("--stage", required=True, choices=sorted(_STAGE_KIND))
    parser.add_argument(
        "--config", required=True, type=Path, help="YAML/JSON with teacher or distill, task, seed, engine"
    )
    parser.add_argument(
        "--data", required=True, help="teacher: pairs_train .npz; distill: corrupted_train .npz"
    )
    parser.add_argument("--val-data", help="teacher: pairs_val .npz (default: the training pairs)")
    parser.add_argument("--teacher", help="distill: the teacher checkpoint (.pt)")
    parser.add_argument("--output", required=True, help="where rank 0 writes the checkpoint")
    parser.add_argument(
        "--register-catalog",
        metavar="ENTRY",
        help="also write it as the newest version of this catalog entry, e.g. data/06_models/teacher.pt",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 75 when preempted)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    params = load_run_config(args.config)
    try:
        result = run_stage(
            args.stage,
            params,
            args.data,
            val_data=args.val_data,
            teacher=args.teacher,
            progress=not args.no_progress,
        )
        if result.is_main:
            save_checkpoint(args.output, result.checkpoint)
            logger.info("wrote %s checkpoint %s", _STAGE_KIND[args.stage], args.output)
            if args.register_catalog is not None:
                registered = register_in_catalog(result.checkpoint, args.register_catalog)
                logger.info("registered as catalog version %s", registered)
        # Other ranks leave only once rank 0 has written (a job scheduler may stop the step then).
        if torch.distributed.is_initialized():
            barrier(init_distributed(device_preference=result.device))
    except TrainingPreempted as stopped:
        logger.warning("%s; exit status %d", stopped, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
