"""Sampler timing: warm-up excluded, median of repeats, per-image arithmetic, speed-up."""

from __future__ import annotations

import json
import time

import pytest
import torch

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


class FakeClock:
    """A clock that each timed call advances by that call's fixed duration: no real time is measured."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def call(self, label, seconds):
        def run():
            self.log.append(label)
            self.now += seconds

        return run


def test_round_robin_rotates_the_order_and_reports_median_and_iqr():
    clock = FakeClock()
    durations = {"a": 0.5, "b": 0.1, "c": 0.2}
    calls = {label: clock.call(label, seconds) for label, seconds in durations.items()}
    timings = speed.time_round_robin(calls, rounds=3, warmup=2, min_seconds=0.0, clock=clock)
    # warm-up: 2 untimed calls each; calibration: 1 each; then the rounds, rotated by one per round
    assert clock.log == ["a", "a", "b", "b", "c", "c", "a", "b", "c", *"abc", *"bca", *"cab"]
    for label, seconds in durations.items():
        assert timings[label].seconds == pytest.approx((seconds,) * 3)
        assert timings[label].median == pytest.approx(seconds) and timings[label].iqr == pytest.approx(0.0)
        assert timings[label].loops == 1


def test_round_robin_shows_a_bar_with_the_remaining_time(capsys):
    clock = FakeClock()
    calls = {label: clock.call(label, 0.1) for label in "ab"}
    speed.time_round_robin(calls, rounds=3, warmup=1, min_seconds=0.0, clock=clock, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    # 2 calls x (1 warm-up + 1 sizing + 3 rounds) measurements, with tqdm's elapsed<remaining
    assert any(line.startswith("timing: 100%") and "10/10 [" in line and "<" in line for line in bar)


def test_short_calls_are_repeated_to_fill_a_measurement():
    clock = FakeClock()
    calls = {"fast": clock.call("fast", 0.01), "slow": clock.call("slow", 0.3)}
    timings = speed.time_round_robin(calls, rounds=2, warmup=0, min_seconds=0.25, clock=clock)
    assert timings["fast"].loops == 25 and timings["slow"].loops == 1
    assert clock.log.count("fast") == 1 + 2 * 25 and clock.log.count("slow") == 1 + 2
    assert timings["fast"].median == pytest.approx(0.01)  # per call, not per measurement


def test_median_and_iqr_of_uneven_rounds():
    timing = speed.RoundRobinTiming(seconds=(1.0, 2.0, 3.0, 4.0, 10.0), loops=1)
    assert timing.median == 3.0
    assert timing.iqr == pytest.approx(4.0 - 2.0)  # numpy's linear percentiles


def test_the_thread_count_is_fixed_while_timing_and_restored(monkeypatch):
    seen = []
    before = torch.get_num_threads()
    calls = {"probe": lambda: seen.append(torch.get_num_threads())}
    speed.time_round_robin(calls, rounds=1, warmup=0, threads=1)
    assert seen == [1, 1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        speed.time_round_robin(calls, rounds=1, threads=0)
    with pytest.raises(ValueError, match="at least one call"):
        speed.time_round_robin({}, rounds=1)
