"""A distributed evaluation (2 gloo processes) gives the numbers of one process.

Both restore every image from the same input with the same generator (one per sampling batch,
``measure.batch_seed``) in the same batches (the ranks take whole batches), and the one process
runs with the thread count of each worker, so the restorations are equal bit for bit. (With
other thread counts they are not: a CPU convolution splits its dot products by thread.) With
``fid.batch_size`` equal to the sampling batch, every metric network sees the images in the same
batch compositions too. What may still differ is float rounding inside the metric networks, where
a CPU kernel may pick another blocking for a differently sized input. Each of Inception's
convolution layers sums at most ``INCEPTION_MAX_FAN_IN`` terms, each such sum is off by at most
``sum_rtol`` relative to its magnitude, and the errors of ``INCEPTION_DEPTH`` layers add up along
the network; every reported number is a smooth function of those features and per-image values,
which bounds its relative difference the same way.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from evaluation_fakes import tiny_config
from numerics import sum_rtol

from ibmd_pipeline.engine.distributed import DistContext
from ibmd_pipeline.evaluation import ModelRun, evaluate_teacher, restore_images, run_evaluation, shard_batches

# Inception v3: 3x3 convolutions over 448 channels (Mixed_7b/7c), 4032 terms, are its longest dot
# products; its deepest path has fewer than 48 convolutions.
INCEPTION_MAX_FAN_IN = 448 * 3 * 3
INCEPTION_DEPTH = 48
RTOL = INCEPTION_DEPTH * sum_rtol(INCEPTION_MAX_FAN_IN, torch.float32)
# Entries of the report that are the same settings in both runs or measure the machine.
SKIPPED = ("sec_per", "per_sec", "speedup", "seconds", "elapsed", "device", "notes", "config", "loops")


def _with_worker_threads(evaluate, *args, **kwargs):
    """``evaluate`` in this process with the thread count of each of 2 workers (engine.launch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        return evaluate(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _numbers(value, path=""):
    """Every number of a report by its path (timings and settings left out)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {path: value}
    found = {}
    for key, item in items:
        if not any(word in str(key) for word in SKIPPED):
            found.update(_numbers(item, f"{path}/{key}"))
    return found


def test_ranks_take_every_nth_whole_batch_and_cover_each_image_once():
    world = [DistContext(rank, rank, 3, torch.device("cpu"), rank == 0) for rank in range(3)]
    shards = [shard_batches(11, 2, ctx) for ctx in world]
    assert [[(p.start, p.stop) for p in shard] for shard in shards] == [
        [(0, 2), (6, 8)],
        [(2, 4), (8, 10)],
        [(4, 6), (10, 11)],
    ]
    assert shard_batches(11, 20, world[2]) == []  # a rank without a batch measures nothing


def test_a_batch_draws_the_same_noise_whichever_batches_were_restored_before_it():
    run = ModelRun("noise", 1, lambda xT, mask, generator: xT + torch.randn(xT.shape, generator=generator))
    xT = torch.zeros(11, 1, 4, 4)
    every = restore_images(run, xT, None, batch_size=2, seed=5)
    ctx = DistContext(1, 1, 2, torch.device("cpu"), False)
    parts = shard_batches(11, 2, ctx)  # images 2-3, 6-7 and 10
    alone = restore_images(run, xT, None, batch_size=2, seed=5, parts=parts)
    assert torch.equal(alone, torch.cat([every[p] for p in parts]))
    assert not torch.equal(every[0:2], every[2:4])  # and each batch has its own noise


def test_two_gloo_processes_give_the_numbers_of_one(pairs_test, teacher_sr, student_sr, references):
    # 10 images in batches of 4: rank 0 restores images 0-3 and 8-9, rank 1 images 4-7 (uneven)
    settings = {"num_images": 10, "num_seeds": 2, "fid": {"batch_size": 4}}
    one = tiny_config(**settings)
    two = tiny_config(**settings, distributed={"nproc_per_node": 2, "backend": "gloo", "timeout_s": 300})
    kwargs = {"fid_reference": references["fid"], "classifier": references["classifier"], "progress": False}
    single = _with_worker_threads(run_evaluation, pairs_test, teacher_sr, student_sr, one, **kwargs)
    spread = run_evaluation(pairs_test, teacher_sr, student_sr, two, **kwargs)

    for label, images in single.samples.items():
        assert torch.equal(spread.samples[label], images), label
    expected, got = _numbers(single.report), _numbers(spread.report)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        if isinstance(value, float) and not isinstance(value, bool):
            assert math.isclose(got[path], value, rel_tol=RTOL, abs_tol=RTOL), (path, got[path], value)
        else:
            assert got[path] == value, path
    assert np.isfinite(spread.report["records"][0]["fid"])
    assert any("2 processes" in note for note in spread.report["notes"])


def test_the_teacher_evaluation_of_two_gloo_processes_is_the_one_of_one(pairs_test, teacher_sr, references):
    # 6 images in batches of 4 at NFE 1: rank 0 restores images 0-3, rank 1 images 4-5
    settings = {"num_images": 6, "teacher_nfe": [1], "fid": {"batch_size": 4}}
    one = tiny_config(**settings)
    two = tiny_config(**settings, distributed={"nproc_per_node": 2, "backend": "gloo", "timeout_s": 300})
    kwargs = {"fid_reference": references["fid"], "classifier": references["classifier"], "progress": False}
    single = _with_worker_threads(evaluate_teacher, pairs_test, teacher_sr, one, **kwargs)
    spread = evaluate_teacher(pairs_test, teacher_sr, two, **kwargs)

    assert spread.keys() == single.keys() and spread["key"] == single["key"]  # reusable by either
    for name, value in single.items():
        if isinstance(value, torch.Tensor):
            assert spread[name].shape == value.shape, name
            torch.testing.assert_close(spread[name], value, rtol=RTOL, atol=RTOL, msg=name)
