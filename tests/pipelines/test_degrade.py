"""The ``degrade`` pipeline: its nodes, a slice on an in-memory catalog, and a real Kedro run."""

import numpy as np
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from ibmd_pipeline.data import pairs as pairs_module
from ibmd_pipeline.engine.config import ConfigError
from ibmd_pipeline.io.datasets import TensorBundleDataset
from ibmd_pipeline.pipelines.common import TITLE_BAND, make_image_grid, mask_to_image
from ibmd_pipeline.pipelines.degrade import create_pipeline
from ibmd_pipeline.pipelines.degrade.nodes import make_corrupted_train, make_degrade_grid, make_pairs

TINY_DATA = {"max_images": 40}


# ---------------------------------------------------------------- nodes


def test_make_pairs_returns_three_disjoint_splits():
    train, val, test = make_pairs(TINY_DATA, {"kind": "sr4x_pool"}, 0)
    assert [len(b["clean"]) for b in (train, val, test)] == [34, 2, 4]
    assert [b["split"] for b in (train, val, test)] == ["train", "val", "test"]
    assert train["corrupted"].shape == (34, 1, 32, 32) and train["labels"].dtype == torch.int64
    flat = torch.cat([b["clean"].flatten(1) for b in (train, val, test)])
    assert len(torch.unique(flat, dim=0)) == len(flat)  # no image is in two splits


@pytest.mark.parametrize(
    ("data", "task", "seed", "key"),
    [
        (TINY_DATA, {"kind": "denoise"}, 0, "task.kind"),
        ({"image_size": 30}, {"kind": "sr4x_pool"}, 0, "data.image_size"),
        ({"source": "folder"}, {}, 0, "data.path"),
        ({"colour": True}, {}, 0, "data.colour"),
        (TINY_DATA, {}, "zero", "seed"),
    ],
)
def test_make_pairs_rejects_bad_parameters_before_loading(monkeypatch, data, task, seed, key):
    monkeypatch.setattr(pairs_module, "load_images", pytest.fail)
    with pytest.raises(ConfigError) as err:
        make_pairs(data, task, seed)
    assert err.value.key == key


def test_make_corrupted_train_keeps_only_what_distillation_may_see():
    train, _, _ = make_pairs(TINY_DATA, {"kind": "inpaint_center"}, 0)
    corrupted = make_corrupted_train(train)
    assert set(corrupted) == {"corrupted", "mask", "task", "image_size", "channels", "split"}
    assert torch.equal(corrupted["corrupted"], train["corrupted"])


def test_degrade_grid_shows_clean_corrupted_and_mask_per_row():
    _, val, _ = make_pairs({"max_images": 200}, {"kind": "inpaint_center"}, 0)
    grid = make_degrade_grid(val)
    tile, pad = 32 * 4 + 2, 2  # tiles enlarged 4x, 2-pixel separators
    assert grid.mode == "L" and grid.size == (3 * tile + pad, 8 * tile + pad + TITLE_BAND)
    pixels = np.asarray(grid)[TITLE_BAND:]  # below the column titles
    clean_tile = pixels[pad : pad + 128 : 4, pad : pad + 128 : 4]
    expected = ((val["clean"][0, 0] + 1) * 127.5).round().numpy()
    np.testing.assert_array_equal(clean_tile, expected)
    mask_tile = pixels[pad : pad + 128 : 4, 2 * tile + pad : 2 * tile + pad + 128 : 4]
    np.testing.assert_array_equal(mask_tile, val["mask"][0, 0].numpy() * 255)


# ---------------------------------------------------------------- shared grid helper


def test_make_image_grid_mixes_gray_and_rgb_columns_and_limits_rows():
    gray = torch.linspace(-1, 1, 5 * 16).view(5, 1, 4, 4)
    rgb = -torch.ones(5, 3, 4, 4)
    rgb[:, 0] = 1.0  # pure red
    grid = make_image_grid([gray, rgb], nrow=3, padding=1)
    assert grid.mode == "RGB" and grid.size == (2 * 5 + 1, 3 * 5 + 1)
    pixels = np.asarray(grid)
    assert tuple(pixels[1, 6]) == (255, 0, 0)  # first row, second column: red
    assert pixels[1, 1, 0] == pixels[1, 1, 1] == pixels[1, 1, 2] == 0  # gray -1 -> black in all channels
    only_gray = make_image_grid([gray], padding=0)
    assert only_gray.mode == "L" and only_gray.size == (4, 20)
    np.testing.assert_array_equal(np.asarray(only_gray)[:4], ((gray[0, 0] + 1) * 127.5).round().numpy())


def test_make_image_grid_rejects_mismatched_columns():
    with pytest.raises(ValueError, match="one image size"):
        make_image_grid([torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8)])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_image_grid([torch.zeros(2, 2, 4, 4)])
    assert torch.equal(mask_to_image(torch.tensor([0.0, 1.0])), torch.tensor([-1.0, 1.0]))


# ---------------------------------------------------------------- pipeline slice, in memory


def test_pipeline_on_an_in_memory_catalog():
    catalog = DataCatalog(
        {
            "params:data": MemoryDataset({"max_images": 30}),
            "params:task": MemoryDataset({"kind": "jpeg", "jpeg_quality": 5}),
            "params:seed": MemoryDataset(3),
        }
    )
    # The runner returns the pipeline's free outputs; intermediate memory datasets are released.
    outputs = SequentialRunner().run(create_pipeline(), catalog)
    assert set(outputs) == {"pairs_test", "corrupted_train", "degrade_grid"}
    corrupted_train = catalog.load("corrupted_train")
    pairs_train, _, pairs_test = make_pairs({"max_images": 30}, {"kind": "jpeg", "jpeg_quality": 5}, 3)
    assert "clean" not in corrupted_train and corrupted_train["task"]["jpeg_quality"] == 5
    assert torch.equal(corrupted_train["corrupted"], pairs_train["corrupted"])  # deterministic in the seed
    assert torch.equal(catalog.load("pairs_test")["clean"], pairs_test["clean"])
    assert isinstance(catalog.load("degrade_grid"), Image.Image)


# ---------------------------------------------------------------- end to end through KedroSession


@pytest.mark.slow
def test_kedro_run_env_test_writes_versioned_outputs(degrade_run):
    files = {
        name: degrade_run.versioned_file(f"05_model_input/{name}.npz")
        for name in ("pairs_train", "pairs_val", "pairs_test", "corrupted_train")
    }
    grid_file = degrade_run.versioned_file("08_reporting/degrade_grid.png")
    assert len({path.parent.name for path in [*files.values(), grid_file]}) == 1  # one save version per run

    def load(path):
        return TensorBundleDataset(filepath=str(path)).load()

    sizes = {name: len(load(files[name])["clean"]) for name in ("pairs_train", "pairs_val", "pairs_test")}
    assert sizes == {"pairs_train": 255, "pairs_val": 15, "pairs_test": 30}  # conf/test: max_images 300
    pairs_train, corrupted_train = load(files["pairs_train"]), load(files["corrupted_train"])
    assert pairs_train["task"] == {
        "kind": "sr4x_bicubic", "jpeg_quality": 10, "sketch_sigma": 1.0, "operators": "project"
    }
    assert pairs_train["class_names"][0] == "Bear" and pairs_train["clean"].shape[1:] == (1, 32, 32)
    assert "clean" not in corrupted_train and "labels" not in corrupted_train
    assert torch.equal(corrupted_train["corrupted"], pairs_train["corrupted"])
    with Image.open(grid_file) as grid:
        assert grid.size == (2 * 130 + 2, 8 * 130 + 2 + TITLE_BAND)


@pytest.mark.slow
def test_kedro_run_with_a_bad_parameter_fails_fast_and_writes_nothing(run_kedro, project_root):
    test_data = project_root / "data" / "test"
    before = {path for path in test_data.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match="allowed values") as err:
        run_kedro(["degrade"], params={"task": {"kind": "denoise"}})
    assert err.value.key == "task.kind"
    assert {path for path in test_data.rglob("*") if path.is_file()} == before
