"""Data-parallel teacher training and distillation on the CPU (Gloo, 2 processes).

Each DDP run is compared with one process on the same global batch: per-rank batch B on 2
ranks against 2B in one process. The teacher trainer draws times and noise from a stream per
rank by design (same distribution, other values), so the teacher runs here replace its loss
with one whose draws are made for the global batch and split by rank, exactly as the
distillation trainer does on its own; what remains to compare is the data-parallel arithmetic
(sharding, gradient averaging, clipping, AdamW, EMA, loss averaging). Tolerance: 1e-5 absolute
on weights and 1e-6 relative on losses after a few steps, for the float32 sum orders of a
Gloo all-reduce against one backward pass. Dropout is 0 in the ``tiny`` preset.

The workers sit at module level because spawned processes import them by reference. Spawns
are slow on shared cores, so there are three: one teacher DDP run, one distillation DDP run and
one ``torchrun`` run of the console entry point.
"""

from __future__ import annotations

import json
import os
import sys
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.degradations import TaskConfig, degrade
from ibmd_pipeline.distill.config import parse_distill_config
from ibmd_pipeline.distill.trainer import _distill_worker, distill_student
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.config import config_to_dict
from ibmd_pipeline.engine.distributed import launch_local
from ibmd_pipeline.engine.train import catalog_version_name, load_bundle, register_in_catalog, run_stage
from ibmd_pipeline.teacher import parse_teacher_config, train_teacher_worker

SIZE = 16
TASK = {"kind": "sr4x_bicubic"}
PER_RANK_BATCH = 4
WORLD = 2
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-6


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
            "steps": 3, "batch_size": batch_size, "lr": 1e-3, "log_every": 1,
            "warmup_steps": 0, "bf16": False, "checkpoint_every": 0,
        },
        "sampler": {"grid_nfe": [1, 2], "n_examples": 2},
        "validation": {"every": 0, "batch_size": 4},
        "workdir": workdir,
        "distributed": {"nproc_per_node": nproc, "backend": "gloo"},
    }


def _distill_params(batch_size: int, workdir: str | None) -> dict[str, Any]:
    return {
        "aux_steps": 2, "lr_generator": 1e-3, "lr_aux": 1e-3, "workdir": workdir, "keep_workdir": True,
        "train": {"steps": 2, "batch_size": batch_size, "log_every": 1, "bf16": False, "checkpoint_every": 0},
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
        noise = torch.randn((self.global_batch, *x0.shape[1:]), generator=draws)
        part = slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
        return bridge_matching_loss(predictor, x0, xT, schedule, mask=mask, t=t[part], noise=noise[part])


def _dump_history(out_dir: str, history: list[dict[str, float]]) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(history))


def _teacher_rank_worker(config, train, val, out_dir: str) -> dict[str, Any]:
    import ibmd_pipeline.teacher.trainer as trainer

    trainer.bridge_matching_loss = _SharedDrawLoss(config.train.batch_size * WORLD)
    # One intra-op thread on every side: with more, reduction order (and so the last bits of
    # tiny gradients, which AdamW's normalisation amplifies) depends on the thread count.
    torch.set_num_threads(1)
    checkpoint, history = train_teacher_worker(config, train, val, TASK, "cpu", False)
    _dump_history(out_dir, history)
    return checkpoint


def _distill_rank_worker(corrupted, teacher, config, out_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)  # as the teacher worker: reduction order independent of thread count
    checkpoint = _distill_worker(corrupted, teacher, config, None, TASK["kind"], "cpu", False)
    _dump_history(out_dir, checkpoint["history"])
    return checkpoint


def _losses(history: list[dict[str, float]], key: str) -> list[float]:
    return [record[key] for record in history if key in record]


def _assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=key)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in shared)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, Any]]:
    return {"train": _bundle(16, 0), "val": _bundle(4, 100)}


@pytest.fixture(scope="module")
def teacher_runs(data, tmp_path_factory) -> dict[str, Any]:
    """The DDP teacher (2 ranks x B) and the single-process teacher (2B), with their artefacts."""
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
    original, threads = trainer.bridge_matching_loss, torch.get_num_threads()
    trainer.bridge_matching_loss = _SharedDrawLoss(PER_RANK_BATCH * WORLD)
    torch.set_num_threads(1)
    try:
        single, single_history = train_teacher_worker(
            single_config, data["train"], data["val"], TASK, "cpu", False
        )
    finally:
        trainer.bridge_matching_loss = original
        torch.set_num_threads(threads)
    return {
        "ddp": ddp, "histories": histories, "single": single, "single_history": single_history, "root": root,
    }


def test_ddp_teacher_matches_one_process_on_the_global_batch(teacher_runs) -> None:
    ddp, single = teacher_runs["ddp"], teacher_runs["single"]
    assert ddp["step"] == single["step"] == 3
    _assert_close_weights(ddp["models"]["model"], single["models"]["model"])
    _assert_close_weights(ddp["ema"]["model"], single["ema"]["model"])
    # The steps moved the weights by far more than the tolerance (the EMA lags them): the
    # comparison is not vacuous.
    assert _max_difference(single["models"]["model"], single["ema"]["model"]) > 100 * WEIGHT_ATOL
    assert ddp["kind"] == single["kind"] == "teacher"
    assert ddp["config"] == single["config"] | {"teacher": ddp["config"]["teacher"]}
    assert not any(k.startswith("module.") for k in ddp["models"]["model"])


def test_ddp_teacher_losses_are_rank_means_and_agree_on_every_rank(teacher_runs) -> None:
    rank0, rank1 = (_losses(h, "loss") for h in teacher_runs["histories"])
    assert len(rank0) == 3 and rank0 == rank1  # all-reduced: bit-identical on every rank
    # The mean of the two half-batch losses is the loss of the whole global batch.
    torch.testing.assert_close(
        torch.tensor(rank0),
        torch.tensor(_losses(teacher_runs["single_history"], "loss")),
        rtol=LOSS_RTOL,
        atol=0,
    )


def test_ddp_teacher_writes_one_working_checkpoint_with_every_ranks_random_states(teacher_runs) -> None:
    """Rank 0 alone writes ``workdir/<run folder>/last.pt``; it holds the weights every rank
    ended with and each rank's own random streams (entry r for rank r), so every rank resumes
    from that one file."""
    files = _files(teacher_runs["root"] / "ddp_work")
    (work,) = (teacher_runs["root"] / "ddp_work").glob("run-*")
    assert files == [f"{work.name}/last.pt"], files
    main = load_checkpoint(work / "last.pt")
    assert main["step"] == 3 and main["world_size"] == WORLD and len(main["rng"]) == WORLD
    assert not torch.equal(main["rng"][0]["generator"], main["rng"][1]["generator"])  # per-rank streams
    _assert_close_weights(main["models"]["model"], teacher_runs["ddp"]["models"]["model"])


def test_ddp_distillation_matches_one_process_and_syncs_losses(teacher_runs, data, tmp_path) -> None:
    teacher = teacher_runs["single"]
    corrupted = data["train"]["corrupted"]
    ddp_config = parse_distill_config(_distill_params(PER_RANK_BATCH, str(tmp_path / "ddp_work")))
    ddp = launch_local(
        _distill_rank_worker, WORLD, (corrupted, teacher, ddp_config, str(tmp_path)), ddp_config.distributed
    )
    histories = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single_config = parse_distill_config(
        _distill_params(PER_RANK_BATCH * WORLD, str(tmp_path / "single_work"))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = distill_student(
            corrupted, teacher, single_config, task_kind=TASK["kind"], device="cpu", progress=False
        )
    finally:
        torch.set_num_threads(threads)

    assert ddp["kind"] == "student" and ddp["step"] == single["step"] == 2
    for name in ("generator", "aux"):
        _assert_close_weights(ddp["models"][name], single["models"][name])
    _assert_close_weights(ddp["ema"]["generator"], single["ema"]["generator"])
    assert _max_difference(single["models"]["generator"], teacher["ema"]["model"]) > 100 * WEIGHT_ATOL
    for key in ("loss/generator", "loss/aux", "term/teacher", "term/fake"):
        rank0, rank1 = (_losses(h, key) for h in histories)
        assert len(rank0) == 2 and rank0 == rank1, key
        torch.testing.assert_close(
            torch.tensor(rank0), torch.tensor(_losses(single["history"], key)), rtol=1e-5, atol=1e-6, msg=key
        )
    written = _files(tmp_path / "ddp_work")
    assert len(written) == 1 and written[0].endswith("/last.pt"), written
    assert load_checkpoint(tmp_path / "ddp_work" / written[0])["world_size"] == WORLD


# ---------------------------------------------------------------- the console entry point


def test_catalog_version_names_sort_like_kedro_and_register_refuses_older(tmp_path) -> None:
    import datetime

    from kedro.io.core import VERSION_FORMAT

    moment = datetime.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=datetime.timezone.utc)
    kedro_style = moment.strftime(VERSION_FORMAT)
    assert catalog_version_name(moment) == kedro_style[:-4] + kedro_style[-1:] == "2026-01-02T03.04.05.678Z"
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
        "-m", "ibmd_pipeline.engine.train",
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
