"""Sampler timing: warm-up excluded, median of repeats, per-image arithmetic, speed-up."""

from __future__ import annotations

import json
import time

import pytest

from ibmd_pipeline.metrics import speed


def test_warmup_is_excluded_and_the_median_ignores_one_slow_repeat():
    calls = []

    def sample():
        calls.append(None)
        # First call (warm-up) and the third timed call are slow; the others take ~20 ms.
        time.sleep(0.3 if len(calls) in (1, 4) else 0.02)

    result = speed.time_sampling(sample, batch_size=4, repeats=5, warmup=1)
    assert len(calls) == 6 and len(result.seconds_per_batch) == 5
    assert max(result.seconds_per_batch) >= 0.3
    assert 0.02 <= result.median_seconds_per_batch < 0.15
    assert result.seconds_per_image == pytest.approx(result.median_seconds_per_batch / 4)
    assert result.images_per_second == pytest.approx(4 / result.median_seconds_per_batch)
    summary = result.as_dict()
    assert json.loads(json.dumps(summary))["repeats"] == 5
    assert summary["device"].startswith("cpu (")


def test_fast_calls_are_timed_until_min_seconds_of_work():
    calls = []

    def sample():
        calls.append(None)
        time.sleep(0.01)

    result = speed.time_sampling(sample, batch_size=2, repeats=3, warmup=0, min_seconds=0.2)
    assert len(result.seconds_per_batch) == len(calls)
    assert sum(result.seconds_per_batch) >= 0.2
    assert 10 <= len(calls) <= 21  # ~10 ms each: about 20 calls, never stopped at `repeats`
    capped = speed.time_sampling(sample, batch_size=2, repeats=3, warmup=0, min_seconds=60, max_repeats=5)
    assert len(capped.seconds_per_batch) == 5
    slow = speed.time_sampling(lambda: time.sleep(0.05), batch_size=1, repeats=3, min_seconds=0.01)
    assert len(slow.seconds_per_batch) == 3  # `repeats` alone when they already exceed min_seconds


def test_speedup_is_the_ratio_of_seconds_per_image():
    slow = speed.SamplingSpeed(batch_size=2, seconds_per_batch=(4.0, 4.0, 5.0), device="cpu")
    fast = speed.SamplingSpeed(batch_size=8, seconds_per_batch=(1.0, 2.0, 1.0), device="cpu")
    assert slow.seconds_per_image == 2.0 and fast.seconds_per_image == 0.125
    assert speed.speedup(slow, fast) == pytest.approx(16.0)
    assert speed.speedup(1.0, 0.25) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        speed.speedup(1.0, 0.0)


def test_invalid_timing_arguments_are_rejected():
    with pytest.raises(ValueError):
        speed.time_sampling(lambda: None, batch_size=0)
    with pytest.raises(ValueError):
        speed.time_sampling(lambda: None, batch_size=1, repeats=0)
    with pytest.raises(ValueError):
        speed.time_sampling(lambda: None, batch_size=1, min_seconds=-1.0)
    with pytest.raises(ValueError):
        speed.time_sampling(lambda: None, batch_size=1, repeats=5, max_repeats=4)
