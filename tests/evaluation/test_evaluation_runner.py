"""Running the teacher and the student on the same images and seeds, and the report they produce."""

import copy
import json
import math

import pytest
import torch
from evaluation_fakes import make_pairs, make_student, make_teacher, tiny_config

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.distill.student import student_from_checkpoint
from ibmd_pipeline.distill.validation import energy_distance
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.evaluation import (
    DIRECTIONS,
    PSNR_CAP_DB,
    MetricSuite,
    ModelRun,
    StaleReferenceError,
    batch_seed,
    check_report,
    compute_fid_reference,
    evaluate_teacher,
    metrics_table,
    prepare_evaluation,
    restore_images,
    run_evaluation,
    seeded_inputs,
    time_models,
    train_reference_classifier,
)
from ibmd_pipeline.evaluation import measure as measure_module
from ibmd_pipeline.io.datasets import TorchCheckpointDataset
from ibmd_pipeline.metrics.uncertainty import verdict
from ibmd_pipeline.teacher.model import CheckpointMismatchError, teacher_from_checkpoint

#: Report entries that measure the machine, not the models (as the reliability tests define them).
TIMING_WORDS = ("sec_per", "per_sec", "speedup", "seconds", "elapsed", "device")
NUMBER_OR_NULL = (float, type(None))
RECORD_TYPES = {
    "model": str,
    "nfe": int,
    "label": str,
    "seed": int,
    "seeds": list,
    "images": int,
    "intervals": dict,
    "fid": float,
    "kid": float,
    "kid_std": float,
    "fd_classifier": float,
    "kid_classifier": float,
    "kid_classifier_std": float,
    "lpips": float,
    "ca": float,
    "psnr": float,
    "ssim": float,
    "consistency": float,
    "energy_distance": float,
    "diversity": float,
    "sec_per_image": float,
    "sec_per_image_iqr": float,
    "images_per_sec": float,
    "latency_seconds": float,
    "latency_iqr_seconds": float,
}


def evaluate(pairs, teacher, student, references, config=None, **kwargs):
    return run_evaluation(
        pairs,
        teacher,
        student,
        config or tiny_config(),
        fid_reference=references["fid"],
        classifier=references["classifier"],
        progress=False,
        **kwargs,
    )


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(w in k for w in TIMING_WORDS)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def result(pairs_test, teacher_sr, student_sr, references):
    return evaluate(
        pairs_test, teacher_sr, student_sr, references, tiny_config(num_seeds=2), dataset="toy shapes"
    )


def test_the_report_matches_its_declaration_and_holds_every_metric(result):
    report = result.report
    check_report(report)  # every declared key, nothing undeclared, at every depth
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert [r["label"] for r in report["records"]] == ["teacher@1", "teacher@3", "student@1"]
    for record in report["records"]:
        for key, kind in RECORD_TYPES.items():
            assert isinstance(record[key], kind), (record["label"], key, record[key])
        assert record["seeds"] == [0, 1] and record["images"] == 8
        assert record["ca"] in {100.0 * k / 16 for k in range(17)}  # percent of 8 images x 2 seeds
        assert record["images_per_sec"] == pytest.approx(1 / record["sec_per_image"])
        for metric, (low, high) in record["intervals"].items():
            assert math.isfinite(low) and low <= high, (record["label"], metric)
    assert [r["sampler"] for r in report["records"]] == ["ancestral", "ancestral", None]
    assert (report["task"], report["dataset"], report["num_images"]) == ("sr4x_bicubic", "toy shapes", 8)
    assert report["checkpoints"] == {
        "teacher": "teacher-v1",
        "student": "student-v1",
        "classifier": "classifier-v1",
        "teacher_of_student": "teacher-v1",
        "teacher_evaluation": None,
    }
    protocol = report["protocol"]
    assert protocol["seeds"] == [0, 1] and protocol["inception_images"] == 8
    assert protocol["closeness"] == {"teacher": "teacher@3", "images": 4, "draws": 4}
    assert report["fid"] == {"dims": 64, "reference": "disjoint", "reference_images": 16}
    assert report["reasons"] == {} and report["corrupted_input"]["energy_distance"] is None
    assert report["speed"]["baseline"] == "teacher@3" and report["speed"]["batch_size"] == 2
    assert report["grid_columns"] == ["corrupted", "teacher NFE 1", "teacher NFE 3", "student NFE 1", "clean"]


def test_a_drift_from_the_declaration_is_named(result):
    drifted = copy.deepcopy(result.report)
    del drifted["records"][1]["ssim"]
    drifted["speed"]["median"] = 1.0
    drifted["comparisons"][0]["metrics"]["psnr"]["p"] = 0.5
    with pytest.raises(ValueError) as err:
        check_report(drifted)
    text = str(err.value)
    assert "records[1].ssim: missing" in text and "speed.median: not declared" in text
    assert "comparisons[0].metrics.psnr.p: not declared" in text


def test_every_model_restores_the_same_inputs_at_every_seed(
    monkeypatch, pairs_test, teacher_sr, student_sr, references
):
    calls = []
    original = measure_module.restore_images

    def spy(run, xT, mask, **kwargs):
        calls.append((run.label, kwargs["seed"], xT.clone(), kwargs["batch_size"]))
        return original(run, xT, mask, **kwargs)

    monkeypatch.setattr(measure_module, "restore_images", spy)
    config = tiny_config(num_seeds=2, fid={"enabled": False})
    result = evaluate(pairs_test, teacher_sr, student_sr, references, config)
    # seeds 0 and 1 restore the 8 evaluated images; draw seeds 2 and 3 only the 4 closeness images
    expected = [(label, seed) for label in ("teacher@1", "teacher@3", "student@1") for seed in range(4)]
    assert [(c[0], c[1]) for c in calls] == expected
    for label, seed, xT, batch_size in calls:
        count = 8 if seed < 2 else 4
        assert torch.equal(xT, pairs_test["corrupted"][:count]) and batch_size == 4, (label, seed)
    # the kept samples are the sampler's output for a generator seeded with the first seed
    teacher = teacher_from_checkpoint(teacher_sr)
    expected = sample(
        teacher.predictor,
        pairs_test["corrupted"][:4],
        teacher.schedule,
        3,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(result.samples["teacher@3"], expected[:3])


def test_a_rerun_gives_identical_numbers_apart_from_timings(
    result, pairs_test, teacher_sr, student_sr, references
):
    again = evaluate(
        pairs_test, teacher_sr, student_sr, references, tiny_config(num_seeds=2), dataset="toy shapes"
    )
    assert without_timings(again.report) == without_timings(result.report)
    assert all(torch.equal(again.samples[key], result.samples[key]) for key in result.samples)
    # another seed gives other samples from the stochastic (ancestral) teacher chain
    other = evaluate(
        pairs_test, teacher_sr, student_sr, references, tiny_config(seed=5, fid={"enabled": False})
    )
    assert not torch.equal(other.samples["teacher@3"], result.samples["teacher@3"])


def test_each_verdict_is_the_one_its_interval_gives(result):
    records = {r["label"]: r for r in result.report["records"]}
    comparisons = result.report["comparisons"]
    assert [(c["candidate"], c["baseline"]) for c in comparisons] == [
        ("student@1", "teacher@1"),
        ("student@1", "teacher@3"),
    ]
    for comparison in comparisons:
        candidate, baseline = records[comparison["candidate"]], records[comparison["baseline"]]
        assert comparison["images"] == 8
        assert set(comparison["metrics"]) == set(DIRECTIONS)
        for metric, entry in comparison["metrics"].items():
            # the difference of the two reported values, on the same images (and subsets for KID)
            assert entry["difference"] == pytest.approx(candidate[metric] - baseline[metric], abs=1e-12)
            assert entry["verdict"] == verdict(tuple(entry["interval"]), DIRECTIONS[metric])
        win = comparison["lpips_win_rate"]
        assert 0.0 <= win["rate"] <= 1.0 and win["rate"] in {k / 16 for k in range(17)}  # halves for ties
        assert set(comparison["ca_mcnemar"]) == {"a_only", "b_only", "p_value"}
    assert records["student@1"]["lpips_win_rate"] == comparisons[1]["lpips_win_rate"]["rate"]


def test_closeness_is_the_energy_distance_to_the_reference_teachers_draws(
    result, pairs_test, teacher_sr, student_sr
):
    teacher = teacher_from_checkpoint(teacher_sr)
    student = student_from_checkpoint(student_sr)
    xT = pairs_test["corrupted"][:4]

    def draws(restore):
        return torch.stack([restore(xT, torch.Generator().manual_seed(seed)) for seed in range(4)])

    teacher_draws = draws(lambda x, g: sample(teacher.predictor, x, teacher.schedule, 3, generator=g))
    student_draws = draws(lambda x, g: student.sample(x, generator=g))
    records = {r["label"]: r for r in result.report["records"]}
    expected = energy_distance(student_draws, teacher_draws).mean().item()
    assert records["student@1"]["energy_distance"] == pytest.approx(expected, rel=1e-9)
    # the reference itself: half of its draws against the other half
    expected_self = energy_distance(teacher_draws[:2], teacher_draws[2:]).mean().item()
    assert records["teacher@3"]["energy_distance"] == pytest.approx(expected_self, rel=1e-9)
    diversity = teacher_draws.std(dim=0).flatten(1).mean(1).mean().item()
    assert records["teacher@3"]["diversity"] == pytest.approx(diversity, rel=1e-6) and diversity > 0
    # the one-step teacher is the posterior mean: deterministic, its draws have no spread
    assert records["teacher@1"]["diversity"] == pytest.approx(0.0, abs=1e-6)


def test_ca_ceiling_and_floor_are_the_classifier_on_clean_and_corrupted_images(result, references):
    facts = result.report["classifier"]
    assert facts["floor"] == result.report["corrupted_input"]["ca"] and facts["reason"] is None
    assert facts["clean_test_accuracy"] == references["classifier"]["clean_test_accuracy"]  # whole split
    assert facts["ceiling"] in {100.0 * k / 8 for k in range(9)}


def test_psnr_of_identical_images_is_capped_so_the_json_stays_standard(pairs_test):
    suite = MetricSuite(fid=None, lpips=None, classifier=None)
    clean = pairs_test["clean"]
    scores = suite.score(clean, clean.clone(), None)
    assert scores["psnr"] == PSNR_CAP_DB and scores["ssim"] == pytest.approx(1.0)
    assert scores["fid"] is scores["lpips"] is scores["ca"] is None
    noisy = suite.score((clean + 0.1).clamp(-1, 1), clean, None)["psnr"]
    assert noisy < PSNR_CAP_DB and math.isfinite(noisy)


def test_disabled_metrics_are_null_with_a_reason_and_need_no_weights(
    monkeypatch, pairs_test, teacher_sr, student_sr
):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.FIDScorer", pytest.fail)
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.LPIPSScorer", pytest.fail)
    config = tiny_config(
        fid={"enabled": False}, lpips={"enabled": False}, ca={"enabled": False}, closeness={"enabled": False}
    )
    report = run_evaluation(
        pairs_test, teacher_sr, student_sr, config, fid_reference=None, classifier=None, progress=False
    ).report
    for record in [*report["records"], report["corrupted_input"]]:
        for metric in ("fid", "kid", "fd_classifier", "kid_classifier", "lpips", "ca", "energy_distance"):
            assert record[metric] is None and metric not in record["intervals"]
        assert record["psnr"] is not None and record["ssim"] is not None and record["consistency"] is not None
    assert report["reasons"] == {
        "fid": "disabled (evaluate.fid.enabled: false)",
        "kid": "disabled (evaluate.fid.enabled: false)",
        "fd_classifier": "disabled (evaluate.ca.enabled: false)",
        "kid_classifier": "disabled (evaluate.ca.enabled: false)",
        "lpips": "disabled (evaluate.lpips.enabled: false)",
        "ca": "disabled (evaluate.ca.enabled: false)",
        "energy_distance": "disabled (evaluate.closeness.enabled: false)",
        "diversity": "disabled (evaluate.closeness.enabled: false)",
    }
    assert report["weights"] == {"fid": None, "lpips": None} and report["fid"]["dims"] is None
    assert set(report["comparisons"][0]["metrics"]) == {"psnr", "ssim", "consistency"}


def test_unlabelled_data_drops_the_classifier_metrics_and_keeps_kid(
    teacher_sr, student_sr, pairs_train, references
):
    pairs = make_pairs(12, labelled=False)  # the same clean images, without labels
    unlabelled_train = make_pairs(20, labelled=False, split="train")
    classifier = train_reference_classifier(unlabelled_train, pairs, tiny_config())
    report = evaluate(pairs, teacher_sr, student_sr, {**references, "classifier": classifier}).report
    for record in [*report["records"], report["corrupted_input"]]:
        assert record["ca"] is record["fd_classifier"] is record["kid_classifier"] is None
        assert isinstance(record["kid"], float) and isinstance(record["fid"], float)
    assert (
        "no class labels" in report["reasons"]["ca"]
        and report["reasons"]["fd_classifier"] == report["reasons"]["ca"]
    )
    assert report["classifier"] == {
        "ceiling": None,
        "floor": None,
        "reason": report["reasons"]["ca"],
        "clean_test_accuracy": None,
    }
    assert "ca_mcnemar" not in report["comparisons"][0]


def test_images_too_small_for_a_metric_give_it_null_with_a_reason():
    # 8-px images: SSIM's 11-px window does not fit, nor the classifier's 4 pooling stages (16 px)
    teacher = make_teacher(image_size=8)
    student = make_student(teacher, nfe=1)
    pairs, pairs_train = make_pairs(10, size=8), make_pairs(20, size=8, split="train")
    config = tiny_config(ca={"classifier": {"channels": [4, 4, 4, 4], "embedding_dim": 4}})
    classifier = train_reference_classifier(pairs_train, pairs, config)
    fid = compute_fid_reference(pairs, config, pairs_train=pairs_train)
    report = run_evaluation(
        pairs, teacher, student, config, fid_reference=fid, classifier=classifier, progress=False
    ).report
    assert "16 px" in report["reasons"]["ca"] and "11-px window" in report["reasons"]["ssim"]
    for record in report["records"]:
        assert record["ssim"] is None and record["ca"] is None and record["fd_classifier"] is None
        assert isinstance(record["lpips"], float) and isinstance(record["kid"], float)  # LPIPS upsamples


def test_mismatches_and_stale_references_fail_before_any_sampling(
    monkeypatch, pairs_test, teacher_sr, student_sr, references
):
    monkeypatch.setattr(measure_module, "restore_images", pytest.fail)
    monkeypatch.setattr(measure_module.MetricSuite, "build", pytest.fail)
    with pytest.raises(CheckpointMismatchError, match="task 'jpeg'"):
        evaluate(pairs_test, make_teacher("jpeg"), student_sr, references)
    with pytest.raises(CheckpointMismatchError, match="image_size 32"):
        evaluate(pairs_test, make_teacher(image_size=32), student_sr, references)
    with pytest.raises(CheckpointMismatchError, match="expected a student checkpoint"):
        evaluate(pairs_test, teacher_sr, teacher_sr, references)
    jpeg_pairs = make_pairs(12, "jpeg")
    with pytest.raises(CheckpointMismatchError, match="teacher checkpoint was built for task 'sr4x_bicubic'"):
        evaluate(jpeg_pairs, teacher_sr, student_sr, references)
    with pytest.raises(ConfigError) as err:
        evaluate(pairs_test, teacher_sr, student_sr, references, tiny_config(student_nfe=[1, 2]))
    assert err.value.key == "evaluate.student_nfe"
    with pytest.raises(StaleReferenceError, match="evaluate_reference"):
        evaluate(pairs_test, teacher_sr, student_sr, references, tiny_config(fid={"dims": 192}))


def test_inpainting_keeps_the_known_pixels_and_refills_the_hole_at_each_seed(pairs_test, references):
    teacher = make_teacher("inpaint_center")
    student = make_student(teacher, nfe=2)
    pairs = make_pairs(12, "inpaint_center")  # same clean images as pairs_test: same references
    result = evaluate(pairs, teacher, student, references, tiny_config(fid={"enabled": False}))
    assert [r["label"] for r in result.report["records"]][2:] == ["student@1", "student@2"]
    known = pairs["mask"][:3] == 0
    assert torch.equal(result.samples["mask"], pairs["mask"][:3])
    xT = seeded_inputs(pairs["corrupted"][:3], pairs["mask"][:3], seed=0)
    for label in ("teacher@1", "teacher@3", "student@1", "student@2"):
        restored = result.samples[label]
        where = known.expand_as(restored)
        assert torch.equal(restored[where], pairs["corrupted"][:3][where])
    # consistency is the error on the known pixels, which every model copies from xT
    assert all(r["consistency"] == pytest.approx(0.0, abs=1e-7) for r in result.report["records"])
    # the fill is drawn from the seed: known pixels stay, the hole changes
    other = seeded_inputs(pairs["corrupted"][:3], pairs["mask"][:3], seed=1)
    assert torch.equal(other[known.expand_as(other)], xT[known.expand_as(xT)])
    assert not torch.equal(other, xT)
    # draws differ only through the fill for this student without z: a spread, not a point
    assert all(r["diversity"] > 0 for r in result.report["records"])


def test_a_further_teacher_sampler_gets_its_own_rows_and_comparisons(
    pairs_test, teacher_sr, student_sr, references
):
    config = tiny_config(teacher_modes=["deterministic"], fid={"enabled": False})
    report = evaluate(pairs_test, teacher_sr, student_sr, references, config).report
    labels = [r["label"] for r in report["records"]]
    assert labels == [
        "teacher@1",
        "teacher@3",
        "teacher_deterministic@1",
        "teacher_deterministic@3",
        "student@1",
    ]
    modes = [r for r in report["records"] if r["model"] == "teacher_deterministic"]
    assert all(r["sampler"] == "deterministic" for r in modes) and report["models"]["teacher"][
        "samplers"
    ] == ["ancestral", "deterministic"]
    assert (
        len(report["comparisons"]) == 4 and report["comparisons"][3]["baseline"] == "teacher_deterministic@3"
    )
    assert set(report["records"][-1]["speedup_vs_teacher"]) == {"1", "3"}  # against the main sampler


def test_a_slow_teacher_nfe_may_restore_fewer_images(pairs_test, teacher_sr, student_sr, references):
    config = tiny_config(teacher_max_images={3: 5}, closeness={"num_images": 8, "draws": 4})
    report = evaluate(pairs_test, teacher_sr, student_sr, references, config).report
    records = {r["label"]: r for r in report["records"]}
    assert records["teacher@3"]["images"] == 5 and records["student@1"]["images"] == 8
    by_baseline = {c["baseline"]: c for c in report["comparisons"]}
    assert by_baseline["teacher@3"]["images"] == 5 and by_baseline["teacher@1"]["images"] == 8
    # the difference is taken on the common 5 images, not between the two reported values
    assert by_baseline["teacher@3"]["metrics"]["psnr"]["difference"] != pytest.approx(
        records["student@1"]["psnr"] - records["teacher@3"]["psnr"]
    )


def test_a_cached_teacher_evaluation_gives_the_same_report(
    result, pairs_test, teacher_sr, student_sr, references, tmp_path
):
    config = tiny_config(num_seeds=2)
    bundle = evaluate_teacher(
        pairs_test,
        teacher_sr,
        config,
        fid_reference=references["fid"],
        classifier=references["classifier"],
        progress=False,
    )
    dataset = TorchCheckpointDataset(filepath=str(tmp_path / "teacher_evaluation.pt"))
    dataset.save(bundle)
    cached = dataset.load()  # loads weights-only
    again = evaluate(
        pairs_test,
        teacher_sr,
        student_sr,
        references,
        config,
        dataset="toy shapes",
        teacher_evaluation=cached,
    )
    fresh = without_timings(result.report)
    assert without_timings(again.report) == {**fresh, "checkpoints": again.report["checkpoints"]}
    assert all(torch.equal(again.samples[key], result.samples[key]) for key in result.samples)

    with pytest.raises(StaleReferenceError, match=r"settings.seeds: cached \[0, 1\], needed \[0\]"):
        evaluate(pairs_test, teacher_sr, student_sr, references, tiny_config(), teacher_evaluation=cached)
    other_teacher = make_teacher(seed=4)
    other_teacher["catalog_version"] = "teacher-v2"
    with pytest.raises(StaleReferenceError, match='teacher: cached "teacher-v1", needed "teacher-v2"'):
        evaluate(pairs_test, other_teacher, student_sr, references, config, teacher_evaluation=cached)


class CountingRun:
    """A ModelRun's restore that records its batches and returns a constant image."""

    def __init__(self, value: float = 0.0):
        self.batches = []
        self.value = value

    def __call__(self, xT, mask, generator):
        self.batches.append((xT.clone(), generator.initial_seed()))
        return torch.full_like(xT, self.value)


def test_every_model_is_timed_at_batch_one_and_at_the_throughput_batch(
    pairs_test, teacher_sr, student_sr, references
):
    config = tiny_config(speed={"batch_size": 20, "repeats": 3, "warmup": 2, "min_seconds": 0.0}, seed=9)
    setup = prepare_evaluation(
        pairs_test,
        teacher_sr,
        student_sr,
        config,
        fid_reference=references["fid"],
        classifier=references["classifier"],
        progress=False,
        suite=MetricSuite(None, None, None),
    )
    restores = {"teacher": CountingRun(), "student": CountingRun()}
    runs = [ModelRun(name, 1, restore) for name, restore in restores.items()]
    timings = time_models(setup, runs)
    assert set(timings) == {"teacher@1", "student@1"}
    for label in timings:
        assert set(timings[label]) == {"latency", "throughput"}
        assert len(timings[label]["latency"].seconds) == 3 and timings[label]["throughput"].loops == 1
    for restore in restores.values():
        sizes = [xT.shape[0] for xT, _ in restore.batches]
        # 2 warm-up calls and 1 loop calibration per call, then 3 rounds, for each of the two batches
        assert sorted(sizes) == [1] * 6 + [20] * 6 and {seed for _, seed in restore.batches} == {9}
        batch = next(xT for xT, _ in restore.batches if xT.shape[0] == 20)
        assert torch.equal(batch[8:16], pairs_test["corrupted"][:8])  # fewer images than the batch: repeated


def test_restore_images_batches_and_rejects_non_finite_output(pairs_test):
    restore = CountingRun()
    run = ModelRun("student", 1, restore)
    images = restore_images(run, pairs_test["corrupted"], None, batch_size=5, seed=3)
    assert [b[0].shape[0] for b in restore.batches] == [5, 5, 2]
    assert images.shape == pairs_test["corrupted"].shape
    # one generator per batch: seed 3 for the batch of image 0, then one per first image index
    assert [b[1] for b in restore.batches] == [batch_seed(3, 0), batch_seed(3, 5), batch_seed(3, 10)]
    assert batch_seed(3, 0) == 3 and len({batch_seed(s, i) for s in range(4) for i in (0, 5, 10)}) == 12
    with pytest.raises(FloatingPointError, match="student@1 produced non-finite"):
        restore_images(
            ModelRun("student", 1, CountingRun(float("nan"))),
            pairs_test["corrupted"],
            None,
            batch_size=5,
            seed=3,
        )


def test_the_report_records_each_model_s_training_precision(pairs_test, teacher_sr, student_sr, references):
    teacher = {**teacher_sr, "autocast_bf16": True}
    student = {**student_sr, "autocast_bf16": False}
    config = tiny_config(fid={"enabled": False}, lpips={"enabled": False})
    models = evaluate(pairs_test, teacher, student, references, config).report["models"]
    assert models["teacher"]["trained_bf16"] is True and models["student"]["trained_bf16"] is False
    unrecorded = {k: v for k, v in teacher_sr.items() if k != "autocast_bf16"}  # e.g. imported
    models = evaluate(pairs_test, unrecorded, student, references, config).report["models"]
    assert models["teacher"]["trained_bf16"] is None


def test_the_report_records_the_training_steps_that_ran(pairs_test, teacher_sr, student_sr, references):
    # after a time budget, the checkpoints' step counts are what ran (not the configured ones)
    teacher = {**teacher_sr, "step": 1050, "autocast_bf16": False}
    student = {**student_sr, "step": 150, "autocast_bf16": False}
    config = tiny_config(fid={"enabled": False}, lpips={"enabled": False})
    report = evaluate(pairs_test, teacher, student, references, config).report
    assert report["models"]["teacher"]["trained_steps"] == 1050
    assert report["models"]["student"]["trained_steps"] == 150
    table = metrics_table(report)
    assert "Training: teacher 1,050 steps in float32, student 150 generator updates in float32." in table
    unrecorded = {k: v for k, v in teacher_sr.items() if k not in ("step", "autocast_bf16")}
    report = evaluate(pairs_test, unrecorded, student, references, config).report
    assert report["models"]["teacher"]["trained_steps"] is None
    assert "Training: teacher steps not recorded, student 150" in metrics_table(report)
