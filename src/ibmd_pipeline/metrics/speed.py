"""Wall-clock speed of samplers: seconds per image and images per second at a fixed batch.

IBMD's claim is fewer network evaluations at equal quality; the speed-up that matters to a user
is wall-clock time. A sampling callable is timed at one batch size, after warm-up calls that are
not counted (they pay for lazy initialisation, kernel selection and caches), several times, and
the median is reported so a single disturbed repeat does not move the result. On CUDA the
device is synchronised before and after each call, so asynchronous kernels are counted.

:func:`time_round_robin` times several samplers *together*: one round times each of them once,
in an order rotated from round to round, so a slow phase of a shared machine (another job, a
throttled core) lands on every sampler alike instead of on whichever ran then. The thread
count is fixed while timing. Each sampler reports the median and the interquartile range of
its rounds; a speed-up is the ratio of two medians.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

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


@dataclass(frozen=True)
class RoundRobinTiming:
    """One sampler's rounds: ``seconds`` per call in each round (each measurement timed ``loops``
    consecutive calls and divided by ``loops``)."""

    seconds: tuple[float, ...]
    loops: int

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def iqr(self) -> float:
        """Interquartile range (75th minus 25th percentile, linear interpolation)."""
        low, high = np.percentile(self.seconds, [25.0, 75.0])
        return float(high - low)


def time_round_robin(
    calls: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    max_loops: int = 1000,
    progress: bool = False,
) -> dict[str, RoundRobinTiming]:
    """Time every call of ``calls`` (label -> callable) interleaved: ``rounds`` rounds, each timing
    every call once, the order rotated by one position per round.

    First every call runs ``warmup`` times untimed. Then each call is timed once to choose its
    ``loops``: the number of consecutive calls one measurement spans so that it lasts at least
    ``min_seconds`` (at most ``max_loops``), which steadies millisecond-long one-step calls.
    ``threads``: torch's CPU thread count while timing (restored afterwards); ``None`` keeps it.
    ``clock`` returns seconds (tests pass a fake one). ``progress``: a tqdm bar over the
    measurements (warm-up, sizing, every round) with the remaining time.
    """
    if not calls or rounds < 1 or warmup < 0 or min_seconds < 0 or max_loops < 1:
        raise ValueError(
            "need at least one call, rounds >= 1, warmup >= 0, min_seconds >= 0 and max_loops >= 1; "
            f"got {len(calls)}, {rounds}, {warmup}, {min_seconds}, {max_loops}"
        )
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    device = torch.device(device)
    labels = list(calls)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar = tqdm(total=len(labels) * (warmup + 1 + rounds), desc="timing", unit="call", disable=not progress)
    try:

        def measure(label: str, loops: int) -> float:
            _synchronize(device)
            start = clock()
            for _ in range(loops):
                calls[label]()
            _synchronize(device)
            return (clock() - start) / loops

        for label in labels:
            for _ in range(warmup):
                calls[label]()
                bar.update(1)
        loops = {}
        for label in labels:
            once = measure(label, 1)
            bar.update(1)
            needed = math.ceil(min_seconds / once) if once > 0 else max_loops
            loops[label] = min(max_loops, max(1, needed))
        seconds: dict[str, list[float]] = {label: [] for label in labels}
        for round_index in range(rounds):
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                seconds[label].append(measure(label, loops[label]))
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    return {label: RoundRobinTiming(tuple(seconds[label]), loops[label]) for label in labels}
