"""Running teacher and student on the same images and seeds, and the records they produce."""

import copy
import json
import math

import pytest
import torch
from evaluation_fakes import make_pairs, make_student, make_teacher, tiny_config

from ibmd_pipeline.bridges.samplers import sample
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.evaluation import (
    PSNR_CAP_DB,
    MetricSuite,
    ModelRun,
    StaleReferenceError,
    check_report,
    measure_speed,
    restore_images,
    run_evaluation,
    train_reference_classifier,
)
from ibmd_pipeline.evaluation import runner as runner_module
from ibmd_pipeline.metrics.classifier import classifier_accuracy, load_classifier
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.teacher.model import CheckpointMismatchError, teacher_from_checkpoint

RECORD_TYPES = {
    "model": str,
    "nfe": int,
    "fid": float,
    "lpips": (float, type(None)),
    "ca": float,
    "psnr": float,
    "ssim": float,
    "sec_per_image": float,
    "images_per_sec": float,
    "seed": int,
}
REPORT_KEYS = {
    "records", "task", "task_config", "dataset", "image_size", "channels", "num_images", "seed", "sampler",
    "device", "weights", "checkpoints", "models", "classifier", "corrupted_input", "reasons", "fid", "speed",
    "psnr_cap_db", "notes", "elapsed_seconds", "config", "grid_columns",
}
TIMING_RECORD_KEYS = ("sec_per_image", "images_per_sec", "speedup_vs_teacher")


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


def without_timings(report):
    report = copy.deepcopy(report)
    for record in report["records"]:
        for key in TIMING_RECORD_KEYS:
            record.pop(key, None)
    report["speed"].pop("seconds_per_batch")
    report.pop("elapsed_seconds")
    return report


@pytest.fixture(scope="module")
def result(pairs_test, teacher_sr, student_sr, references):
    return evaluate(pairs_test, teacher_sr, student_sr, references, dataset="toy shapes")


def test_records_have_every_key_with_its_type_and_are_standard_json(result):
    report = result.report
    assert set(report) == REPORT_KEYS
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    rows = [(r["model"], r["nfe"]) for r in report["records"]]
    assert rows == [("teacher", 1), ("teacher", 3), ("student", 1)]
    for record in report["records"]:
        assert set(record) - {"speedup_vs_teacher"} == set(RECORD_TYPES)
        for key, kind in RECORD_TYPES.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["sec_per_image"] > 0
        assert record["images_per_sec"] == pytest.approx(1 / record["sec_per_image"])
        assert 0 <= record["ssim"] <= 1 and record["psnr"] > 0 and record["fid"] >= 0
        # CA in percent of the 8 evaluated images
        assert record["ca"] in {100.0 * k / 8 for k in range(9)}
    assert (report["task"], report["dataset"], report["num_images"]) == ("sr4x_bicubic", "toy shapes", 8)
    assert report["checkpoints"] == {
        "teacher": "teacher-v1",
        "student": "student-v1",
        "classifier": "classifier-v1",
        "teacher_of_student": "teacher-v1",
    }
    assert report["weights"]["fid"].startswith(("official:", "offline:"))
    assert report["weights"]["lpips"] is None  # 16x16 images: below LPIPS' minimum size
    assert set(report["corrupted_input"]) == {"fid", "lpips", "ca", "psnr", "ssim"}
    assert report["speed"]["batch_size"] == 2 and report["speed"]["baseline"] == "teacher@3"
    assert report["fid"] == {"dims": 64, "reference": "evaluated", "reference_images": 8}
    assert report["grid_columns"][0] == "corrupted" and report["grid_columns"][-2:] == ["student@1", "clean"]


def test_the_report_matches_its_declaration_and_a_drift_is_named(result):
    check_report(result.report)  # every declared key, nothing undeclared, at every depth
    drifted = copy.deepcopy(result.report)
    del drifted["records"][1]["ssim"]
    drifted["speed"]["median"] = 1.0
    with pytest.raises(ValueError, match=r"records\[1\]\.ssim: missing; speed\.median: not declared"):
        check_report(drifted)


def test_student_speedup_over_every_teacher_nfe(result):
    records = {(r["model"], r["nfe"]): r for r in result.report["records"]}
    student = records[("student", 1)]
    assert set(student["speedup_vs_teacher"]) == {"1", "3"}
    for nfe in (1, 3):
        expected = records[("teacher", nfe)]["sec_per_image"] / student["sec_per_image"]
        assert student["speedup_vs_teacher"][str(nfe)] == pytest.approx(expected)
    assert all("speedup_vs_teacher" not in r for r in result.report["records"] if r["model"] == "teacher")


def test_ca_ceiling_and_floor_are_the_classifier_on_clean_and_corrupted_images(
    result, pairs_test, references
):
    model = load_classifier(references["classifier"])
    clean, corrupted, labels = pairs_test["clean"][:8], pairs_test["corrupted"][:8], pairs_test["labels"][:8]
    facts = result.report["classifier"]
    assert facts["ceiling"] == pytest.approx(classifier_accuracy(model, clean, labels))
    assert facts["floor"] == pytest.approx(classifier_accuracy(model, corrupted, labels))
    assert result.report["corrupted_input"]["ca"] == facts["floor"] and facts["reason"] is None
    assert facts["clean_test_accuracy"] == references["classifier"]["clean_test_accuracy"]  # whole split


def test_every_model_restores_the_same_images_with_the_same_seed(
    monkeypatch, pairs_test, teacher_sr, student_sr, references
):
    calls = []
    original = runner_module.restore_images

    def spy(run, xT, mask, **kwargs):
        calls.append((run.label, xT.clone(), mask, kwargs["seed"], kwargs["batch_size"]))
        return original(run, xT, mask, **kwargs)

    monkeypatch.setattr(runner_module, "restore_images", spy)
    result = evaluate(pairs_test, teacher_sr, student_sr, references)
    assert [c[0] for c in calls] == ["teacher@1", "teacher@3", "student@1"]
    for _, xT, mask, seed, batch_size in calls:
        assert torch.equal(xT, pairs_test["corrupted"][:8]) and mask is None and seed == 0 and batch_size == 4
    # the kept samples are the sampler's output for a generator seeded with evaluate.seed
    teacher = teacher_from_checkpoint(teacher_sr)
    expected = sample(teacher.predictor, pairs_test["corrupted"][:4], teacher.schedule, 3,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.samples["teacher@3"], expected[:3])


def test_a_rerun_gives_identical_records_apart_from_timings(
    result, pairs_test, teacher_sr, student_sr, references
):
    again = evaluate(pairs_test, teacher_sr, student_sr, references, dataset="toy shapes")
    assert without_timings(again.report) == without_timings(result.report)
    assert all(torch.equal(again.samples[key], result.samples[key]) for key in result.samples)
    # another seed gives other samples from the stochastic (ancestral) teacher chain
    other = evaluate(pairs_test, teacher_sr, student_sr, references, tiny_config(seed=5))
    assert not torch.equal(other.samples["teacher@3"], result.samples["teacher@3"])


def test_psnr_of_identical_images_is_capped_so_the_json_stays_standard(pairs_test):
    suite = MetricSuite(fid=None, lpips=None, classifier=None)
    clean = pairs_test["clean"]
    scores = suite.score(clean, clean.clone(), None)
    assert scores["psnr"] == PSNR_CAP_DB and scores["ssim"] == pytest.approx(1.0)
    assert scores["fid"] is scores["lpips"] is scores["ca"] is None
    noisy = suite.score((clean + 0.1).clamp(-1, 1), clean, None)["psnr"]
    assert noisy < PSNR_CAP_DB and math.isfinite(noisy)


def test_disabled_metrics_are_null_with_a_reason_and_need_no_weights(
    monkeypatch, pairs_test, teacher_sr, student_sr, references
):
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.FIDScorer", pytest.fail)
    monkeypatch.setattr("ibmd_pipeline.evaluation.references.LPIPSScorer", pytest.fail)
    config = tiny_config(fid={"enabled": False}, lpips={"enabled": False}, ca={"enabled": False})
    report = run_evaluation(
        pairs_test, teacher_sr, student_sr, config, fid_reference=None, classifier=None, progress=False
    ).report
    for record in [*report["records"], report["corrupted_input"]]:
        assert record["fid"] is None and record["lpips"] is None and record["ca"] is None
        assert record["psnr"] is not None and record["ssim"] is not None
    assert report["reasons"] == {
        "fid": "disabled (evaluate.fid.enabled: false)",
        "lpips": "disabled (evaluate.lpips.enabled: false)",
        "ca": "disabled (evaluate.ca.enabled: false)",
    }
    assert report["weights"] == {"fid": None, "lpips": None}
    assert report["classifier"]["ceiling"] is None
    assert report["classifier"]["reason"] == report["reasons"]["ca"]
    assert report["fid"]["dims"] is None


def test_unlabelled_data_gives_null_ca_with_a_reason(teacher_sr, student_sr, references):
    pairs = make_pairs(12, labelled=False)  # the same clean images, without labels
    unlabelled_train = make_pairs(20, labelled=False, split="train")
    classifier = train_reference_classifier(unlabelled_train, pairs, tiny_config())
    report = evaluate(pairs, teacher_sr, student_sr, {**references, "classifier": classifier}).report
    assert all(r["ca"] is None for r in report["records"]) and report["corrupted_input"]["ca"] is None
    assert "no class labels" in report["reasons"]["ca"]
    assert report["classifier"] == {
        "ceiling": None, "floor": None, "reason": report["reasons"]["ca"], "clean_test_accuracy": None,
    }
    assert all(r["fid"] is not None for r in report["records"])


def test_mismatches_and_stale_references_fail_before_any_sampling(
    monkeypatch, pairs_test, teacher_sr, student_sr, references
):
    monkeypatch.setattr(runner_module, "restore_images", pytest.fail)
    monkeypatch.setattr(runner_module.MetricSuite, "build", pytest.fail)
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
        evaluate(pairs_test, teacher_sr, student_sr, references, tiny_config(num_images=6))


def test_inpainting_passes_the_mask_to_teacher_and_student(pairs_test, references):
    teacher = make_teacher("inpaint_center")
    student = make_student(teacher, nfe=2)
    pairs = make_pairs(12, "inpaint_center")  # same clean images as pairs_test: same references
    result = evaluate(pairs, teacher, student, references)
    assert [(r["model"], r["nfe"]) for r in result.report["records"]][2:] == [("student", 1), ("student", 2)]
    known = pairs["mask"][:3] == 0
    assert torch.equal(result.samples["mask"], pairs["mask"][:3])
    for label in ("teacher@1", "teacher@3", "student@1", "student@2"):
        restored = result.samples[label]
        where = known.expand_as(restored)
        assert torch.equal(restored[where], pairs["corrupted"][:3][where])


def test_lpips_is_measured_from_its_minimum_image_size_on(pairs_test):
    config = tiny_config(fid={"enabled": False}, ca={"enabled": False})
    small = MetricSuite.build(config, image_size=16, labelled=False)
    assert small.lpips is None and "at least 31 px" in small.reasons["lpips"]
    suite = MetricSuite.build(config, image_size=32, labelled=False)
    clean = torch.nn.functional.interpolate(pairs_test["clean"], scale_factor=2)
    blurred = torch.nn.functional.avg_pool2d(clean, 3, 1, 1)
    expected = LPIPSScorer().score(blurred, clean)
    assert suite.score(blurred, clean, None)["lpips"] == pytest.approx(expected) and expected > 0
    assert suite.weights["lpips"].startswith(("official:", "offline:"))


class CountingRun:
    """A ModelRun whose restore records its batches and returns a constant image."""

    def __init__(self, value: float = 0.0):
        self.batches = []
        self.value = value

    def __call__(self, xT, mask, generator):
        self.batches.append((xT.clone(), generator.initial_seed()))
        return torch.full_like(xT, self.value)


def test_speed_times_fixed_batches_after_warm_up(pairs_test):
    restore = CountingRun()
    run = ModelRun("teacher", 7, restore)
    config = tiny_config(speed={"batch_size": 20, "repeats": 3, "warmup": 2}, seed=9)
    speed = measure_speed(run, pairs_test["corrupted"][:8], None, config, "cpu")
    assert len(restore.batches) == 5 and len(speed.seconds_per_batch) == 3 and speed.batch_size == 20
    xT, seed = restore.batches[0]
    assert xT.shape[0] == 20 and seed == 9
    assert torch.equal(xT[8:16], pairs_test["corrupted"][:8])  # fewer images than the batch: repeated
    assert speed.device.startswith("cpu")


def test_restore_images_batches_and_rejects_non_finite_output(pairs_test):
    restore = CountingRun()
    run = ModelRun("student", 1, restore)
    images = restore_images(run, pairs_test["corrupted"], None, batch_size=5, seed=3)
    assert [b[0].shape[0] for b in restore.batches] == [5, 5, 2]
    assert images.shape == pairs_test["corrupted"].shape
    assert {b[1] for b in restore.batches} == {3}
    with pytest.raises(FloatingPointError, match="student@1 produced non-finite"):
        restore_images(ModelRun("student", 1, CountingRun(float("nan"))), pairs_test["corrupted"], None,
                       batch_size=5, seed=3)
