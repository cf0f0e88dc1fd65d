"""Keeping the global batch on another number of processes: teacher training and IBMD distillation.

Every run here fixes ``train.global_batch_size: 8`` (16x16 gray images, float64, Gloo on the CPU):

- *full*: 1 process, ``batch_size`` 8, one micro-batch per update;
- *accumulated*: 1 process, ``batch_size`` 4, two micro-batches per update;
- *ddp*: 2 processes, ``batch_size`` 4, one micro-batch each;
- *ddp accumulated*: 2 processes, ``batch_size`` 2, two micro-batches each (the first in DDP's
  ``no_sync``: a comm hook counts one gradient all-reduce per bucket and update, as without
  accumulation);
- *resumed*: the 2-process run killed after its step-2 working checkpoint and finished by 1 process
  accumulating 2 micro-batches.

All of them train on the same images and the same noise (drawn for the global batch), so they may
differ only by the order of float sums. The bounds are those of ``test_ddp_training.py``
(``assert_parity``, derived in ``tests/numerics.py`` from float64 rounding for a global batch of 8
images of 16x16 pixels), not tuned. The same check fails on accumulation bugs (losses summed, not
averaged; gradients cleared between micro-batches). A run without ``global_batch_size`` written by 2
processes is refused by 1 with the documented error, and a process count that cannot keep the
global batch stops before any work; in both cases the saved files are untouched.

One spawn (two Gloo workers) runs every multi-process run in sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from numerics import default_dtype
from test_ddp_training import (
    PARITY_DTYPE,
    TASK,
    _bundle,
    _distill_params,
    _max_difference,
    _teacher_params,
    assert_parity,
    weight_atol,
)
from test_grad_accumulation import ACCUMULATION_FAULTS
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import ibmd_pipeline.distill.trainer as distill_trainer
import ibmd_pipeline.teacher.trainer as teacher_trainer
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine import training
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.distributed import DistContext
from ibmd_pipeline.engine.launch import launch_local
from ibmd_pipeline.engine.resume import ResumeMismatchError
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

GLOBAL, MICRO, WORLD = 8, 4, 2
TEACHER_STEPS, DISTILL_STEPS, AUX_STEPS = 4, 3, 2
CHECKPOINT_EVERY = 2  # the killed runs die in the step after this one
TEACHER_UPDATES = {"model": TEACHER_STEPS}
DISTILL_UPDATES = {"generator": DISTILL_STEPS, "aux": DISTILL_STEPS * AUX_STEPS}
DISTILL_LOSSES = ("loss/generator", "loss/aux", "term/teacher", "term/fake")


def teacher_config(
    batch_size: int, workdir: Path | None, *, global_batch: int | None = GLOBAL, steps: int = TEACHER_STEPS
):
    params = _teacher_params(batch_size, None if workdir is None else str(workdir))
    params["train"].update(steps=steps, global_batch_size=global_batch, checkpoint_every=CHECKPOINT_EVERY)
    return parse_teacher_config(params, seed=0)


def distill_config(batch_size: int, workdir: Path | None):
    params = _distill_params(batch_size, None if workdir is None else str(workdir))
    assert params["aux_steps"] == AUX_STEPS
    params["train"].update(steps=DISTILL_STEPS, global_batch_size=GLOBAL, checkpoint_every=CHECKPOINT_EVERY)
    return parse_distill_config(params)


def _killed(module: Any, updates: int, run: Callable[[], Any]) -> None:
    """``run()`` with ``module.accumulated_update`` raising after ``updates`` calls, like a kill."""
    original, calls = module.accumulated_update, []

    def dying(*args, **kwargs):
        calls.append(None)
        if len(calls) > updates:
            raise RuntimeError("simulated kill")
        return original(*args, **kwargs)

    module.accumulated_update = dying
    try:
        run()
    except RuntimeError as error:
        assert "simulated kill" in str(error)
    else:
        raise AssertionError("the run was not killed")
    finally:
        module.accumulated_update = original


def _counting_all_reduces(module: Any, run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()`` with every DDP wrapper ``module`` builds counting its bucket all-reduces."""
    original, calls = module.wrap_ddp, []

    def counted(state, bucket):  # unannotated: DDP checks real annotations, not strings
        calls.append(None)
        return allreduce_hook(state, bucket)

    def wrap(network, ctx, **options):
        wrapped = original(network, ctx, **options)
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(None, counted)
        return wrapped

    module.wrap_ddp = wrap
    try:
        return run(), len(calls)
    finally:
        module.wrap_ddp = original


def _elastic_worker(configs: dict[str, Any], data: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Every 2-process run, in order (module level: spawned workers import it)."""
    torch.set_default_dtype(PARITY_DTYPE)
    torch.set_num_threads(1)  # two ranks on two cores

    def train(config):
        return train_teacher(config, data["train"], data["val"], task=TASK, device="cpu", progress=False)[0]

    def distill(config):
        corrupted = data["train"]["corrupted"]
        return distill_student(
            corrupted, teacher, config, task_kind=TASK["kind"], device="cpu", progress=False
        )

    results: dict[str, Any] = {}
    for stage, module, run in (("teacher", teacher_trainer, train), ("distill", distill_trainer, distill)):
        for name in (stage, f"{stage}_accumulated"):
            results[name], results[f"{name}_all_reduces"] = _counting_all_reduces(
                module, lambda run=run, name=name: run(configs[name])
            )
    _killed(teacher_trainer, CHECKPOINT_EVERY, lambda: train(configs["teacher_killed"]))
    _killed(distill_trainer, CHECKPOINT_EVERY * (AUX_STEPS + 1), lambda: distill(configs["distill_killed"]))
    train(configs["teacher_default"])
    return results


def _in_float64(fn: Callable[[], Any]) -> Any:
    with default_dtype(PARITY_DTYPE, threads=1):
        return fn()


def _teacher(config) -> dict[str, Any]:
    return _in_float64(
        lambda: train_teacher(config, DATA["train"], DATA["val"], task=TASK, device="cpu", progress=False)[0],
    )


def _distill(config, teacher) -> dict[str, Any]:
    corrupted = DATA["train"]["corrupted"]
    return _in_float64(
        lambda: distill_student(
            corrupted, teacher, config, task_kind=TASK["kind"], device="cpu", progress=False
        )
    )


DATA = {"train": _bundle(16, 0), "val": _bundle(4, 100)}


def _with_fault(monkeypatch, fault: str, run: Callable[[], Any]) -> Any:
    with monkeypatch.context() as patch:
        broken = ACCUMULATION_FAULTS[fault](training.accumulate_gradients)
        patch.setattr(training, "accumulate_gradients", broken)
        return run()


@pytest.fixture(scope="module")
def single_runs() -> dict[str, Any]:
    """The one-process runs: full batch, accumulated, and accumulated with each fault."""
    teacher_full = _teacher(teacher_config(GLOBAL, None))
    runs: dict[str, Any] = {
        "teacher_full": teacher_full,
        "teacher_accumulated": _teacher(teacher_config(MICRO, None)),
        "distill_full": _distill(distill_config(GLOBAL, None), teacher_full),
        "distill_accumulated": _distill(distill_config(MICRO, None), teacher_full),
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        for fault in ACCUMULATION_FAULTS:
            runs[f"teacher_{fault}"] = _with_fault(
                monkeypatch, fault, lambda: _teacher(teacher_config(MICRO, None))
            )
            runs[f"distill_{fault}"] = _with_fault(
                monkeypatch, fault, lambda: _distill(distill_config(MICRO, None), teacher_full)
            )
    return runs


@pytest.fixture(scope="module")
def ddp_runs(single_runs, tmp_path_factory) -> dict[str, Any]:
    """The 2-process runs, and the killed ones finished by one process accumulating 2 micro-batches."""
    root = tmp_path_factory.mktemp("elastic")
    configs = {
        "teacher": teacher_config(MICRO, root / "teacher"),
        "teacher_accumulated": teacher_config(MICRO // 2, None),
        "distill_accumulated": distill_config(MICRO // 2, None),
        "teacher_killed": teacher_config(MICRO, root / "teacher_killed"),
        "teacher_default": teacher_config(MICRO, root / "teacher_default", global_batch=None, steps=2),
        "distill": distill_config(MICRO, root / "distill"),
        "distill_killed": distill_config(MICRO, root / "distill_killed"),
    }
    configs = {name: _on(config, WORLD) for name, config in configs.items()}
    teacher = single_runs["teacher_full"]
    ddp = launch_local(_elastic_worker, WORLD, (configs, DATA, teacher), configs["teacher"].distributed)
    killed = {
        "teacher": load_checkpoint(_working_file(root / "teacher_killed")),
        "distill": load_checkpoint(_working_file(root / "distill_killed")),
    }
    resumed = {
        "teacher": _teacher(_on(configs["teacher_killed"], 1)),
        "distill": _distill(_on(configs["distill_killed"], 1), teacher),
    }
    return {"ddp": ddp, "killed": killed, "resumed": resumed, "root": root, "configs": configs}


def _on(config, nproc: int):
    """``config`` with ``nproc_per_node`` processes (gloo)."""
    distributed = dataclasses.replace(
        config.distributed, nproc_per_node=nproc, backend="gloo", timeout_s=120
    )
    return dataclasses.replace(config, distributed=distributed)


def _working_file(workdir: Path) -> Path:
    (folder,) = workdir.glob("run-*")
    return folder / "last.pt"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- one process accumulating


def test_one_process_accumulating_two_micro_batches_trains_the_teacher_of_the_full_batch(single_runs) -> None:
    full, accumulated = single_runs["teacher_full"], single_runs["teacher_accumulated"]
    assert_parity(accumulated, full, TEACHER_UPDATES, ("loss",))
    # Not vacuous: the steps moved the weights far more than the tolerance.
    assert _max_difference(full["models"]["model"], full["ema"]["model"]) > 1e4 * weight_atol(TEACHER_STEPS)
    assert accumulated["config"]["teacher"]["train"]["global_batch_size"] == GLOBAL


def test_one_process_accumulating_two_micro_batches_distils_the_student_of_the_full_batch(single_runs):
    full = single_runs["distill_full"]
    assert_parity(single_runs["distill_accumulated"], full, DISTILL_UPDATES, DISTILL_LOSSES)
    moved = _max_difference(full["models"]["generator"], single_runs["teacher_full"]["ema"]["model"])
    assert moved > 1e4 * weight_atol(DISTILL_UPDATES["aux"])


@pytest.mark.parametrize("fault", sorted(ACCUMULATION_FAULTS))
@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_the_accumulation_check_fails_on_a_wrongly_scaled_accumulation(single_runs, stage, fault) -> None:
    teacher = stage == "teacher"
    updates, losses = (TEACHER_UPDATES, ("loss",)) if teacher else (DISTILL_UPDATES, DISTILL_LOSSES)
    with pytest.raises(AssertionError):
        assert_parity(single_runs[f"{stage}_{fault}"], single_runs[f"{stage}_full"], updates, losses)


def test_on_the_same_process_count_an_accumulating_run_resumes_bit_for_bit(single_runs, tmp_path, caplog):
    """Killed after its step-2 working checkpoint and restarted on 1 process again: the same
    weights and history as the uninterrupted accumulating run, to the bit."""
    teacher, student = teacher_config(MICRO, tmp_path / "t"), distill_config(MICRO, tmp_path / "d")
    teacher_start = single_runs["teacher_full"]
    _killed(teacher_trainer, CHECKPOINT_EVERY, lambda: _teacher(teacher))
    _killed(distill_trainer, CHECKPOINT_EVERY * (AUX_STEPS + 1), lambda: _distill(student, teacher_start))
    with caplog.at_level(logging.INFO, logger="ibmd_pipeline.engine.loop"):
        resumed = {"teacher": _teacher(teacher), "distill": _distill(student, teacher_start)}
    messages = [record.getMessage() for record in caplog.records]
    resumed_at = [message.split("' at ")[-1] for message in messages if "resumed from" in message]
    assert resumed_at == [f"step {CHECKPOINT_EVERY} of {n}" for n in (TEACHER_STEPS, DISTILL_STEPS)]
    for stage, result in resumed.items():
        straight = single_runs[f"{stage}_accumulated"]
        for group in ("models", "ema"):
            for name, weights in straight[group].items():
                assert all(torch.equal(result[group][name][k], v) for k, v in weights.items()), (stage, name)
        strip = [{k: v for k, v in r.items() if k != "sec_per_step"} for r in result["history"]]
        assert strip == [{k: v for k, v in r.items() if k != "sec_per_step"} for r in straight["history"]]


def test_a_process_count_that_cannot_keep_the_global_batch_stops_before_any_work(tmp_path) -> None:
    """8 images in micro-batches of 4 cannot split over 3 processes: every rank stops at once, with
    the error naming the key and the process counts that work, and the workdir is untouched."""
    workdir = tmp_path / "work"
    (workdir / "run-0123456789ab").mkdir(parents=True)
    (workdir / "run-0123456789ab" / "last.pt").write_bytes(b"a checkpoint")
    before = _tree(workdir)
    config = teacher_config(MICRO, workdir)
    for rank in range(3):
        ctx = DistContext(rank, rank, 3, torch.device("cpu"), rank == 0)
        with pytest.raises(ConfigError) as error:
            teacher_trainer._train_teacher_rank(ctx, config, DATA["train"], DATA["val"], TASK, False)
        assert error.value.key == "teacher.train.global_batch_size"
        assert "process count that divides 2 (1, 2)" in str(error.value)
    assert _tree(workdir) == before
    # Asked for 3 local workers, the trainers refuse before spawning any.
    with pytest.raises(ConfigError, match="teacher.train.global_batch_size"):
        train_teacher(_on(config, 3), DATA["train"], DATA["val"], task=TASK, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="distill.train.global_batch_size"):
        distill_student(DATA["train"]["corrupted"], {}, _on(distill_config(MICRO, workdir), 3), device="cpu")
    assert _tree(workdir) == before


# --------------------------------------------------------------------------- two processes, and back to one


@pytest.mark.slow
def test_two_processes_train_the_teacher_of_one_accumulating_process(single_runs, ddp_runs) -> None:
    ddp = ddp_runs["ddp"]["teacher"]
    assert_parity(ddp, single_runs["teacher_full"], TEACHER_UPDATES, ("loss",))
    assert_parity(ddp, single_runs["teacher_accumulated"], TEACHER_UPDATES, ("loss",))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_two_processes_accumulating_two_micro_batches_each_train_the_same_step(single_runs, ddp_runs, stage):
    """2 processes x 2 micro-batches of 2 = the global batch of 8 again; DDP all-reduces once per
    update (the first micro-batch runs in ``no_sync``), as many times as the run without accumulation."""
    ddp, teacher = ddp_runs["ddp"], stage == "teacher"
    updates, losses = (TEACHER_UPDATES, ("loss",)) if teacher else (DISTILL_UPDATES, DISTILL_LOSSES)
    assert_parity(ddp[f"{stage}_accumulated"], single_runs[f"{stage}_full"], updates, losses)
    assert ddp[f"{stage}_all_reduces"] > 0
    assert ddp[f"{stage}_accumulated_all_reduces"] == ddp[f"{stage}_all_reduces"]


@pytest.mark.slow
def test_two_processes_distil_the_student_of_one_accumulating_process(single_runs, ddp_runs) -> None:
    ddp = ddp_runs["ddp"]["distill"]
    assert_parity(ddp, single_runs["distill_full"], DISTILL_UPDATES, DISTILL_LOSSES)
    assert_parity(ddp, single_runs["distill_accumulated"], DISTILL_UPDATES, DISTILL_LOSSES)


def _assert_resumed_from_the_killed_run(resumed, killed, workdir: Path, updates, losses, ddp) -> None:
    assert killed["world_size"] == WORLD and killed["step"] == CHECKPOINT_EVERY
    # The steps before the kill come from the 2-process checkpoint, as they were logged there ...
    for before, after in zip(killed["history"], resumed["history"][:CHECKPOINT_EVERY], strict=True):
        assert before == after
    # ... and the run ends where the uninterrupted 2-process run ends, up to rounding.
    assert_parity(resumed, ddp, updates, losses)
    finished = load_checkpoint(_working_file(workdir))
    assert finished["world_size"] == 1 and finished["step"] == resumed["step"]


@pytest.mark.slow
def test_a_teacher_killed_on_two_processes_resumes_on_one_accumulating_two_micro_batches(ddp_runs) -> None:
    _assert_resumed_from_the_killed_run(
        ddp_runs["resumed"]["teacher"], ddp_runs["killed"]["teacher"], ddp_runs["root"] / "teacher_killed",
        TEACHER_UPDATES, ("loss",), ddp_runs["ddp"]["teacher"],
    )


@pytest.mark.slow
def test_a_distillation_killed_on_two_processes_resumes_on_one_accumulating_two(ddp_runs) -> None:
    _assert_resumed_from_the_killed_run(
        ddp_runs["resumed"]["distill"], ddp_runs["killed"]["distill"], ddp_runs["root"] / "distill_killed",
        DISTILL_UPDATES, DISTILL_LOSSES, ddp_runs["ddp"]["distill"],
    )


@pytest.mark.slow
def test_without_global_batch_size_another_process_count_is_refused_and_nothing_lost(ddp_runs) -> None:
    workdir = ddp_runs["root"] / "teacher_default"
    before = _tree(workdir)
    config = _on(ddp_runs["configs"]["teacher_default"], 1)
    with pytest.raises(ResumeMismatchError) as error:
        _teacher(config)
    message = str(error.value)
    assert "written by a run of 2 process(es), this run has 1" in message
    assert "global batch of 8 images (train.batch_size 4 x 2)" in message
    assert "distributed.nproc_per_node: 2" in message and "train.global_batch_size set (e.g. 8)" in message
    assert _tree(workdir) == before
