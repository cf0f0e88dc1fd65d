"""Folder, pix2pix AB and two-folder paired sources on small temporary folders."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ibmd_pipeline.data import DataConfig, DataError, DataWarning, load_folder_images
from ibmd_pipeline.engine.config import ConfigError, parse_config


def gray(value: int, size=(40, 40)) -> Image.Image:
    return Image.new("L", size, value)


def level(value: int) -> float:
    return value / 127.5 - 1.0


def config(**settings) -> DataConfig:
    settings.setdefault("source", "folder")
    return parse_config(DataConfig, settings, "data")


@pytest.fixture
def class_folder(tmp_path):
    """Two class folders, plus a truncated PNG, a text file and a hidden file."""
    files = [("cats/a.png", 10), ("cats/b.jpg", 60), ("dogs/c.png", 200), ("dogs/deep/d.bmp", 250)]
    for name, value in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        gray(value).save(path)
    full = tmp_path / "dogs" / "c.png"
    (tmp_path / "dogs" / "broken.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    return tmp_path


def test_class_folders_become_labels_and_bad_files_give_one_warning(class_folder):
    with pytest.warns(DataWarning) as record:
        data = load_folder_images(config(path=str(class_folder)), seed=0)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 2 of 6 files" in message and "broken.png" in message and "notes.txt" in message
    assert data.clean.shape == (4, 1, 32, 32)
    assert data.class_names == ("cats", "dogs")
    assert data.labels.tolist() == [0, 0, 1, 1]
    values = data.clean.mean(dim=(1, 2, 3))
    # JPEG of a flat gray is exact to a level or so; PNG/BMP exactly.
    expected = torch.tensor([level(v) for v in (10, 60, 200, 250)])
    torch.testing.assert_close(values, expected, atol=2 / 127.5, rtol=0)


def test_images_at_the_root_mean_no_labels_and_rgb_conversion(tmp_path):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (48, 64), (0, 0, 255)).save(tmp_path / "sub" / "blue.png")
    data = load_folder_images(config(path=str(tmp_path), channels=3), seed=0)
    assert data.labels is None and data.class_names == ()
    assert data.clean.shape == (2, 3, 32, 32)
    assert torch.equal(data.clean[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(data.clean[1, :, 5, 5], torch.tensor([-1.0, -1.0, 1.0]))


def test_resize_keeps_the_centre_and_crops_the_long_side(tmp_path):
    image = np.zeros((40, 80), np.uint8)
    image[:, 20:60] = 255  # a white centre square between black side bands
    Image.fromarray(image).save(tmp_path / "wide.png")
    data = load_folder_images(config(path=str(tmp_path), image_size=16), seed=0)
    assert data.clean.shape == (1, 1, 16, 16)
    # The black bands are cropped away; only the bicubic kernel at the cut sees a little of them.
    assert torch.equal(data.clean[..., 1:-1], torch.ones(1, 1, 16, 14))
    assert data.clean.min() > 0.5


def test_empty_missing_and_unreadable_folders_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="contains no files") as err:
        load_folder_images(config(path=str(tmp_path)), seed=0)
    assert err.value.key == "data.path"
    with pytest.raises(ConfigError, match="does not exist"):
        load_folder_images(config(path=str(tmp_path / "nope")), seed=0)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="none of the 1 files"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        load_folder_images(config(path=str(tmp_path)), seed=0)


def test_small_images_are_upscaled_with_a_warning_or_refused(tmp_path):
    gray(90, (20, 30)).save(tmp_path / "small.png")
    gray(90, (40, 40)).save(tmp_path / "large.png")
    with pytest.warns(DataWarning, match=r"upscaled 1 images .*small\.png"):
        data = load_folder_images(config(path=str(tmp_path)), seed=0)
    assert data.clean.shape == (2, 1, 32, 32)
    with pytest.raises(DataError, match=r"small\.png' is 20x30"):
        load_folder_images(config(path=str(tmp_path), small_images="error"), seed=0)


def test_max_images_caps_the_file_list(tmp_path):
    for i in range(10):
        gray(20 * i).save(tmp_path / f"{i}.png")
    capped = load_folder_images(config(path=str(tmp_path), max_images=4), seed=0)
    again = load_folder_images(config(path=str(tmp_path), max_images=4), seed=0)
    assert len(capped) == 4 and torch.equal(capped.clean, again.clean)


def side_by_side(left: int, right: int, height: int = 40) -> Image.Image:
    image = Image.new("L", (2 * height, height), left)
    image.paste(gray(right, (height, height)), (height, 0))
    return image


@pytest.mark.parametrize(
    ("direction", "corrupted_value", "clean_value"), [("a_to_b", 50, 200), ("b_to_a", 200, 50)]
)
def test_ab_images_split_into_corrupted_and_clean_halves(tmp_path, direction, corrupted_value, clean_value):
    for i in range(3):
        side_by_side(50, 200).save(tmp_path / f"{i}.png")
    data = load_folder_images(config(source="paired_ab", path=str(tmp_path), direction=direction), seed=0)
    assert data.clean.shape == data.corrupted.shape == (3, 1, 32, 32)
    assert data.clean.eq(level(clean_value)).all() and data.corrupted.eq(level(corrupted_value)).all()


def test_an_ab_image_of_odd_width_is_an_error_naming_it(tmp_path):
    for i in range(3):
        side_by_side(50, 200).save(tmp_path / f"{i}.png")
    gray(50, (81, 40)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="odd.png.*odd width"):
        load_folder_images(config(source="paired_ab", path=str(tmp_path)), seed=0)


def test_two_folders_are_matched_by_name_without_extension(tmp_path):
    clean, corrupted = tmp_path / "clean", tmp_path / "corrupted"
    clean.mkdir()
    corrupted.mkdir()
    for name, value in [("a", 10), ("b", 20), ("c", 30)]:
        gray(value).save(clean / f"{name}.png")
    for name, value in [("a", 110), ("b", 120), ("d", 130)]:
        gray(value).save(corrupted / f"{name}.bmp")
    settings = dict(source="paired_folders", path=str(clean), corrupted_path=str(corrupted))
    with pytest.warns(DataWarning, match=r"ignored 2 files without a partner.*c, d"):
        data = load_folder_images(config(**settings), seed=0)
    assert data.clean.mean(dim=(1, 2, 3)).tolist() == pytest.approx([level(10), level(20)])
    assert data.corrupted.mean(dim=(1, 2, 3)).tolist() == pytest.approx([level(110), level(120)])


def test_data_config_errors_name_the_key():
    cases = [
        ({"source": "folder"}, "data.path"),
        ({"source": "paired_folders", "path": "x"}, "data.corrupted_path"),
        ({"channels": 2}, "data.channels"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction"),
        ({"image_size": 4}, "data.image_size"),
        ({"max_images": 2}, "data.max_images"),
        ({"path": "somewhere"}, "data.path"),
        ({"sizes": 3}, "data.sizes"),
    ]
    for settings, key in cases:
        with pytest.raises(ConfigError) as err:
            parse_config(DataConfig, settings, "data")
        assert err.value.key == key, settings
