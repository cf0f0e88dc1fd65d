"""What the evaluation report's intervals cost: the whole-set metrics (FID, KID and their
classifier-feature versions) of every model on every half-sample, as the default run computes
them, on one BLAS thread (as the report does) against the BLAS library's default thread count.

Random features of the default run's shapes stand in for a run's (the cost does not depend on
the values): ``--models`` models (teacher at NFE 1, 10, 100 and the student) and the corrupted
input, ``evaluate.num_images`` images, ``evaluate.fid.num_images`` Inception features of
``evaluate.fid.dims`` against ``evaluate.fid.reference_images`` reference features, the
classifier's ``embedding_dim`` features, ``evaluate.bootstrap.resamples`` resamples. Each
setting is timed ``--repeats`` times, alternating; the table gives median and range.

    python benchmarks/report_cost.py [--models 4] [--repeats 3] [--resamples 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ibmd_pipeline.budget.probe import random_measurement  # noqa: E402
from ibmd_pipeline.evaluation.config import BootstrapSettings, parse_evaluate_config  # noqa: E402
from ibmd_pipeline.evaluation.summary import Summarizer  # noqa: E402
from ibmd_pipeline.metrics.speed import device_description  # noqa: E402


def report_seconds(evaluate, models: int, resamples: int, one_thread: bool) -> float:
    rng = np.random.default_rng(0)
    images = evaluate.num_images
    measurements = [random_measurement(f"model{i}", evaluate, images, rng) for i in range(models + 1)]
    inception = rng.random((evaluate.fid.reference_images, evaluate.fid.dims), dtype=np.float32)
    classifier = rng.random((images, evaluate.ca.classifier.embedding_dim), dtype=np.float32)
    settings = BootstrapSettings(resamples=resamples)
    threads = 1 if one_thread else None  # the report's setting, or the BLAS library's default
    summarizer = Summarizer(settings, evaluate.kid, inception, False, classifier, blas_threads=threads)
    begin = time.perf_counter()
    for measurement in measurements:
        summarizer.summarize(measurement)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=300)
    args = parser.parse_args()
    import yaml

    conf = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "conf/base/parameters_evaluate.yml").read_text()
    )
    evaluate = parse_evaluate_config(conf["evaluate"])
    seconds: dict[str, list[float]] = {"one BLAS thread (the report)": [], "BLAS default threads": []}
    for _ in range(args.repeats):
        for name in seconds:
            seconds[name].append(
                report_seconds(evaluate, args.models, args.resamples, name.startswith("one"))
            )
    print(f"device: {device_description('cpu')}")
    print(
        f"{args.models} models + corrupted input, {evaluate.num_images} images, Inception "
        f"{evaluate.fid.num_images} x {evaluate.fid.dims} against {evaluate.fid.reference_images}, "
        f"{args.resamples} resamples, {args.repeats} runs each"
    )
    print("| setting | median s | min-max s |")
    print("|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")


if __name__ == "__main__":
    main()
