"""Wall-clock speed of a sampler: seconds per image and images per second at a fixed batch.

IBMD's claim is fewer network evaluations at equal quality; the speed-up that matters to a user
is wall-clock time. A sampling callable is timed at one batch size, after warm-up calls that are
not counted (they pay for lazy initialisation, kernel selection and caches), several times, and
the median is reported so a single disturbed repeat does not move the result. On CUDA the
device is synchronised before and after each call, so asynchronous kernels are counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ibmd_pipeline.engine.devices import cpu_model


@dataclass(frozen=True)
class SamplingSpeed:
    """Timings of one sampler at one batch size (``seconds_per_batch``: each timed repeat)."""

    batch_size: int
    seconds_per_batch: tuple[float, ...]
    device: str

    @property
    def median_seconds_per_batch(self) -> float:
        return statistics.median(self.seconds_per_batch)

    @property
    def seconds_per_image(self) -> float:
        return self.median_seconds_per_batch / self.batch_size

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.median_seconds_per_batch

    def as_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready summary."""
        return {
            **asdict(self),
            "seconds_per_batch": list(self.seconds_per_batch),
            "repeats": len(self.seconds_per_batch),
            "seconds_per_image": self.seconds_per_image,
            "images_per_second": self.images_per_second,
        }


def device_description(device: str | torch.device = "cpu") -> str:
    """A human-readable description of where timings were taken, e.g. ``"cuda:0 (NVIDIA H100)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return str(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(
    sample: Callable[[], Any],
    batch_size: int,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_repeats: int = 1000,
) -> SamplingSpeed:
    """Time ``sample()`` (which produces one batch of ``batch_size`` images) at least ``repeats`` times.

    ``warmup`` calls run first and are not counted. Timing goes on past ``repeats`` until the
    timed calls add up to ``min_seconds`` (at most ``max_repeats`` calls): a one-step sampler's
    call lasts milliseconds, and a median of three such calls moves with every scheduler hiccup,
    which would put noise straight into the speed-up over a 100-step teacher. ``device`` is where
    ``sample`` computes; on CUDA it is synchronised around every timed call.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0 or min_seconds < 0 or max_repeats < repeats:
        raise ValueError(
            "need batch_size >= 1, repeats >= 1, warmup >= 0, min_seconds >= 0, max_repeats >= repeats; "
            f"got {batch_size}, {repeats}, {warmup}, {min_seconds}, {max_repeats}"
        )
    device = torch.device(device)
    for _ in range(warmup):
        sample()
    _synchronize(device)
    timings: list[float] = []
    while len(timings) < repeats or (sum(timings) < min_seconds and len(timings) < max_repeats):
        start = time.perf_counter()
        sample()
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return SamplingSpeed(batch_size, tuple(timings), device_description(device))


def speedup(baseline: SamplingSpeed | float, candidate: SamplingSpeed | float) -> float:
    """How many times faster ``candidate`` is than ``baseline`` (ratio of seconds per image).

    Floats are read as seconds per image.
    """
    base = baseline.seconds_per_image if isinstance(baseline, SamplingSpeed) else float(baseline)
    cand = candidate.seconds_per_image if isinstance(candidate, SamplingSpeed) else float(candidate)
    if base <= 0 or cand <= 0:
        raise ValueError(f"seconds per image must be positive, got {base} and {cand}")
    return base / cand
