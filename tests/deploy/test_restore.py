"""Restoring a user's images (a folder or one file): reading, sizes, masks, seeds, safety rules,
errors, catalog folders as models, and the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_pipeline.commands.restore import main
from ibmd_pipeline.data.folders import DataWarning
from ibmd_pipeline.degradations.ops import center_mask
from ibmd_pipeline.deploy.export import ExportConfig, export_torchscript, save_torchscript
from ibmd_pipeline.deploy.restore import (
    RestoreError,
    image_seed,
    load_restoration_model,
    prepare_image,
    resolve_model_file,
    restore_images,
)
from ibmd_pipeline.engine.checkpoint import CheckpointError, save_checkpoint
from ibmd_pipeline.teacher.model import CheckpointMismatchError

SIZE = 16  # the students and images of conftest.py
GOOD = {"a.png": "a.png", "sub/b.jpg": "sub/b.png", "sub/deeper/c.png": "sub/deeper/c.png"}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _restore(model, inputs, outputs, **kwargs):
    """``restore_images`` without the progress bar, with its warnings recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = restore_images(model, inputs, outputs, progress=False, device="cpu", **kwargs)
    return report, [w for w in caught if issubclass(w.category, DataWarning)]


def test_restore_mirrors_the_tree_and_skips_bad_files_with_one_warning(tmp_path, student_file, image_folder):
    before = _tree_digest(image_folder)
    out = tmp_path / "restored"
    report, caught = _restore(student_file(), image_folder, out, batch_size=2)

    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(GOOD.values())
    assert [p.relative_to(out).as_posix() for p in report.written] == [GOOD[k] for k in sorted(GOOD)]
    for path in report.written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (SIZE, SIZE)
    assert report.skipped == ("broken.png (OSError)", "notes.txt (UnidentifiedImageError)")
    assert report.resized == ("sub/b.jpg",)  # c.png is a quarter size: enlarged, not resized
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skips) == 1 and "broken.png" in skips[0] and "notes.txt" in skips[0]
    assert any("resized" in str(w.message) and "sub/b.jpg" in str(w.message) for w in caught)
    assert _tree_digest(image_folder) == before  # the inputs are untouched
    assert report.source == "checkpoint" and report.nfe == 1


def test_restore_is_a_function_of_seed_and_image(tmp_path, student_file, image_folder):
    model = student_file(nfe=2, noise=True)
    first, _ = _restore(model, image_folder, tmp_path / "one", seed=5, batch_size=3)
    again, _ = _restore(model, image_folder, tmp_path / "two", seed=5, batch_size=1)
    other, _ = _restore(model, image_folder, tmp_path / "three", seed=6)
    for a, b, c in zip(first.written, again.written, other.written, strict=True):
        # Per-image noise: the batch size does not change which noise an image gets.
        assert np.abs(_pixels(a).astype(int) - _pixels(b).astype(int)).max() <= 1
        assert np.abs(_pixels(a).astype(int) - _pixels(c).astype(int)).max() > 4
    assert image_seed(5, "a.png") != image_seed(5, "sub/b.jpg") != image_seed(6, "sub/b.jpg")


@pytest.mark.parametrize(("task", "nfe", "noise"), [("sr4x_bicubic", 2, True), ("inpaint_center", 1, False)])
def test_torchscript_export_restores_the_same_pngs_as_the_checkpoint(
    tmp_path, student_checkpoint, image_folder, task, nfe, noise
):
    checkpoint = student_checkpoint(task, nfe=nfe, noise=noise)
    checkpoint_path = save_checkpoint(tmp_path / "student.pt", checkpoint)
    exported_path = save_torchscript(
        export_torchscript(checkpoint, ExportConfig(verify_batch_size=0)), tmp_path / "student.ts.pt"
    )
    from_checkpoint, _ = _restore(checkpoint_path, image_folder, tmp_path / "ckpt", seed=3, batch_size=2)
    from_export, _ = _restore(exported_path, image_folder, tmp_path / "ts", seed=3, batch_size=2)
    assert from_export.source == "torchscript" and from_export.metadata == from_checkpoint.metadata
    for a, b in zip(from_checkpoint.written, from_export.written, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(_pixels(a), _pixels(b))


def test_inpainting_keeps_the_known_pixels_and_fills_the_centre(tmp_path, student_file):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(original).save(inputs / "photo.png")
    report, _ = _restore(student_file(task_kind="inpaint_center", noise=False), inputs, tmp_path / "out")
    restored = _pixels(report.written[0])
    hole = center_mask(1, SIZE, SIZE)[0, 0].bool().numpy()
    np.testing.assert_array_equal(restored[~hole], original[~hole])
    assert np.abs(restored[hole].astype(int) - original[hole].astype(int)).mean() > 10


def test_rgb_students_write_rgb_pngs(tmp_path, student_file, image_folder):
    report, _ = _restore(student_file(channels=3), image_folder, tmp_path / "out")
    with Image.open(report.written[0]) as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_without_recursion_only_the_top_folder_is_read(tmp_path, student_file, image_folder):
    report, _ = _restore(student_file(), image_folder, tmp_path / "out", recursive=False)
    assert [p.name for p in report.written] == ["a.png"]


def test_one_image_restores_as_it_does_in_its_folder(tmp_path, student_file, image_folder):
    """A single file is named by its file name, as a top-level file of a folder is: the same seed
    gives the same PNG either way. Batches of one on both sides: a convolution over another batch
    size may sum in another order, and a last-bit difference can flip a pixel's 8-bit rounding."""
    model = student_file(nfe=2, noise=True)
    whole, _ = _restore(model, image_folder, tmp_path / "all", seed=4, batch_size=1)
    single, _ = _restore(model, image_folder / "a.png", tmp_path / "one", seed=4, batch_size=1)
    assert [p.relative_to(tmp_path / "one").as_posix() for p in single.written] == ["a.png"]
    np.testing.assert_array_equal(_pixels(single.written[0]), _pixels(tmp_path / "all" / "a.png"))
    assert single.skipped == () and single.resized == ()
    resized, caught = _restore(model, image_folder / "sub" / "b.jpg", tmp_path / "jpg")
    assert [p.name for p in resized.written] == ["b.png"] and resized.resized == ("b.jpg",)
    assert any("resized" in str(w.message) for w in caught)


def test_one_image_may_not_be_replaced_by_its_own_output(tmp_path, student_file, image_folder):
    before = _tree_digest(image_folder)
    with pytest.raises(RestoreError, match="would replace the input image"):
        restore_images(student_file(), image_folder / "a.png", image_folder, progress=False)
    # Next to it under another name is allowed: the input is never touched.
    report, _ = _restore(student_file(), image_folder / "sub" / "b.jpg", image_folder / "sub")
    assert report.written == (image_folder / "sub" / "b.png",)
    after = _tree_digest(image_folder)
    assert after.pop("sub/b.png") and after == before


def test_a_catalog_folder_restores_with_its_latest_version(tmp_path, student_checkpoint, image_folder):
    """``data/06_models/student.pt/`` as the model: the version Kedro would load, the newest one
    that holds the file; other folders and an interrupted save's leftovers are not versions."""
    entry = tmp_path / "06_models" / "student.pt"
    older, newer = "2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"
    save_checkpoint(entry / older / "student.pt", student_checkpoint(seed=1))
    save_checkpoint(entry / newer / "student.pt", student_checkpoint(seed=2))
    (entry / "2026-03-01T00.00.00.000Z").mkdir()  # a save that never published its file
    (entry / "notes").mkdir()
    assert resolve_model_file(entry) == entry / newer / "student.pt"

    from_folder, _ = _restore(entry, image_folder, tmp_path / "folder", seed=2)
    from_file, _ = _restore(entry / newer / "student.pt", image_folder, tmp_path / "file", seed=2)
    assert from_folder.model_file == entry / newer / "student.pt"
    for a, b in zip(from_folder.written, from_file.written, strict=True):
        np.testing.assert_array_equal(_pixels(a), _pixels(b))
    empty = tmp_path / "06_models" / "student_torchscript.pt"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no version of 'student_torchscript.pt'"):
        restore_images(empty, image_folder, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- safety


def test_the_output_folder_may_not_be_or_lie_inside_the_input_folder(tmp_path, student_file, image_folder):
    model = student_file()
    before = _tree_digest(image_folder)
    for output in (image_folder, image_folder / "restored", image_folder / "sub"):
        with pytest.raises(RestoreError, match="input folder"):
            restore_images(model, image_folder, output, progress=False)
    # The input inside the output: an output that would land inside the input is refused too.
    outer = tmp_path / "outer"
    nested_input = outer / "in"
    (nested_input / "in").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(nested_input / "in" / "x.png")
    with pytest.raises(RestoreError, match="would land inside the input folder"):
        restore_images(model, nested_input, outer, progress=False)
    assert _tree_digest(image_folder) == before


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, student_file, image_folder):
    model = student_file()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "b.png").write_bytes(b"keep me")
    with pytest.raises(RestoreError, match=r"1 output file\(s\) already exist: .*b\.png"):
        _restore(model, image_folder, out)
    assert (out / "sub" / "b.png").read_bytes() == b"keep me" and not (out / "a.png").exists()
    report, _ = _restore(model, image_folder, out, overwrite=True)
    assert len(report.written) == 3 and _pixels(out / "sub" / "b.png").shape == (SIZE, SIZE)


def test_two_inputs_with_the_same_output_name_are_refused(tmp_path, student_file):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("x.png", "x.jpg"):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(inputs / name)
    with pytest.raises(RestoreError, match="would both be written to"):
        restore_images(student_file(), inputs, tmp_path / "out", progress=False)


# ---------------------------------------------------------------- errors


def test_clear_errors_for_unusable_models_and_folders(
    tmp_path, student_file, teacher_checkpoint, image_folder
):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_images(tmp_path / "missing.pt", image_folder, out)
    teacher = save_checkpoint(tmp_path / "teacher.pt", teacher_checkpoint())
    with pytest.raises(CheckpointMismatchError, match="expected a student checkpoint.*teacher"):
        restore_images(teacher, image_folder, out)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        restore_images(tmp_path / "junk.pt", image_folder, out)
    model = student_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RestoreError, match="is empty"):
        restore_images(model, tmp_path / "empty", out)
    with pytest.raises(RestoreError, match="does not exist"):
        restore_images(model, tmp_path / "nowhere", out)
    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "a.txt").write_text("text")
    with pytest.raises(RestoreError, match="none of the 1 files"), pytest.warns(DataWarning):
        restore_images(model, bad_only, out, progress=False)
    with pytest.raises(RestoreError, match=r"nfe must be an integer in \[1, 1\]"):
        restore_images(model, image_folder, out, nfe=2)
    with pytest.raises(RestoreError, match=r"'sub/b\.jpg': image is 24x20.*16x16"):
        _restore(model, image_folder, tmp_path / "strict", resize="error")
    assert not out.exists()


def test_prepare_image_sizes():
    gray = Image.fromarray(np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE))
    array, resized = prepare_image(gray, SIZE, "jpeg")
    np.testing.assert_array_equal(array, np.asarray(gray)) and not resized
    assert not resized
    low = np.arange(16, dtype=np.uint8).reshape(4, 4)
    array, resized = prepare_image(Image.fromarray(low), SIZE, "sr4x_pool")
    np.testing.assert_array_equal(
        array, low.repeat(4, 0).repeat(4, 1)
    )  # the degradation's nearest upsampling
    assert not resized
    array, resized = prepare_image(Image.fromarray(low), SIZE, "jpeg")  # not an SR task: fitted
    assert array.shape == (SIZE, SIZE) and resized
    wide = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    array, resized = prepare_image(wide, SIZE, "jpeg")
    assert array.shape == (SIZE, SIZE, 3) and resized
    with pytest.raises(RestoreError, match="40x20"):
        prepare_image(wide, SIZE, "jpeg", resize="error")


def test_load_restoration_model_reads_both_formats(tmp_path, student_checkpoint):
    checkpoint = student_checkpoint("sketch", nfe=2)
    exported = export_torchscript(checkpoint, ExportConfig(verify_batch_size=0))
    ts = load_restoration_model(save_torchscript(exported, tmp_path / "s.ts.pt"))
    ckpt = load_restoration_model(save_checkpoint(tmp_path / "s.pt", checkpoint))
    assert (ts.source, ckpt.source) == ("torchscript", "checkpoint")
    assert ts.metadata == ckpt.metadata == exported.metadata
    xT = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    inputs = {"xT": xT, "z": torch.randn_like(xT), "mask": None, "step_noise": torch.randn(1, *xT.shape)}
    assert torch.equal(ts.run(inputs, 2), ckpt.run(inputs, 2))


# ---------------------------------------------------------------- command line


def test_cli_restores_and_reports(tmp_path, student_file, image_folder, capsys):
    out = tmp_path / "out"
    with pytest.warns(DataWarning):
        status = main(
            [
                str(student_file()),
                str(image_folder),
                str(out),
                "--batch-size",
                "2",
                "--device",
                "cpu",
                "--seed",
                "1",
                "--quiet",
            ]
        )
    assert status == 0 and sorted(p.name for p in out.rglob("*.png")) == ["a.png", "b.png", "c.png"]
    status = main([str(student_file("other.pt")), str(image_folder), str(out), "--device", "cpu"])
    assert status == 2 and "already exist" in capsys.readouterr().err
    status = main([str(tmp_path / "missing.pt"), str(image_folder), str(tmp_path / "x")])
    assert status == 2 and "does not exist" in capsys.readouterr().err
    one_image = [str(student_file()), str(image_folder / "a.png"), str(tmp_path / "one"), "--device", "cpu"]
    status = main(one_image)
    assert status == 0 and "restored 1 images" in capsys.readouterr().out
    assert (tmp_path / "one" / "a.png").is_file()
    with pytest.raises(SystemExit):
        main([str(student_file()), str(image_folder), str(out), "--batch-size", "0"])


def test_cli_runs_as_a_module(tmp_path, student_file, image_folder):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ibmd_pipeline.commands.restore",
            str(student_file()),
            str(image_folder),
            str(out),
            "--device",
            "cpu",
            "--no-recursive",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "restored 1 images" in done.stdout and (out / "a.png").is_file()
