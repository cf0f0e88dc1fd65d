"""Data-parallel teacher training and distillation on the CPU (Gloo, 2 processes).

Each DDP run is compared with one process on the same global batch: per-rank batch B on 2
ranks against 2B in one process. The teacher trainer draws times and noise from a stream per
rank by design (same distribution, other values), so the teacher runs here replace its loss
with one whose draws are made for the global batch and split by rank, exactly as the
distillation trainer does on its own; what remains to compare is the data-parallel arithmetic
(sharding, gradient averaging, clipping, AdamW, EMA, loss averaging). Dropout is 0 in the
``tiny`` preset.

**Why the parity runs in float64.** In float32 the two runs cannot agree to a fixed weight
tolerance on every CPU. oneDNN's convolution backward-weights kernel sums its B*H*W terms in a
blocked order chosen per CPU (AVX-512 or AVX2 kernels) and per batch size, so the global batch
summed at once and the two half batches summed apart and all-reduced differ by float32 rounding:
about 1e-6 of each gradient tensor's largest element (``torch.backends.mkldnn`` off, about 1e-7).
AdamW then divides every element by its own running RMS, so an element whose gradient is within
rounding of zero (ADM zero-initialises every residual branch's output, so early gradients are
tiny in many weights) moves by up to the learning rate on noise alone. Measured on an Intel Xeon
(AVX-512): weights 2e-10 apart after step 1, 7e-7 after step 2, 8e-6 after step 3 in a one-process
simulation; the Gloo run crossed the old 1e-5 bound, which an AMD EPYC (AVX2) happened to keep.
In float64 (torch's default dtype set in every process; the trainers follow it) the same runs
end about 1e-14 apart.

**Tolerances, from the arithmetic** (``tests/numerics.py``). With unit roundoff ``u = 2**-53``,
a sum of ``N`` terms is off by at most ``N u`` of the sum of their magnitudes. The longest
reduction is a convolution's weight gradient over ``N = global batch * H * W`` terms, and clipping
(norm 1) bounds every gradient element by 1, so a gradient element differs by at most ``N u``
between the runs. AdamW's step ``lr * m / (sqrt(v) + eps)`` changes by at most ``lr / eps`` per
unit change of the gradient, so after ``k`` updates the weights differ by at most
``k lr N u / eps`` (about 7e-8 here, 1e-4 of a single update). The first gradient norm (equal
weights on both sides) differs by at most ``N u`` relatively; the losses by ``N u`` plus what the
weight difference can move them: ``sqrt(P) * |grad| * weight tolerance`` for ``P`` parameters.
The check is shown to fail on real DDP faults: a comm hook that sums instead of averaging
(clipping hides it from the weights; the gradient norm doubles) and one that drops rank 1's
gradient.

The workers sit at module level because spawned processes import them by reference. Spawns
are slow on shared cores, so there are three: one teacher DDP run, one distillation DDP run (each
also runs the two faulty variants in the same processes) and one ``torchrun`` run of the console
entry point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from numerics import adam_weight_atol, default_dtype, loss_atol, sum_rtol
from torch.nn.parallel import DistributedDataParallel

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.commands.train import load_bundle, register_in_catalog, run_stage
from ibmd_pipeline.degradations import TaskConfig, degrade
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import distill_student
from ibmd_pipeline.engine.catalog_files import version_name
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.engine.distributed import wrap_ddp
from ibmd_pipeline.engine.launch import launch_local
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher

SIZE = 16
TASK = {"kind": "sr4x_bicubic"}
PER_RANK_BATCH = 4
WORLD = 2
LR = 1e-3
GRAD_CLIP = 1.0  # TrainConfig's default: every gradient element is at most 1 after clipping
TEACHER_STEPS = 3
DISTILL_STEPS, AUX_STEPS = 2, 2
PARITY_DTYPE = torch.float64
#: terms of the longest reduction: a convolution weight gradient over the global batch's pixels
REDUCTION_TERMS = PER_RANK_BATCH * WORLD * SIZE * SIZE
SUM_RTOL = sum_rtol(REDUCTION_TERMS, PARITY_DTYPE)
FAULTS = ("sum_not_mean", "drop_rank1")


def weight_atol(updates: int) -> float:
    """The most two runs' weights can differ after ``updates`` AdamW steps (``tests/numerics.py``)."""
    return adam_weight_atol(updates, LR, REDUCTION_TERMS, PARITY_DTYPE, grad_bound=GRAD_CLIP)


def _bundle(n: int, seed: int) -> dict[str, Any]:
    """A degrade bundle of ``n`` random 16x16 gray images for the SR task."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 1, SIZE, SIZE, generator=generator) * 2 - 1
    task = TaskConfig(**TASK)
    degraded = degrade(clean, task, torch.Generator().manual_seed(seed + 1))
    return {"clean": clean, "corrupted": degraded.corrupted, "task": config_to_dict(task)}


def _teacher_params(batch_size: int, workdir: str | None, nproc: int = 1) -> dict[str, Any]:
    return {
        "model": {"network": {"preset": "tiny"}},
        "train": {
            "steps": TEACHER_STEPS, "batch_size": batch_size, "lr": LR, "log_every": 1,
            "warmup_steps": 0, "bf16": False, "checkpoint_every": 0, "grad_clip": GRAD_CLIP,
        },
        "sampler": {"grid_nfe": [1, 2], "n_examples": 2},
        "validation": {"every": 0, "batch_size": 4},
        "workdir": workdir,
        "distributed": {"nproc_per_node": nproc, "backend": "gloo"},
    }


def _distill_params(batch_size: int, workdir: str | None) -> dict[str, Any]:
    return {
        "aux_steps": AUX_STEPS, "lr_generator": LR, "lr_aux": LR, "workdir": workdir, "keep_workdir": True,
        "train": {
            "steps": DISTILL_STEPS, "batch_size": batch_size, "log_every": 1, "bf16": False,
            "checkpoint_every": 0, "grad_clip": GRAD_CLIP,
        },
        "validation": {
            "every": 0, "batch_size": 4, "draws": 4, "grid_examples": 2,
            "teacher_nfe": 2, "reference_nfes": [1],
        },
        "distributed": {"backend": "gloo"},
    }


class _SharedDrawLoss:
    """``bridge_matching_loss`` with times and noise drawn for the global batch, split by rank."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.calls = 0

    def __call__(self, predictor, x0, xT, schedule, mask=None, generator=None, **fixed):
        if fixed:  # the validation loss brings its own fixed times and noise
            return bridge_matching_loss(predictor, x0, xT, schedule, mask=mask, generator=generator, **fixed)
        rank = dist.get_rank() if dist.is_initialized() else 0
        draws = torch.Generator().manual_seed(10_000 + self.calls)
        self.calls += 1
        t = schedule.sample_time(self.global_batch, generator=draws)
        noise = torch.randn((self.global_batch, *x0.shape[1:]), generator=draws, dtype=x0.dtype)
        part = slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
        return bridge_matching_loss(predictor, x0, xT, schedule, mask=mask, t=t[part], noise=noise[part])


# ------------------------------------------------------------------ DDP faults, as comm hooks


def _sum_not_mean_hook(_state, bucket):  # unannotated: DDP checks real annotations, not strings
    """The ranks' gradients summed instead of averaged."""
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def _drop_rank1_hook(_state, bucket):
    """Rank 1's gradient lost: every rank gets rank 0's, divided by the world size."""
    buffer = bucket.buffer()
    if dist.get_rank() == 1:
        buffer.zero_()
    buffer.div_(dist.get_world_size())
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


_FAULT_HOOKS: dict[str, Callable[..., Any]] = {
    "sum_not_mean": _sum_not_mean_hook, "drop_rank1": _drop_rank1_hook,
}


def _faulty_wrap(hook: Callable[..., Any]) -> Callable[..., torch.nn.Module]:
    def wrap(module, ctx, **options):
        wrapped = wrap_ddp(module, ctx, **options)
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(None, hook)
        return wrapped

    return wrap


def _run_with_faults(module: Any, run: Callable[[bool], dict[str, Any]], out_dir: str) -> dict[str, Any]:
    """``run(True)`` as is, then ``run(False)`` once per fault with the trainer's DDP wrapper
    carrying that fault (``False``: without a working directory, so nothing is resumed)."""
    torch.set_default_dtype(PARITY_DTYPE)
    torch.set_num_threads(1)  # two ranks on two cores
    results = {"ok": run(True)}
    _dump_history(out_dir, results["ok"]["history"])
    original = module.wrap_ddp
    try:
        for fault in FAULTS:
            module.wrap_ddp = _faulty_wrap(_FAULT_HOOKS[fault])
            results[fault] = run(False)
    finally:
        module.wrap_ddp = original
    return results


def _dump_history(out_dir: str, history: list[dict[str, float]]) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(history))


def _teacher_rank_worker(config, train, val, out_dir: str) -> dict[str, Any]:
    import ibmd_pipeline.teacher.trainer as trainer

    def run(with_workdir: bool) -> dict[str, Any]:
        trainer.bridge_matching_loss = _SharedDrawLoss(config.train.batch_size * WORLD)
        run_config = config if with_workdir else dataclasses.replace(config, workdir=None)
        return train_teacher(run_config, train, val, task=TASK, device="cpu", progress=False)[0]

    return _run_with_faults(trainer, run, out_dir)


def _distill_rank_worker(corrupted, teacher, config, out_dir: str) -> dict[str, Any]:
    import ibmd_pipeline.distill.trainer as trainer

    def run(with_workdir: bool) -> dict[str, Any]:
        run_config = config if with_workdir else dataclasses.replace(config, workdir=None)
        return distill_student(
            corrupted, teacher, run_config, task_kind=TASK["kind"], device="cpu", progress=False
        )

    return _run_with_faults(trainer, run, out_dir)


def _in_parity_dtype(fn: Callable[[], Any]) -> Any:
    """``fn()`` in this process with the parity dtype and one thread, as the workers run."""
    with default_dtype(PARITY_DTYPE, threads=1):
        return fn()


# ------------------------------------------------------------------ the parity check


def _losses(history: list[dict[str, float]], key: str) -> list[float]:
    return [record[key] for record in history if key in record]


def _assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == PARITY_DTYPE, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _parameter_count(weights: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in weights.values() if v.is_floating_point())


def assert_parity(
    ddp: dict[str, Any], single: dict[str, Any], updates: dict[str, int], losses: tuple[str, ...]
) -> None:
    """The data-parallel checkpoint ``ddp`` equals ``single`` within the derived tolerances.

    updates: optimizer updates per trained model. losses: logged losses compared.
    """
    for name, count in updates.items():
        first_ddp, first_single = ddp["history"][0], single["history"][0]
        key = f"grad_norm/{name}"
        # Equal weights on both sides before the first update: the norms differ by rounding alone.
        assert math.isclose(first_ddp[key], first_single[key], rel_tol=SUM_RTOL, abs_tol=0), (
            key, first_ddp[key], first_single[key]
        )
        _assert_close_weights(ddp["models"][name], single["models"][name], weight_atol(count))
        if name in single["ema"]:
            _assert_close_weights(ddp["ema"][name], single["ema"][name], weight_atol(count))
    parameters = max(_parameter_count(single["models"][name]) for name in updates)
    worst_atol = max(weight_atol(count) for count in updates.values())
    for key in losses:
        for a_record, b_record in zip(ddp["history"], single["history"], strict=True):
            if key not in b_record:
                continue
            gradient = max(b_record.get(f"grad_norm/{name}", 0.0) for name in updates)
            bound = loss_atol(b_record[key], gradient, parameters, worst_atol, REDUCTION_TERMS, PARITY_DTYPE)
            assert abs(a_record[key] - b_record[key]) <= bound, (key, a_record[key], b_record[key], bound)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in shared)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, Any]]:
    return {"train": _bundle(16, 0), "val": _bundle(4, 100)}


@pytest.fixture(scope="module")
def teacher_runs(data, tmp_path_factory) -> dict[str, Any]:
    """The DDP teacher (2 ranks x B, and its two faulty variants) and the single-process teacher (2B)."""
    root = tmp_path_factory.mktemp("teacher")
    ddp_config = parse_teacher_config(_teacher_params(PER_RANK_BATCH, str(root / "ddp_work"), WORLD), seed=0)
    ddp = launch_local(
        _teacher_rank_worker,
        WORLD,
        (ddp_config, data["train"], data["val"], str(root)),
        ddp_config.distributed,
    )
    histories = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]

    import ibmd_pipeline.teacher.trainer as trainer

    single_params = _teacher_params(PER_RANK_BATCH * WORLD, str(root / "single_work"))
    single_config = parse_teacher_config(single_params, seed=0)
    original = trainer.bridge_matching_loss
    trainer.bridge_matching_loss = _SharedDrawLoss(PER_RANK_BATCH * WORLD)
    try:
        single, single_history = _in_parity_dtype(
            lambda: train_teacher(
                single_config, data["train"], data["val"], task=TASK, device="cpu", progress=False
            )
        )
    finally:
        trainer.bridge_matching_loss = original
    return {
        "ddp": ddp["ok"], "faulty": {f: ddp[f] for f in FAULTS}, "histories": histories,
        "single": single, "single_history": single_history, "root": root,
    }


def test_parity_tolerances_sit_between_rounding_and_a_single_update() -> None:
    assert SUM_RTOL < 1e-12
    assert weight_atol(TEACHER_STEPS) < 1e-3 * LR  # a real fault moves weights by ~lr per update


def test_ddp_teacher_matches_one_process_on_the_global_batch(teacher_runs) -> None:
    ddp, single = teacher_runs["ddp"], teacher_runs["single"]
    assert ddp["step"] == single["step"] == TEACHER_STEPS
    assert_parity(ddp, single, {"model": TEACHER_STEPS}, ("loss",))
    # The steps moved the weights by far more than the tolerance (the EMA lags them): the
    # comparison is not vacuous.
    atol = weight_atol(TEACHER_STEPS)
    assert _max_difference(single["models"]["model"], single["ema"]["model"]) > 1e4 * atol
    assert ddp["kind"] == single["kind"] == "teacher"
    assert ddp["config"] == single["config"] | {"teacher": ddp["config"]["teacher"]}
    assert not any(k.startswith("module.") for k in ddp["models"]["model"])


@pytest.mark.parametrize("fault", FAULTS)
def test_the_teacher_parity_check_fails_on_a_ddp_fault(teacher_runs, fault) -> None:
    """A sum instead of a mean, or a lost rank, is caught by the same check."""
    with pytest.raises(AssertionError):
        assert_parity(
            teacher_runs["faulty"][fault], teacher_runs["single"], {"model": TEACHER_STEPS}, ("loss",)
        )


def test_ddp_teacher_losses_are_rank_means_and_agree_on_every_rank(teacher_runs) -> None:
    rank0, rank1 = (_losses(h, "loss") for h in teacher_runs["histories"])
    assert len(rank0) == TEACHER_STEPS and rank0 == rank1  # all-reduced: bit-identical on every rank
    # The mean of the two half-batch losses is the loss of the whole global batch (checked
    # within the derived bound by the parity test; here: the first, before any update).
    first_ddp, first_single = rank0[0], _losses(teacher_runs["single_history"], "loss")[0]
    assert math.isclose(first_ddp, first_single, rel_tol=SUM_RTOL, abs_tol=0)


def test_ddp_teacher_writes_one_working_checkpoint_with_every_ranks_random_states(teacher_runs) -> None:
    """Rank 0 alone writes ``workdir/<run folder>/last.pt``; it holds the weights every rank
    ended with and each rank's own random streams (entry r for rank r), so every rank resumes
    from that one file."""
    files = _files(teacher_runs["root"] / "ddp_work")
    (work,) = (teacher_runs["root"] / "ddp_work").glob("run-*")
    assert files == [f"{work.name}/last.pt"], files
    main = load_checkpoint(work / "last.pt")
    assert main["step"] == TEACHER_STEPS and main["world_size"] == WORLD and len(main["rng"]) == WORLD
    assert not torch.equal(main["rng"][0]["generator"], main["rng"][1]["generator"])  # per-rank streams
    for key, value in teacher_runs["ddp"]["models"]["model"].items():
        assert torch.equal(main["models"]["model"][key], value), key


@pytest.fixture(scope="module")
def distill_runs(teacher_runs, data, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distill")
    teacher = teacher_runs["single"]
    corrupted = data["train"]["corrupted"]
    ddp_config = parse_distill_config(_distill_params(PER_RANK_BATCH, str(root / "ddp_work")))
    ddp = launch_local(
        _distill_rank_worker, WORLD, (corrupted, teacher, ddp_config, str(root)), ddp_config.distributed
    )
    histories = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single_config = parse_distill_config(_distill_params(PER_RANK_BATCH * WORLD, str(root / "single_work")))
    single = _in_parity_dtype(
        lambda: distill_student(
            corrupted, teacher, single_config, task_kind=TASK["kind"], device="cpu", progress=False
        )
    )
    return {
        "ddp": ddp["ok"], "faulty": {f: ddp[f] for f in FAULTS}, "histories": histories,
        "single": single, "teacher": teacher, "root": root,
    }


DISTILL_UPDATES = {"generator": DISTILL_STEPS, "aux": DISTILL_STEPS * AUX_STEPS}
DISTILL_LOSSES = ("loss/generator", "loss/aux", "term/teacher", "term/fake")


def test_ddp_distillation_matches_one_process_and_syncs_losses(distill_runs) -> None:
    ddp, single = distill_runs["ddp"], distill_runs["single"]
    assert ddp["kind"] == "student" and ddp["step"] == single["step"] == DISTILL_STEPS
    assert_parity(ddp, single, DISTILL_UPDATES, DISTILL_LOSSES)
    atol = weight_atol(DISTILL_UPDATES["aux"])
    moved = _max_difference(single["models"]["generator"], distill_runs["teacher"]["ema"]["model"])
    assert moved > 1e4 * atol
    for key in DISTILL_LOSSES:
        rank0, rank1 = (_losses(h, key) for h in distill_runs["histories"])
        assert len(rank0) == DISTILL_STEPS and rank0 == rank1, key
    written = _files(distill_runs["root"] / "ddp_work")
    assert len(written) == 1 and written[0].endswith("/last.pt"), written
    assert load_checkpoint(distill_runs["root"] / "ddp_work" / written[0])["world_size"] == WORLD


@pytest.mark.parametrize("fault", FAULTS)
def test_the_distillation_parity_check_fails_on_a_ddp_fault(distill_runs, fault) -> None:
    with pytest.raises(AssertionError):
        assert_parity(distill_runs["faulty"][fault], distill_runs["single"], DISTILL_UPDATES, DISTILL_LOSSES)


# ---------------------------------------------------------------- the console entry point


def test_catalog_version_names_sort_like_kedro_and_register_refuses_older(tmp_path) -> None:
    import datetime

    from kedro.io.core import VERSION_FORMAT

    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=datetime.UTC)
    kedro_style = moment.strftime(VERSION_FORMAT)
    assert version_name(moment) == kedro_style[:-4] + kedro_style[-1:] == "2026-01-02T03.04.05.678Z"
    entry = tmp_path / "teacher.pt"
    path = register_in_catalog({"kind": "teacher", "catalog_version": "x"}, entry, now=moment)
    assert path == entry / "2026-01-02T03.04.05.678Z" / "teacher.pt"
    assert load_checkpoint(path) == {"kind": "teacher"}
    with pytest.raises(FileExistsError, match="not older"):
        register_in_catalog({"kind": "teacher"}, entry, now=moment - datetime.timedelta(seconds=1))


def test_run_stage_rejects_pairs_for_distillation_and_a_missing_teacher(tmp_path, data) -> None:
    from ibmd_pipeline.engine.config import ConfigError
    from ibmd_pipeline.io.datasets import TensorBundleDataset

    pairs = tmp_path / "pairs.npz"
    TensorBundleDataset(filepath=str(pairs)).save(data["val"])
    params = {"task": TASK, "distill": _distill_params(2, None)}
    with pytest.raises(ConfigError, match="teacher"):
        run_stage("distill", params, pairs)
    teacher = tmp_path / "teacher.pt"
    torch.save({"kind": "teacher"}, teacher)
    with pytest.raises(ValueError, match="corrupted images only"):
        run_stage("distill", params, pairs, teacher=teacher)


def test_torchrun_entry_point_writes_one_checkpoint_and_registers_it(tmp_path, data) -> None:
    from kedro.io.core import Version

    from ibmd_pipeline.io.datasets import TensorBundleDataset, TorchCheckpointDataset

    train, val = tmp_path / "pairs_train.npz", tmp_path / "pairs_val.npz"
    TensorBundleDataset(filepath=str(train)).save(data["train"])
    TensorBundleDataset(filepath=str(val)).save(data["val"])
    assert torch.equal(load_bundle(train)["corrupted"], data["train"]["corrupted"])
    config = tmp_path / "params.json"
    params = {"teacher": _teacher_params(PER_RANK_BATCH, None, nproc=8), "task": TASK, "seed": 0,
              "engine": {"device": "cpu", "num_threads": 1}}
    config.write_text(json.dumps(params))
    output, entry = tmp_path / "out" / "teacher.pt", tmp_path / "06_models" / "teacher.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
        "-m", "ibmd_pipeline.commands.train",
        "--stage", "teacher", "--config", str(config), "--data", str(train), "--val-data", str(val),
        "--output", str(output), "--register-catalog", str(entry), "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "nproc_per_node=8 is ignored" in done.stderr  # the launcher's 2 processes, no more

    checkpoint = load_checkpoint(output)
    assert _files(output.parent) == ["teacher.pt"]
    assert checkpoint["kind"] == "teacher" and checkpoint["step"] == 3
    versions = sorted(p.name for p in entry.iterdir())
    assert len(versions) == 1
    loaded = TorchCheckpointDataset(filepath=str(entry), version=Version(None, None)).load()
    assert loaded["catalog_version"] == versions[0]
    for key, value in checkpoint["models"]["model"].items():
        assert torch.equal(loaded["models"]["model"][key], value), key

