"""Measure, on this machine, what a run's steps cost: a teacher training step, an IBMD update and
one network evaluation without gradients, on the configured networks with random weights (the
cost does not depend on the weights) and random images.

The probe is not training: it runs inside its own random streams (torch's, NumPy's and Python's
global generators are restored afterwards), so a run with the probe draws exactly the numbers of
a run without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ibmd_pipeline.bridges.losses import bridge_matching_loss
from ibmd_pipeline.budget.plan import StepTimes
from ibmd_pipeline.data import DataConfig
from ibmd_pipeline.degradations import TaskConfig
from ibmd_pipeline.distill.config import DistillConfig, parse_distill_config
from ibmd_pipeline.distill.trainer import fresh_ibmd_update
from ibmd_pipeline.engine.config import parse_config
from ibmd_pipeline.engine.devices import EngineConfig, autocast_context, configure_threads, select_device
from ibmd_pipeline.engine.training import create_training_state, optimizer_step
from ibmd_pipeline.evaluation.config import EvaluateConfig, parse_evaluate_config
from ibmd_pipeline.evaluation.measure import PER_IMAGE_METRICS, RunMeasurement
from ibmd_pipeline.evaluation.summary import Summarizer
from ibmd_pipeline.networks.predictors import X0Predictor
from ibmd_pipeline.networks.unet import UNet
from ibmd_pipeline.teacher import TeacherConfig, parse_teacher_config, plan_teacher
from ibmd_pipeline.teacher.config import cpu_has_native_bf16
from ibmd_pipeline.teacher.model import teacher_from_checkpoint

__all__ = [
    "BF16_MIN_GAIN",
    "choose_precision",
    "ibmd_update_call",
    "isolated_random_state",
    "measures_precision",
    "measure_step_times",
    "precision_path",
    "random_measurement",
    "random_teacher_checkpoint",
    "report_seconds_per_resample",
    "teacher_step_call",
]

Step = Callable[[], Any]


@contextlib.contextmanager
def isolated_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global generators (CUDA's too) on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


#: On a CPU with native bf16, ``cpu_bf16: auto`` keeps bf16 autocast only when the probe finds it
#: at least this much faster than float32 (step time x (1 + gain) <= float32's): bf16 rounds more
#: coarsely, so it has to pay, and a near tie stays float32. (On an AVX-512-BF16 Xeon without AMX
#: float32 was the faster: teacher step 0.34 against 0.46 s, IBMD update 1.6 against 2.6 s.)
BF16_MIN_GAIN = 0.10


def choose_precision(bf16_seconds: float, float32_seconds: float) -> str:
    """``"bf16"`` when bf16 autocast is at least :data:`BF16_MIN_GAIN` faster, else ``"float32"``."""
    return "bf16" if bf16_seconds * (1.0 + BF16_MIN_GAIN) <= float32_seconds else "float32"


def measures_precision(config: TeacherConfig | DistillConfig, device: torch.device) -> bool:
    """Whether the probe decides ``cpu_bf16: auto`` by timing: on a CPU with native bf16, with
    ``train.bf16`` set (elsewhere ``auto`` has one answer)."""
    return device.type == "cpu" and config.train.bf16 and config.cpu_bf16 == "auto" and cpu_has_native_bf16()


def _measured_path(precision: Mapping[str, str]) -> str:
    """The plan's precision line for stages whose ``cpu_bf16: auto`` the probe decided."""

    def name(choice: str) -> str:
        return "native bf16" if choice == "bf16" else "float32"

    if len(set(precision.values())) == 1:
        return f"{name(next(iter(precision.values())))} (CPU; measured faster for {' and '.join(precision)})"
    return (
        ", ".join(f"{stage} in {name(choice)}" for stage, choice in precision.items())
        + " (CPU; measured faster)"
    )


def precision_path(config: TeacherConfig | DistillConfig, device: torch.device) -> str:
    """How the training steps run on ``device``, in words for the run's plan."""
    if device.type != "cpu":
        return f"{device.type}, {'bf16 autocast' if config.autocast_bf16(device) else 'float32'}"
    if config.autocast_bf16(device):
        native = cpu_has_native_bf16()
        return "native bf16 (CPU)" if native else "bf16 autocast without native bf16 (cpu_bf16: always)"
    if not config.train.bf16 or config.cpu_bf16 == "never":
        return "float32 (CPU; bf16 switched off)"
    return "float32 (CPU without native bf16)"


def random_teacher_checkpoint(
    config: TeacherConfig, task: TaskConfig, image_size: int, channels: int
) -> dict[str, Any]:
    """A teacher checkpoint of the configured network with random weights (for timing only)."""
    plan = plan_teacher(config, task, image_size=image_size, channels=channels)
    net = UNet(plan.resolved.unet)
    with torch.no_grad():  # a fresh UNet's zero output heads would make every output zero
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    weights = net.state_dict()
    return {
        "kind": "teacher",
        "config": plan.checkpoint_config(config),
        "models": {"model": weights},
        "ema": {"model": weights},
        "step": 1,
        "history": [],
    }


def _median_seconds(step: Step, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``repeats`` calls of ``step`` after one untimed warm-up call."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # allocator, kernel selection
    synchronize()
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        synchronize()
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds)


#: The stages whose precision the probe may decide, in the order the plan prints them.
STAGES = ("teacher", "distill")


def _faster(
    first: tuple[float, float | None], second: tuple[float, float | None]
) -> tuple[float, float | None]:
    """Of two timings of the same step (configured precision, float32 or None), the smaller of
    each."""
    float32 = None if first[1] is None or second[1] is None else min(first[1], second[1])
    return min(first[0], second[0]), float32


def teacher_step_call(
    checkpoint: Mapping[str, Any], config: TeacherConfig, device: torch.device, images: torch.Tensor
) -> Step:
    """One step as the teacher trainer runs it: loss, backward, clipping, AdamW, EMA."""
    loaded = teacher_from_checkpoint(checkpoint, use_ema=False, device=device)
    net = loaded.predictor.net.requires_grad_(True).train()
    state = create_training_state({"model": net}, config.train, device=device)
    predictor = X0Predictor(state.models["model"], loaded.schedule, loaded.conditional)
    bf16 = config.autocast_bf16(device)
    batch = config.train.batch_size
    x0, xT = images[:batch].to(device), images[batch : 2 * batch].to(device)

    def step() -> None:
        with autocast_context(device, bf16, allow_cpu=True):
            loss = bridge_matching_loss(predictor, x0, xT, loaded.schedule, generator=state.device_generator)
        optimizer_step(state, "model", loss)

    return step


def ibmd_update_call(
    checkpoint: Mapping[str, Any],
    config: DistillConfig,
    device: torch.device,
    images: torch.Tensor,
    task: str,
) -> Step:
    """One IBMD update (L auxiliary updates and one generator update) of a fresh run."""
    mask = None
    if task == "inpaint_center":
        mask = torch.zeros(len(images), 1, *images.shape[-2:])
        mask[
            ...,
            images.shape[-2] // 4 : 3 * images.shape[-2] // 4,
            images.shape[-1] // 4 : 3 * images.shape[-1] // 4,
        ] = 1
    return fresh_ibmd_update(checkpoint, config, images, device, mask=mask, task_kind=task)


def _forward_image(
    checkpoint: Mapping[str, Any], device: torch.device, images: torch.Tensor, batch: int
) -> float:
    """Seconds of one network evaluation of one image, no gradients, float32, at ``batch``."""
    loaded = teacher_from_checkpoint(checkpoint, device=device)
    xT = images[:batch].to(device)
    t = loaded.schedule.sample_time(len(xT), device=device)

    def forward() -> None:
        with torch.no_grad():
            loaded.predictor(xT, t, xT=xT if loaded.conditional else None)

    return _median_seconds(forward, 2, device) / len(xT)


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: ``/proc``); 0.0 where that is not known."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - started, 0.0)


def _inception_image(device: torch.device, batch: int = 8) -> float:
    """Seconds of one 299x299 Inception-v3 forward of one image (random weights: FID's network
    has the same layers), float32, no gradients."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval().to(device)
    images = torch.randn(batch, 3, 299, 299, device=device)

    def forward() -> None:
        with torch.no_grad():
            net(images)

    return _median_seconds(forward, 1, device) / batch


def random_measurement(
    label: str, config: EvaluateConfig, images: int, rng: np.random.Generator
) -> RunMeasurement:
    """A measurement of ``images`` test images with random values and features of the shapes the
    evaluation keeps under ``config`` (for timing the report: its cost does not depend on the
    values)."""
    seeds = tuple(range(config.num_seeds))
    per_image = {name: rng.random((len(seeds), images)) for name in PER_IMAGE_METRICS}
    per_image["correct"] = (per_image["correct"] > 0.1).astype(np.float64)
    classifier = None
    if config.ca.enabled:
        embedding = config.ca.classifier.embedding_dim
        classifier = rng.random((len(seeds), images, embedding), dtype=np.float32)
    inception = None
    if config.fid.enabled:
        rows = min(config.fid.num_images or images, images)
        inception = rng.random((min(config.fid.seeds, len(seeds)), rows, config.fid.dims), dtype=np.float32)
    return RunMeasurement(
        label=label,
        model="teacher",
        nfe=1,
        sampler=config.sampler,
        seeds=seeds,
        per_image=per_image,
        classifier_features=classifier,
        inception_features=inception,
        samples=torch.zeros(0),
    )


def report_seconds_per_resample(config: EvaluateConfig, images: int, resamples: int = 20) -> float:
    """Seconds the report spends per bootstrap resample on one model's whole-set metrics (FID,
    KID and their classifier-feature versions, each on half-samples), timed on random features of
    the evaluation's shapes through :class:`~ibmd_pipeline.evaluation.summary.Summarizer` itself
    with ``resamples`` resamples. The report's intervals cost about this x ``bootstrap.resamples``
    x the number of evaluated models."""
    rng = np.random.default_rng(0)
    measurement = random_measurement("probe", config, images, rng)
    inception_reference = None
    paired = config.fid.reference == "evaluated"
    if measurement.inception_features is not None:
        rows = measurement.inception_features.shape[1] if paired else (config.fid.reference_images or images)
        inception_reference = rng.random((rows, config.fid.dims), dtype=np.float32)
    classifier_reference = None
    if measurement.classifier_features is not None:
        classifier_reference = rng.random(measurement.classifier_features.shape[1:], dtype=np.float32)
    settings = config.bootstrap.__class__(resamples=resamples, confidence=config.bootstrap.confidence)
    summarizer = Summarizer(settings, config.kid, inception_reference, paired, classifier_reference)
    begin = time.perf_counter()
    summarizer.summarize(measurement)
    return (time.perf_counter() - begin) / resamples


def measure_step_times(
    params: Mapping[str, Any],
    *,
    teacher: bool,
    distill: bool,
    teacher_checkpoint: Mapping[str, Any] | None = None,
    repeats: int = 2,
    inception: bool = False,
    report: bool = False,
) -> StepTimes:
    """Median seconds of ``repeats`` teacher steps (with ``teacher``) and IBMD updates (with
    ``distill``) of the networks ``params`` describe, each after a warm-up (the teacher's timed at
    the start and again at the end of the probe, the faster kept), of one image's
    network evaluation (in a batch of ``evaluate.batch_size`` and alone), (with ``inception``)
    of one image's Inception forward and (with ``report``) of the report's whole-set metrics per
    model and resample, on ``engine.device`` with ``engine.num_threads``; and the seconds since
    the process started.

    ``teacher_checkpoint``: the teacher the distillation will read (its network is timed);
    None = a random teacher of ``params:teacher``'s network. Global random streams are left as
    they were.
    """
    startup = seconds_since_process_start()
    begin = time.perf_counter()
    engine = parse_config(EngineConfig, params.get("engine"), "engine")
    task = parse_config(TaskConfig, params.get("task"), "task")
    data = parse_config(DataConfig, params.get("data"), "data")
    teacher_config = parse_teacher_config(params.get("teacher"), seed=0)
    distill_config = parse_distill_config(
        {**dict(params.get("distill") or {}), "workdir": None, "validation": {"every": 0}}
    )
    configure_threads(engine.num_threads)
    device = select_device(engine.device)
    evaluate_batch = int((params.get("evaluate") or {}).get("batch_size", 64))
    with isolated_random_state():
        torch.manual_seed(0)
        size, channels = data.image_size, data.channels
        if teacher_checkpoint is not None:
            size, channels = (
                int(teacher_checkpoint["config"]["image_size"]),
                int(teacher_checkpoint["config"]["channels"]),
            )
        count = max(2 * teacher_config.train.batch_size, 2 * distill_config.train.batch_size, evaluate_batch)
        count += distill_config.validation.batch_size
        images = torch.rand(count, channels, size, size) * 2 - 1
        checkpoint = teacher_checkpoint or random_teacher_checkpoint(teacher_config, task, size, channels)
        teacher_step = ibmd_update = None
        precision: dict[str, str] = {}
        precision_seconds: dict[str, tuple[float, float]] = {}

        def seconds_of(config: Any, step: Callable[[Any], Step]) -> tuple[float, float | None]:
            """The step's seconds in the configured precision and, with ``cpu_bf16: auto`` on a
            native-bf16 CPU, in float32 (else None)."""
            seconds = _median_seconds(step(config), repeats, device)
            if not measures_precision(config, device):
                return seconds, None
            float32 = _median_seconds(step(dataclasses.replace(config, cpu_bf16="never")), repeats, device)
            return seconds, float32

        def chosen(stage: str, seconds: float, float32: float | None) -> float:
            """The stage's step time; of the faster of bf16 and float32 where both were timed
            (:func:`choose_precision`)."""
            if float32 is None:
                return seconds
            precision[stage] = choose_precision(seconds, float32)
            precision_seconds[stage] = (seconds, float32)
            return seconds if precision[stage] == "bf16" else float32

        def teacher_seconds() -> tuple[float, float | None]:
            return seconds_of(
                teacher_config, lambda config: teacher_step_call(checkpoint, config, device, images)
            )

        first_teacher = teacher_seconds() if teacher else None
        if distill:
            ibmd_update = chosen(
                "distill",
                *seconds_of(
                    distill_config,
                    lambda config: ibmd_update_call(checkpoint, config, device, images, task.kind),
                ),
            )
        forward = _forward_image(checkpoint, device, images, evaluate_batch)
        forward_single = _forward_image(checkpoint, device, images, 1)
        inception_image = _inception_image(device) if inception else None
        report_resample = None
        if report:
            evaluate = parse_evaluate_config(params.get("evaluate"))
            report_resample = report_seconds_per_resample(evaluate, evaluate.num_images)
        if first_teacher is not None:
            # Timed again at the end, and the faster kept: a fresh process's first steps can be
            # slow for a while (right after set-up's disk writes by 25-50%), the run's are not.
            teacher_step = chosen("teacher", *_faster(first_teacher, teacher_seconds()))
    path = precision_path(teacher_config if teacher else distill_config, device)
    if precision:
        path = _measured_path(precision)
    return StepTimes(
        teacher_step,
        ibmd_update,
        forward,
        path,
        probe=time.perf_counter() - begin,
        inception_image=inception_image,
        forward_single=forward_single,
        report_resample=report_resample,
        startup=startup,
        precision=dict(sorted(precision.items(), key=lambda item: STAGES.index(item[0]))),
        precision_seconds=dict(sorted(precision_seconds.items(), key=lambda item: STAGES.index(item[0]))),
    )
