"""The IBMD trainer: which parameters each update moves, resume, validation, configs, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from numerics import sum_rtol
from torch._dynamo.utils import counters

from ibmd_pipeline.distill.config import DistillConfig, parse_distill_config, resolve_distill
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.trainer import (
    DistillRun,
    build_distill_run,
    distill_student,
    run_folder_name,
    split_held_out,
)
from ibmd_pipeline.distill.validation import energy_distance, per_pixel_std
from ibmd_pipeline.engine.checkpoint import load_checkpoint
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.engine.devices import is_compiled
from ibmd_pipeline.engine.distributed import DistContext
from ibmd_pipeline.engine.launch import WorkerError, launch_local
from ibmd_pipeline.engine.training import set_learning_rates
from ibmd_pipeline.teacher.model import CheckpointMismatchError

CPU = DistContext.single_process("cpu")


def tiny_config(**overrides) -> DistillConfig:
    mapping = {
        "train": {"steps": 3, "batch_size": 3, "log_every": 1},
        "aux_steps": 2,
        "lr_generator": 1e-3,
        "lr_aux": 1e-3,
        "validation": {
            "every": 2, "batch_size": 3, "draws": 4, "teacher_nfe": 4, "reference_nfes": [1, 2],
            "grid_examples": 2,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            mapping[key] = {**mapping.get(key, {}), **value}
        else:
            mapping[key] = value
    return parse_distill_config(mapping)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ---------------------------------------------------------------- which parameters move


@pytest.mark.parametrize(("task", "nfe"), [("sr4x_bicubic", 1), ("sketch", 2), ("inpaint_center", 2)])
def test_each_update_moves_only_its_own_network_and_never_the_teacher(
    teacher_checkpoint, corrupted_images, task, nfe
):
    xT, mask = corrupted_images(task, 16)
    run: DistillRun = build_distill_run(
        CPU, xT, teacher_checkpoint(task), tiny_config(student_nfe=nfe), mask=mask, task_kind=task
    )
    set_learning_rates(run.state, 0)
    teacher, generator, aux = run.teacher.predictor, run.generator, run.aux
    before = {name: snapshot(m) for name, m in (("teacher", teacher), ("generator", generator), ("aux", aux))}

    run.aux_update(run.state, 0, 0)
    assert changed(before["aux"], aux)
    assert not changed(before["generator"], generator) and not changed(before["teacher"], teacher)

    before["aux"] = snapshot(aux)
    run.generator_update(run.state, 0)
    assert changed(before["generator"], generator)
    assert not changed(before["aux"], aux) and not changed(before["teacher"], teacher)
    # no stray gradients are left on the frozen or the other network
    assert all(p.grad is None for p in (*teacher.parameters(), *aux.parameters()))
    if run.generator.noise:  # the zero-initialised z weights receive a gradient and move
        assert torch.count_nonzero(generator.predictor.net.input_conv.weight[:, -1:]) > 0
    # the EMA follows the generator only
    assert set(run.state.emas) == {"generator"}


def test_generator_and_aux_start_from_the_teachers_ema_weights(teacher_checkpoint, corrupted_images):
    checkpoint = teacher_checkpoint()
    xT, _ = corrupted_images()
    for use_ema, source in ((True, "ema"), (False, "models")):
        run = build_distill_run(CPU, xT, checkpoint, tiny_config(use_teacher_ema=use_ema))
        weights = checkpoint[source]["model"]
        for name, value in run.aux.net.state_dict().items():
            assert torch.equal(value, weights[name])
        gen = run.generator.predictor.net.state_dict()
        assert torch.equal(gen["input_blocks.0.0.weight"][:, :1], weights["input_blocks.0.0.weight"])
        assert torch.equal(gen["out.2.weight"], weights["out.2.weight"])


# ---------------------------------------------------------------- whole runs


def test_a_short_run_logs_losses_and_validation_and_exports_a_student(teacher_checkpoint, corrupted_images):
    xT, _ = corrupted_images(count=20)
    student = distill_student(xT, teacher_checkpoint(), tiny_config(), device="cpu", progress=False)
    assert student["kind"] == "student" and student["step"] == 3
    assert set(student["models"]) == {"generator", "aux"} and set(student["ema"]) == {"generator"}
    losses = [r for r in student["history"] if "loss/generator" in r]
    assert [r["step"] for r in losses] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(r["loss/aux"]) and r["loss/aux"] > 0 for r in losses)
    for r in losses:  # the generator loss is the difference of its two logged terms
        assert r["loss/generator"] == pytest.approx(r["term/teacher"] - r["term/fake"], abs=1e-5)
    validation = [r for r in student["history"] if "val/gap/student_nfe1" in r]
    assert [r["step"] for r in validation] == [0.0, 2.0]
    first = validation[0]
    # at step 0 the one-step generator is the teacher's one-step prediction, for any z
    assert first["val/gap/student_nfe1"] == pytest.approx(first["val/gap/teacher_nfe1"], abs=1e-6)
    assert first["val/std/student"] == pytest.approx(0.0, abs=1e-6)
    assert first["val/std/teacher"] > 0
    # the posterior mean is measurably far from the teacher's samples, unlike the teacher itself
    assert first["val/gap/teacher_nfe1"] > 5 * abs(first["val/gap/teacher_self"])
    assert "val/gap/teacher_nfe2" in first  # the configured reference
    assert validation[1]["val/std/student"] > 0  # z channels are in use after training
    config = student["config"]
    assert config["generator"]["nfe"] == 1 and config["generator"]["noise"] is True
    assert config["generator"]["unet"]["in_channels"] == 2
    assert config["resolved"]["aux_steps"] == 2 and config["teacher"]["bridge"]["kind"] == "i2sb"
    assert config["task"]["kind"] == "sr4x_bicubic" and (config["image_size"], config["channels"]) == (16, 1)
    assert config["distill"]["validation"]["batch_size"] == 3


def _record_steps(monkeypatch, calls: list[int], fail_at: int | None = None) -> None:
    original = DistillRun.step

    def recording(self, state, step):
        if step == fail_at:
            raise KeyboardInterrupt  # as a kill would, mid-run
        calls.append(step)
        return original(self, state, step)

    monkeypatch.setattr(DistillRun, "step", recording)


def test_an_interrupted_run_resumes_exactly(teacher_checkpoint, corrupted_images, tmp_path, monkeypatch):
    xT, _ = corrupted_images(count=20)
    teacher = teacher_checkpoint()
    reference = distill_student(
        xT, teacher, tiny_config(train={"steps": 4}, student_nfe=2), device="cpu", progress=False
    )
    config = tiny_config(train={"steps": 4, "checkpoint_every": 2}, student_nfe=2, workdir=str(tmp_path))
    first_calls, second_calls = [], []
    with monkeypatch.context() as patch:
        _record_steps(patch, first_calls, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            distill_student(xT, teacher, config, device="cpu", progress=False)
    assert first_calls == [0, 1, 2]
    assert len(list(tmp_path.glob("run-*/last.pt"))) == 1  # the checkpoint of step 2 survived
    with monkeypatch.context() as patch:
        _record_steps(patch, second_calls)
        resumed = distill_student(xT, teacher, config, device="cpu", progress=False)
    assert second_calls == [2, 3]  # continued from the working checkpoint, not from scratch
    for group in ("models", "ema"):
        for name, weights in reference[group].items():
            for key, value in weights.items():
                assert torch.equal(value, resumed[group][name][key]), f"{group}.{name}.{key}"

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in history]

    assert timeless(resumed["history"]) == timeless(reference["history"])
    assert not list(tmp_path.glob("run-*/last.pt"))  # removed once the student is built


def test_runs_with_another_configuration_use_another_working_folder():
    base = {"teacher": {"task": "x"}, "resolved": {"aux_steps": 5}}
    train = {"steps": 10, "log_every": 5, "checkpoint_every": 5}
    same = run_folder_name(base, {**train, "log_every": 1, "checkpoint_every": 3})
    assert same == run_folder_name(base, train)  # settings that only watch the run are neutral
    assert run_folder_name({**base, "resolved": {"aux_steps": 1}}, train) != same
    assert run_folder_name(base, {**train, "steps": 11}) != same
    # torch.compile changes how the run executes, not what it computes: a run resumes across it
    assert run_folder_name(base, {**train, "compile": {"enabled": True, "mode": "max-autotune"}}) == same


def test_compiled_networks_give_the_eager_losses_and_plain_checkpoints(teacher_checkpoint, corrupted_images):
    """The ``eager`` backend captures the teacher's, generator's and auxiliary model's graphs as
    inductor would get them (five graphs: grad modes and input requirements differ by update) but
    runs PyTorch's kernels; it must change nothing but rounding. (The teacher test covers
    ``aot_eager``, which also traces the backward pass; here it would double the time.)"""
    xT, _ = corrupted_images(count=12)
    teacher = teacher_checkpoint()
    eager_config = tiny_config(train={"steps": 2}, validation={"every": 0})
    compiled_config = tiny_config(
        train={"steps": 2, "compile": {"enabled": True, "backend": "eager"}}, validation={"every": 0}
    )
    run = build_distill_run(CPU, xT, teacher, compiled_config, task_kind="sr4x_bicubic")
    assert all(is_compiled(m) for m in (run.teacher.predictor.net, run.generator, run.aux))
    assert not is_compiled(run.ema_generator)  # the EMA shadow stays a plain copy
    eager = distill_student(xT, teacher, eager_config, device="cpu", progress=False)
    graphs = counters["stats"]["unique_graphs"]
    compiled = distill_student(xT, teacher, compiled_config, device="cpu", progress=False)
    assert counters["stats"]["unique_graphs"] >= graphs + 5  # really compiled, no eager fallback
    for group in ("models", "ema"):
        for name, weights in eager[group].items():
            assert list(compiled[group][name]) == list(weights)  # no _orig_mod. prefixes
            for key, value in weights.items():
                torch.testing.assert_close(compiled[group][name][key], value, rtol=0, atol=1e-5)
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        for key in ("loss/generator", "loss/aux", "term/teacher", "term/fake"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- inputs and mismatches


def test_held_out_images_are_the_last_ones_and_never_trained_on():
    xT = torch.arange(10.0).view(10, 1, 1, 1)
    mask = torch.ones(10, 1, 1, 1)
    train, train_mask, val, val_mask = split_held_out(xT, mask, 3)
    assert train.flatten().tolist() == list(range(7)) and val.flatten().tolist() == [7, 8, 9]
    assert train_mask.shape[0] == 7 and val_mask.shape[0] == 3
    with pytest.raises(ValueError, match="validation.batch_size"):
        split_held_out(xT, None, 10)


def test_a_teacher_for_another_task_or_size_fails_before_training(
    teacher_checkpoint, corrupted_images, monkeypatch
):
    monkeypatch.setattr(DistillRun, "step", pytest.fail)
    xT, _ = corrupted_images()
    with pytest.raises(CheckpointMismatchError, match="task 'sr4x_bicubic'"):
        distill_student(xT, teacher_checkpoint(), tiny_config(), task_kind="jpeg", device="cpu")
    with pytest.raises(CheckpointMismatchError, match="image_size 16"):
        distill_student(xT[..., :8, :8], teacher_checkpoint(), tiny_config(), device="cpu")
    with pytest.raises(ValueError, match="needs missing-pixel mask"):
        distill_student(xT, teacher_checkpoint("inpaint_center"), tiny_config(), task_kind="inpaint_center")


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ({"student_nfe": 3}, "distill.student_nfe"),
        ({"student_nfe": True}, "distill.student_nfe"),
        ({"multistep_mode": "dmd"}, "distill.multistep_mode"),
        ({"aux_steps": 0}, "distill.aux_steps"),
        ({"lr_generator": -1.0}, "distill.lr_generator"),
        ({"train": {"lr": 1e-3}}, "distill.train.lr"),
        ({"train": {"sample_every": 5}}, "distill.train.sample_every"),
        ({"train": {"batch_size": 0}}, "distill.train.batch_size"),
        ({"validation": {"draws": 3}}, "distill.validation.draws"),
        ({"validation": {"teacher_nfe": 8}}, "distill.validation.reference_nfes[3]"),
        ({"validation": {"grid_examples": 100}}, "distill.validation.grid_examples"),
        ({"distributed": {"nproc_per_node": 0}}, "distill.distributed.nproc_per_node"),
        ({"noise": "yes"}, "distill.noise"),
        ({"auxsteps": 5}, "distill.auxsteps"),
    ],
)
def test_config_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as err:
        parse_distill_config(mapping)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("bridge", "conditional", "inpainting", "expected"),
    [
        ("i2sb", False, False, dict(aux_steps=5, lr_generator=5e-5, noise=True, multistep_mode="chain")),
        ("i2sb", False, True, dict(aux_steps=5, lr_generator=5e-5, noise=False, multistep_mode="chain")),
        ("ddbm_vp", True, False, dict(aux_steps=5, lr_generator=1e-5, noise=True, multistep_mode="rollout")),
        ("ddbm_vp", True, True, dict(aux_steps=1, lr_generator=3e-6, noise=True, multistep_mode="rollout")),
    ],
)
def test_auto_settings_follow_the_paper(bridge, conditional, inpainting, expected):
    situation = {"bridge_kind": bridge, "conditional": conditional, "inpainting": inpainting}
    resolved = resolve_distill(DistillConfig(), **situation)
    assert {k: getattr(resolved, k) for k in expected} == expected
    assert resolved.lr_aux == resolved.lr_generator and resolved.train.lr == resolved.lr_generator
    explicit = resolve_distill(
        parse_distill_config({"aux_steps": 3, "noise": True, "lr_aux": 1e-4, "multistep_mode": "chain"}),
        **situation,
    )
    decided = (explicit.aux_steps, explicit.noise, explicit.lr_aux, explicit.multistep_mode)
    assert decided == (3, True, 1e-4, "chain")


# ---------------------------------------------------------------- validation metrics


def test_energy_distance_separates_a_point_mass_from_samples_and_is_zero_between_equals():
    """In D dimensions, for X ~ N(mu, s^2 I): E||X - mu|| / sqrt(D) -> s and E||X - X'|| / sqrt(D)
    -> s sqrt(2), so a point mass at mu scores (2 - sqrt 2) s while a second independent set of
    draws scores 0 in expectation."""
    gen = torch.Generator().manual_seed(0)
    s, draws, images = 0.3, 6, 40
    mu = torch.randn(1, images, 1, 32, 32, generator=gen)
    samples = mu + s * torch.randn(draws, images, 1, 32, 32, generator=gen)
    others = mu + s * torch.randn(draws, images, 1, 32, 32, generator=gen)
    point_mass = mu.expand(draws, -1, -1, -1, -1)
    expected = (2 - math.sqrt(2)) * s
    assert float(energy_distance(point_mass, samples).mean()) == pytest.approx(expected, rel=0.02)
    same = energy_distance(others, samples)
    assert abs(float(same.mean())) < 0.01 * s and same.shape == (images,)
    assert float(energy_distance(others + 0.5, samples).mean()) > 0.3  # a shifted mean is seen
    assert float(energy_distance(samples, others).mean()) == pytest.approx(float(same.mean()))
    draws_of_two = torch.stack([torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)])
    assert per_pixel_std(draws_of_two) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match=">= 2 draws"):
        energy_distance(samples[:1], samples)


# ---------------------------------------------------------------- the student checkpoint


@pytest.mark.parametrize(("task", "nfe"), [("sr4x_bicubic", 1), ("inpaint_center", 2), ("sketch", 4)])
def test_student_checkpoint_round_trip_gives_identical_samples(
    teacher_checkpoint, corrupted_images, task, nfe
):
    xT, mask = corrupted_images(task, 14)
    config = tiny_config(student_nfe=nfe, train={"steps": 1}, validation={"every": 0})
    student = distill_student(xT, teacher_checkpoint(task), config, mask=mask, task_kind=task, progress=False)
    buffer = io.BytesIO()
    torch.save(student, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    reloaded["catalog_version"] = "2025-01-01T00.00.00.000Z"
    first = student_from_checkpoint(student, task_kind=task, image_size=16, channels=1)
    second = student_from_checkpoint(reloaded, task_kind=task, image_size=16, channels=1)
    assert (first.nfe, second.version, first.version) == (nfe, "2025-01-01T00.00.00.000Z", None)
    batch, hole = xT[:3], None if mask is None else mask[:3]
    a = first.sample(batch, mask=hole, generator=torch.Generator().manual_seed(7))
    b = second.sample(batch, mask=hole, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == batch.shape
    if nfe > 1:
        fewer = first.sample(batch, nfe=1, mask=hole, generator=torch.Generator().manual_seed(7))
        assert fewer.shape == batch.shape and not torch.equal(fewer, a)
        with pytest.raises(ValueError, match="nfe"):
            first.sample(batch, nfe=nfe + 1, mask=hole)
    raw = student_from_checkpoint(student, use_ema=False)
    for name, value in raw.generator.predictor.net.state_dict().items():
        assert torch.equal(value, student["models"]["generator"][name])
    if task == "inpaint_center":
        with pytest.raises(ValueError, match="needs the mask"):
            first.sample(batch)
        # no z and an OT-ODE teacher: deterministic, so chunking changes nothing
        chunked = first.sample(batch, mask=hole, batch_size=2)
        torch.testing.assert_close(chunked, a, rtol=0, atol=1e-5)


def test_student_loading_rejects_other_data_and_teacher_checkpoints(teacher_checkpoint, corrupted_images):
    xT, _ = corrupted_images(count=12)
    config = tiny_config(train={"steps": 1}, validation={"every": 0})
    student = distill_student(xT, teacher_checkpoint(), config, progress=False)
    for kwargs, message in (
        ({"task_kind": "jpeg"}, "task 'sr4x_bicubic'"),
        ({"image_size": 32}, "image_size 16"),
        ({"channels": 3}, "1 channels"),
    ):
        with pytest.raises(CheckpointMismatchError, match=message):
            student_from_checkpoint(student, **kwargs)
    with pytest.raises(CheckpointMismatchError, match="this is the teacher"):
        student_from_checkpoint(teacher_checkpoint())


# ---------------------------------------------------------------- data parallel


def _crashing_distill_worker(corrupted, teacher, config, task_kind, crash_step):
    """A DDP worker whose every rank dies in the generator update of ``crash_step`` (spawned)."""
    original = DistillRun.generator_update

    def crashing(self, state, step):
        if step == crash_step:
            raise RuntimeError(f"simulated crash at step {step}")
        return original(self, state, step)

    DistillRun.generator_update = crashing
    return distill_student(corrupted, teacher, config, task_kind=task_kind, device="cpu", progress=False)


@pytest.mark.slow
def test_two_processes_equal_one_process_write_one_checkpoint_and_resume_exactly(
    teacher_checkpoint, corrupted_images, tmp_path
):
    """Gloo on the CPU: per-rank batches B on 2 ranks reproduce one process with batch 2B, since
    every draw is made for the global batch and DDP averages the per-rank mean gradients. The two
    ranks keep one working checkpoint, and a run killed after it resumes bit for bit."""
    task = "sketch"  # conditional DDBM teacher, 2-step student trained by rollout
    xT, _ = corrupted_images(task, 24)
    teacher = teacher_checkpoint(task)
    common = {"student_nfe": 2, "validation": {"every": 0}}

    def two_ranks(workdir):
        return tiny_config(
            train={"steps": 2, "batch_size": 2, "checkpoint_every": 1}, aux_batch_size=3,
            distributed={"nproc_per_node": 2}, workdir=str(workdir), keep_workdir=True, **common,
        )

    two = distill_student(xT, teacher, two_ranks(tmp_path / "straight"), device="cpu", progress=False)
    one = distill_student(
        xT, teacher, tiny_config(train={"steps": 2, "batch_size": 4}, aux_batch_size=6, **common),
        device="cpu", progress=False,
    )
    # float32, so only bounds that hold on any CPU (tests/numerics.py; the float64 parity of
    # tests/engine/test_ddp_training.py is the tight check): the first losses come from equal
    # weights and differ by the rounding of their sums; after that AdamW may move a weight whose
    # gradient is within rounding of zero by up to lr per update on either side.
    first_one, first_two = one["history"][0], two["history"][0]
    terms = 6 * 16 * 16  # the longest sum: a loss or weight gradient over the aux batch of 6 16x16 images
    for key in ("loss/generator", "loss/aux", "term/teacher", "term/fake"):
        assert len(one["history"]) == len(two["history"]) == 2
        assert first_one[key] == pytest.approx(first_two[key], rel=sum_rtol(terms, torch.float32)), key
    updates = {"generator": 2, "aux": 2 * tiny_config().aux_steps}
    for name, count in updates.items():
        for key, value in one["models"][name].items():
            torch.testing.assert_close(two["models"][name][key], value, rtol=0, atol=2 * count * 1e-3)

    # One working checkpoint for both ranks, with both ranks' random states (equal here: every
    # draw is made for the global batch from generators seeded alike on every rank).
    files = [p for p in (tmp_path / "straight").rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["last.pt"], files
    working = load_checkpoint(files[0])
    assert working["step"] == 2 and working["world_size"] == 2 and len(working["rng"]) == 2
    assert torch.equal(working["rng"][0]["generator"], working["rng"][1]["generator"])

    # Killed in step 1 after the step-1 checkpoint, then restarted with the same settings.
    crashed = two_ranks(tmp_path / "crashed")
    with pytest.raises(WorkerError, match="simulated crash at step 1"):
        launch_local(
            _crashing_distill_worker, 2, args=(xT, teacher, crashed, task, 1), config=crashed.distributed
        )
    (checkpoint,) = (tmp_path / "crashed").rglob("*.pt")
    assert load_checkpoint(checkpoint)["step"] == 1
    resumed = distill_student(xT, teacher, crashed, device="cpu", progress=False)
    for group in ("models", "ema"):
        for name, weights in two[group].items():
            for key, value in weights.items():
                assert torch.equal(resumed[group][name][key], value), f"{group}.{name}.{key}"
    def timeless(history):
        return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in history]

    assert timeless(resumed["history"]) == timeless(two["history"])
