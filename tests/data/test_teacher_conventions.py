"""Data conventions of the published teachers: I2SB's ImageNet transform, DDBM's squares, DIODE's layout."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ibmd_pipeline.data import DataConfig, DataWarning, load_images
from ibmd_pipeline.degradations import from_uint8


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_i2sb_resize_is_its_imagenet_transform(tmp_path):
    for index, size in enumerate([(40, 30), (30, 50)]):
        (tmp_path / "cls").mkdir(exist_ok=True)
        _photo(*size, index).save(tmp_path / "cls" / f"{index}.png")
    config = DataConfig(source="folder", path=str(tmp_path), image_size=16, channels=3, resize="i2sb")
    images = load_images(config, 0)
    # I2SB dataset/imagenet.py: Resize -> CenterCrop -> ToTensor -> [-1, 1]
    transform = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor()])
    for index in range(2):
        with Image.open(tmp_path / "cls" / f"{index}.png") as image:
            expected = transform(image.convert("RGB")) * 2 - 1
        # ours keeps the resized image as 8-bit levels: at most half a level (1/255 in [-1, 1]) apart
        assert float((images.clean[index] - expected).abs().max()) <= 1 / 255 + 1e-6


def test_ddbm_pairs_are_squeezed_and_diode_normals_resampled_nearest(tmp_path):
    # DDBM's preprocessed DIODE folder: x.png, x_normal.png, x_depth.png
    for stem, seed in (("a", 0), ("b", 1)):
        _photo(24, 20, seed).save(tmp_path / f"{stem}.png")
        _photo(24, 20, seed + 10).save(tmp_path / f"{stem}_normal.png")
        _photo(24, 20, seed + 20).save(tmp_path / f"{stem}_depth.png")
    config = DataConfig(
        source="paired_suffix", path=str(tmp_path), image_size=16, channels=3, resize="ddbm",
        corrupted_resample="nearest",
    )  # fmt: skip
    with pytest.warns(DataWarning, match="ignored 2 files"):
        images = load_images(config, 0)
    assert images.clean.shape == images.corrupted.shape == (2, 3, 16, 16)
    for index, stem in enumerate("ab"):
        with Image.open(tmp_path / f"{stem}.png") as image:
            clean = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC))
        with Image.open(tmp_path / f"{stem}_normal.png") as image:
            normal = np.asarray(image.resize((16, 16), Image.Resampling.NEAREST))
        assert torch.equal(images.clean[index], from_uint8(clean[None])[0])
        assert torch.equal(images.corrupted[index], from_uint8(normal[None])[0])


def test_default_resize_is_unchanged(tmp_path):
    _photo(40, 30, 0).save(tmp_path / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = load_images(DataConfig(source="folder", path=str(tmp_path), image_size=16, channels=3), 0)
    from PIL import ImageOps

    with Image.open(tmp_path / "x.png") as image:
        expected = np.asarray(ImageOps.fit(image.convert("RGB"), (16, 16), method=Image.Resampling.BICUBIC))
    assert torch.equal(images.clean[0], from_uint8(expected[None])[0])
